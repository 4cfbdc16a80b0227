"""nn.Module wrappers of the public losses (keywords at construction, tensors at call)."""

from __future__ import annotations

import inspect

import torch

from .fused_linear.module import FusedLinearKDLoss
from .graph.module import GraphOnLogitsLoss
from .kd import kd_loss
from .pld.module import PlackettLuceLoss
from .sinkhorn.module import SinkhornLoss
from .topk.module import TopKKDLoss

_KD_KEYWORDS = tuple(
    name for name, p in inspect.signature(kd_loss).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)


class KDLoss(torch.nn.Module):
    """Module form of `kd_loss`.

    forward(student_logits [..., V_s], teacher_logits [..., V_t], labels [...] | None,
    normalizer=None) -> float32 loss. `taid_t` may be updated between calls (e.g. from a
    `TAIDSchedule`) by assigning `module.kwargs["taid_t"]`.
    """

    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(_KD_KEYWORDS))
        if unknown:
            raise TypeError(
                f"KDLoss got unknown keyword(s) {unknown}; kd_loss takes {_KD_KEYWORDS}"
            )
        self.kwargs = dict(kwargs)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        kw = dict(self.kwargs)
        if normalizer is not None:
            kw["normalizer"] = normalizer
        return kd_loss(student_logits, teacher_logits, labels, **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


__all__ = [
    "KDLoss",
    "FusedLinearKDLoss",
    "GraphOnLogitsLoss",
    "PlackettLuceLoss",
    "SinkhornLoss",
    "TopKKDLoss",
]
