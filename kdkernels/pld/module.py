"""nn.Module form of `plackett_luce_loss`."""

from __future__ import annotations

import torch

from .function import plackett_luce_loss


class PlackettLuceLoss(torch.nn.Module):
    """Module form of `plackett_luce_loss`: keywords fixed at construction, tensors at call.

    forward(student_logits [..., V], teacher_logits [..., V], labels [...] | None,
    normalizer=None) -> float32 loss.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = dict(kwargs)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        kw = dict(self.kwargs)
        if normalizer is not None:
            kw["normalizer"] = normalizer
        return plackett_luce_loss(student_logits, teacher_logits, labels, **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
