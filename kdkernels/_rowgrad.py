"""The autograd pattern shared by the row losses (kd, PLD, top-k KD).

Their forward launchers compute per-row losses and, when the student needs it, the
gradient of Σ_n scale·L_n w.r.t. the student logits, stored in the input dtype. Backward
only multiplies that stored gradient in place by the upstream gradient (a scalar for
'mean'/'sum', per row for 'none'), on the device, skipping rows whose factor is exactly 1.
Because the rescale is in place, a second backward through the same graph is refused.
"""

from __future__ import annotations

import torch

from .kd.ops import scale_rows_


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride (a view when possible)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def save_and_reduce(ctx, loss, grad, scale, reduction: str, backend: str):
    """In an autograd.Function forward: keep `grad` for backward, return the reduced loss.

    loss: [N] float32 per-row losses; grad: [N, V] (or empty); scale: 0-dim float32
    (1/denominator for 'mean').
    """
    ctx.save_for_backward(grad)
    ctx.backend = backend
    ctx.consumed = False
    if reduction == "none":
        return loss
    total = loss.sum()
    return total * scale if reduction == "mean" else total


def rescaled_grad(ctx, grad_out, op: str) -> torch.Tensor:
    """In backward: the stored gradient times the upstream gradient (in place)."""
    if ctx.consumed:
        raise RuntimeError(
            f"{op}: backward was called twice through the same graph; the stored gradient "
            "is rescaled in place. Recompute the loss instead of retain_graph=True."
        )
    ctx.consumed = True
    (grad,) = ctx.saved_tensors
    if grad.numel() > 0:
        scale_rows_(grad, grad_out.float().contiguous(), ctx.backend)
    return grad
