"""The dispatch table of `topk_select` and its custom op."""

from __future__ import annotations

import torch

from .._core.backend import Dispatch, Impl
from .._core.customop import custom_op

# Neither GPU kernel is in `auto` until a GPU benchmark shows it faster than torch.topk.
TOPK = Dispatch("topk_select", {
    "cuda": Impl("kdkernels.select.cuda:topk_select_cuda",
                 verify="kdkernels.select.cuda:unsupported_reason", auto=False),
    "triton": Impl("kdkernels.select.triton:topk_select_triton",
                   verify="kdkernels.select.triton:unsupported_reason", auto=False),
    "torch": Impl("kdkernels.select.pytorch:topk_select_torch"),
})


def _topk_fake(x, k, backend):
    shape = (x.shape[0], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


@custom_op("topk_select", fake=_topk_fake)
def topk_select_op(x: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, V] (unit column stride) -> (values [N, k] in x's dtype, indices [N, k] int64)."""
    values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
    indices = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
    TOPK(backend, x, k, values, indices)
    return values, indices
