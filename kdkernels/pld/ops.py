"""torch.library custom op around the `plackett_luce_loss` launchers.

Registered with a fake implementation so that `torch.compile(fullgraph=True)` traces
`plackett_luce_loss` without graph breaks; the chunked loop (data-dependent ranking)
stays opaque to the compiler.
"""

from __future__ import annotations

import torch

from .chunked import pld_fwd_torch


@torch.library.custom_op("kdkernels::pld_fwd", mutates_args=("loss", "grad"))
def pld_fwd(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    loss: torch.Tensor,
    grad: torch.Tensor,
    backend: str,
    inv_temp: float,
    top_k: int,
    ignore_index: int,
) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad[N, V] (skipped if grad is empty).

    s: [N, V], t: [N, V], labels: [N] or None, scale: 0-dim float32, top_k in [1, V].
    """
    pld_fwd_torch(s, t, labels, scale, loss, grad, inv_temp, top_k, ignore_index)


@pld_fwd.register_fake
def _pld_fwd_fake(s, t, labels, scale, loss, grad, backend, inv_temp, top_k, ignore_index):
    return None
