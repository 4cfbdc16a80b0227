"""nn.Module form of `sinkhorn_loss`."""

from __future__ import annotations

import torch

from .function import sinkhorn_loss


class SinkhornLoss(torch.nn.Module):
    """Module form of `sinkhorn_loss`: keywords fixed at construction, tensors at call.

    forward(student_logits [..., B, V], teacher_logits [..., B, V]) -> float32 scalar.
    Keywords: temperature, cost ('l1' | 'sqeuclidean'), epsilon, n_iters,
    grad ('unrolled' | 'envelope'), backend.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = dict(kwargs)

    def forward(self, student_logits, teacher_logits):
        return sinkhorn_loss(student_logits, teacher_logits, **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
