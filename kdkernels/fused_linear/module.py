"""`FusedLinearKDLoss`: the module form of `fused_linear_kd_loss`."""

from __future__ import annotations

import inspect

import torch

from .function import fused_linear_kd_loss

# Keywords fixed at construction: every keyword-only argument except the biases (tensors
# that belong to the heads, passed at call time).
_CALL_TENSORS = ("student_bias", "teacher_bias")
KEYWORDS = tuple(
    name
    for name, p in inspect.signature(fused_linear_kd_loss).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _CALL_TENSORS
)


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of `fused_linear_kd_loss`: keywords fixed at construction, tensors at call.

    forward(student_hidden [..., H_s], student_weight [V_s, H_s], teacher_hidden [..., H_t],
    teacher_weight [V_t, H_t], labels [...] | None, student_bias [V_s] | None,
    teacher_bias [V_t] | None, normalizer=None) -> float32 loss.
    Unknown keywords raise TypeError at construction. `taid_t` may be updated between
    calls (e.g. from a `TAIDSchedule`) by assigning `module.kwargs["taid_t"]`.
    """

    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(KEYWORDS))
        if unknown:
            raise TypeError(
                f"FusedLinearKDLoss got unknown keyword(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(KEYWORDS)}"
            )
        self.kwargs = dict(kwargs)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight,
                labels=None, student_bias=None, teacher_bias=None, normalizer=None):
        kw = dict(self.kwargs)
        if normalizer is not None:
            kw["normalizer"] = normalizer
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
            student_bias=student_bias, teacher_bias=teacher_bias, **kw,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
