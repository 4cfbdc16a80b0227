"""torch.library custom ops around the `kd_loss` launchers.

Registering the launchers (which write into preallocated outputs) as custom ops with
fake implementations lets `torch.compile(fullgraph=True)` trace `kd_loss` without graph
breaks; the kernels themselves stay opaque to the compiler.
"""

from __future__ import annotations

import torch

from .chunked import CHUNK_ELEMS, kd_fwd_torch
from .params import KDParams


@torch.library.custom_op("kdkernels::kd_fwd", mutates_args=("loss", "grad"))
def kd_fwd(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    loss: torch.Tensor,
    grad: torch.Tensor,
    backend: str,
    div: int,
    inv_temp: float,
    w: float,
    soft_w: float,
    hard_w: float,
    ignore_index: int,
    v: int,
) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad[N, Vg] (skipped if grad is empty).

    s: [N, Vs], t: [N, Vt] with Vs, Vt >= v; labels: [N] or None; scale: 0-dim float32.
    """
    prm = KDParams(div, inv_temp, w, soft_w, hard_w, ignore_index)
    if backend == "triton":
        from .triton import kd_fwd_triton

        kd_fwd_triton(s, t, labels, scale, loss, grad, prm, v)
    else:
        kd_fwd_torch(s, t, labels, scale, loss, grad, prm, v)


@kd_fwd.register_fake
def _kd_fwd_fake(s, t, labels, scale, loss, grad, backend, div, inv_temp, w, soft_w, hard_w,
                 ignore_index, v):
    return None


@torch.library.custom_op("kdkernels::scale_rows_", mutates_args=("grad",))
def scale_rows_(grad: torch.Tensor, scale: torch.Tensor, backend: str) -> None:
    """grad[N, V] *= scale, where scale is 0-dim or [N] (float32); no-op where scale == 1."""
    if backend == "triton":
        from .triton import scale_rows_triton

        scale_rows_triton(grad, scale)
    elif scale.dim() == 0:
        if scale.device.type != "cpu" or float(scale) != 1.0:
            grad.mul_(scale)
    else:
        # Row chunks: multiply in float32 (or wider) and round once into grad's dtype.
        rows = max(1, CHUNK_ELEMS // max(grad.shape[1], 1))
        for r0 in range(0, grad.shape[0], rows):
            blk = grad[r0 : r0 + rows]
            blk.copy_(blk * scale[r0 : r0 + rows].unsqueeze(-1))


@scale_rows_.register_fake
def _scale_rows_fake(grad, scale, backend):
    return None
