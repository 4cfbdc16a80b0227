"""nn.Module wrappers of the public losses."""

from __future__ import annotations

import torch

from .kd import kd_loss


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`: keywords fixed at construction, tensors at call.

    forward(student_logits [..., V_s], teacher_logits [..., V_t], labels [...] | None,
    normalizer=None) -> float32 loss. `taid_t` may be updated between calls
    (e.g. from a `TAIDSchedule`) by assigning `module.kwargs["taid_t"]`.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = dict(kwargs)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        kw = dict(self.kwargs)
        if normalizer is not None:
            kw["normalizer"] = normalizer
        return kd_loss(student_logits, teacher_logits, labels, **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
