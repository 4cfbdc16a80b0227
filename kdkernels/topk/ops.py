"""torch.library custom op around the `topk_kd_loss` launchers.

Registered with a fake implementation so that `torch.compile(fullgraph=True)` traces
`topk_kd_loss` without graph breaks; the chunked loop stays opaque to the compiler.
"""

from __future__ import annotations

import torch

from .chunked import topk_kd_fwd_torch


@torch.library.custom_op("kdkernels::topk_kd_fwd", mutates_args=("loss", "grad"))
def topk_kd_fwd(
    s: torch.Tensor,
    idx: torch.Tensor,
    vals: torch.Tensor,
    labels: torch.Tensor | None,
    scale: torch.Tensor,
    loss: torch.Tensor,
    grad: torch.Tensor,
    backend: str,
    code: int,
    beta: float,
    inv_temp: float,
    logprobs: bool,
    bucket: bool,
    ignore_index: int,
) -> None:
    """Per-row losses into loss[N] and scale·∂L_n/∂s into grad[N, V] (skipped if grad is empty).

    s: [N, V]; idx: [N, k] (−1 = padding); vals: [N, k]; labels: [N] or None;
    scale: 0-dim float32.
    """
    topk_kd_fwd_torch(s, idx, vals, labels, scale, loss, grad, code=code, beta=beta,
                      inv_temp=inv_temp, logprobs=logprobs, bucket=bucket,
                      ignore_index=ignore_index)


@topk_kd_fwd.register_fake
def _topk_kd_fwd_fake(s, idx, vals, labels, scale, loss, grad, backend, code, beta, inv_temp,
                      logprobs, bucket, ignore_index):
    return None
