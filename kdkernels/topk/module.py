"""nn.Module form of `topk_kd_loss`."""

from __future__ import annotations

import torch

from .function import topk_kd_loss


class TopKKDLoss(torch.nn.Module):
    """Module form of `topk_kd_loss`: keywords fixed at construction, tensors at call.

    forward(student_logits [..., V], teacher_topk_indices [..., k],
    teacher_topk_values [..., k], labels [...] | None, normalizer=None) -> float32 loss.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = dict(kwargs)

    def forward(self, student_logits, teacher_topk_indices, teacher_topk_values, labels=None,
                normalizer=None):
        kw = dict(self.kwargs)
        if normalizer is not None:
            kw["normalizer"] = normalizer
        return topk_kd_loss(student_logits, teacher_topk_indices, teacher_topk_values, labels,
                            **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
