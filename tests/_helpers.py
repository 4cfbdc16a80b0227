"""Helpers shared by the test modules (import as `from _helpers import ...`)."""

from __future__ import annotations

import pytest
import torch

requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"
)

# Absolute error floors per dtype for the low-precision rule
# |fast - ref64| <= 2 |torch_lowp - ref64| + ATOL[dtype].
ATOL = {torch.float16: 1e-5, torch.bfloat16: 1e-4, torch.float32: 1e-6, torch.float64: 1e-12}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||x - ref|| / ||ref|| in float64 (0 when both are 0)."""
    x, ref = x.double(), ref.double()
    den = ref.norm()
    num = (x - ref).norm()
    if den == 0:
        return float(num)
    return float(num / den)
