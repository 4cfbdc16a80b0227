"""The `torch` backend of the fused linear loss's element-wise steps: the logit softcap
S = c·tanh(u) and its chain rule dS/dz = m·sech²(u), computed in float32 (float64 for
float64) on row blocks and rounded once into the buffer's dtype. (The GEMMs are cuBLAS /
PyTorch in every backend; the divergence step is `kd_loss`'s backend.)"""

from __future__ import annotations

import torch

from .._core.chunking import row_blocks
from .._core.validate import compute_dtype


def _sech2_torch(u: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-2.0 * u.abs())
    return 4.0 * e / (1.0 + e).square()


def softcap_fwd_torch(u: torch.Tensor, out: torch.Tensor, cap: float) -> None:
    """out[M, V] = cap·tanh(u[M, V]), computed in float32 (float64 for float64)."""
    for r0, r1 in row_blocks(u.shape[0], u.shape[1]):
        out[r0:r1] = torch.tanh(u[r0:r1].to(compute_dtype(u))) * cap


def softcap_bwd_torch(g: torch.Tensor, u, k: float, row_scale) -> None:
    """g[M, V] *= k·sech²(u) (when u is given) · row_scale[M, None] (when given), in place."""
    if u is None and row_scale is None:
        return
    for r0, r1 in row_blocks(g.shape[0], g.shape[1]):
        x = g[r0:r1].to(compute_dtype(g))
        if u is not None:
            x = x * (k * _sech2_torch(u[r0:r1].to(compute_dtype(g))))
        if row_scale is not None:
            x = x * row_scale[r0:r1].to(x.dtype).unsqueeze(-1)
        g[r0:r1] = x


