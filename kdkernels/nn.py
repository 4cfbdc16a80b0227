"""nn.Module forms of the public losses, all built the same way: the function's keywords
are fixed at construction (unknown names raise TypeError), tensors are given at call time.

The keywords live in `module.kwargs`; a value that changes during training (TAID's
`taid_t` from a `TAIDSchedule`, say) is updated by assigning `module.kwargs[name]`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .fused_linear import fused_linear_kd_loss, fused_linear_topk_kd_loss
from .graph import graph_on_logits_loss
from .kd import kd_loss
from .pld import plackett_luce_loss
from .sampled import fused_linear_sampled_kd_loss, sampled_kd_loss
from .sinkhorn import sinkhorn_loss
from .topk import topk_kd_loss
from .uld import uld_loss


class _LossModule(torch.nn.Module):
    """Base: `function` called with the call's tensors and the constructor's keywords.

    call_time: keyword-only arguments of `function` that forward takes instead (tensors
    that change per call, like `normalizer`); fixed: its positional-or-keyword arguments
    fixed at construction (like the graph loss's `k`).
    """

    function: Callable
    call_time: tuple[str, ...] = ()
    fixed: tuple[str, ...] = ()

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """The keywords the constructor accepts."""
        params = inspect.signature(cls.function).parameters.items()
        kw = tuple(n for n, p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
        return cls.fixed + tuple(n for n in kw if n not in cls.call_time)

    def __init__(self, **kwargs):
        super().__init__()
        accepted = self.keywords()
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown keyword(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(accepted)}"
            )
        self.kwargs = dict(kwargs)

    def _call(self, *tensors, **call_kwargs):
        kw = dict(self.kwargs)
        kw.update((k, v) for k, v in call_kwargs.items() if v is not None)
        return type(self).function(*tensors, **kw)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


class KDLoss(_LossModule):
    """Module form of `kd_loss`.

    forward(student_logits [..., V_s], teacher_logits [..., V_t], labels [...] | None,
    normalizer=None) -> float32 loss ((total, soft, hard) with return_components=True).
    """

    function = staticmethod(kd_loss)
    call_time = ("normalizer",)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        return self._call(student_logits, teacher_logits, labels, normalizer=normalizer)


class FusedLinearKDLoss(_LossModule):
    """Module form of `fused_linear_kd_loss`.

    forward(student_hidden [..., H_s], student_weight [V_s, H_s], teacher_hidden [..., H_t],
    teacher_weight [V_t, H_t], labels [...] | None, student_bias [V_s] | None,
    teacher_bias [V_t] | None, normalizer=None, teacher_logits=None) -> float32 loss.
    A stored teacher instead of the head: forward(student_hidden, student_weight,
    labels=labels, teacher_logits=T [..., V_t]) (`teacher_values` at construction).
    """

    function = staticmethod(fused_linear_kd_loss)
    call_time = ("student_bias", "teacher_bias", "normalizer", "teacher_logits")

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None,
                labels=None, student_bias=None, teacher_bias=None, normalizer=None,
                teacher_logits=None):
        return self._call(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                          student_bias=student_bias, teacher_bias=teacher_bias,
                          normalizer=normalizer, teacher_logits=teacher_logits)


class FusedLinearTopKKDLoss(_LossModule):
    """Module form of `fused_linear_topk_kd_loss`.

    forward(student_hidden [..., H], student_weight [V, H], teacher_topk_indices [..., k],
    teacher_topk_values [..., k], labels [...] | None, student_bias [V] | None,
    normalizer=None) -> float32 loss.
    """

    function = staticmethod(fused_linear_topk_kd_loss)
    call_time = ("student_bias", "normalizer")

    def forward(self, student_hidden, student_weight, teacher_topk_indices, teacher_topk_values,
                labels=None, student_bias=None, normalizer=None):
        return self._call(student_hidden, student_weight, teacher_topk_indices,
                          teacher_topk_values, labels, student_bias=student_bias,
                          normalizer=normalizer)


class PlackettLuceLoss(_LossModule):
    """Module form of `plackett_luce_loss`.

    forward(student_logits [..., V], teacher_logits [..., V], labels [...] | None,
    normalizer=None, mask [...] | None) -> float32 loss.
    """

    function = staticmethod(plackett_luce_loss)
    call_time = ("normalizer", "mask")

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None, mask=None):
        return self._call(student_logits, teacher_logits, labels, normalizer=normalizer,
                          mask=mask)


class TopKKDLoss(_LossModule):
    """Module form of `topk_kd_loss`.

    forward(student_logits [..., V], teacher_topk_indices [..., k],
    teacher_topk_values [..., k], labels [...] | None, normalizer=None) -> float32 loss.
    """

    function = staticmethod(topk_kd_loss)
    call_time = ("normalizer",)

    def forward(self, student_logits, teacher_topk_indices, teacher_topk_values, labels=None,
                normalizer=None):
        return self._call(student_logits, teacher_topk_indices, teacher_topk_values, labels,
                          normalizer=normalizer)


class ULDLoss(_LossModule):
    """Module form of `uld_loss`.

    forward(student_logits [..., V_s], teacher_logits [..., V_t], labels [...] | None,
    normalizer=None) -> float32 loss.
    """

    function = staticmethod(uld_loss)
    call_time = ("normalizer",)

    def forward(self, student_logits, teacher_logits, labels=None, normalizer=None):
        return self._call(student_logits, teacher_logits, labels, normalizer=normalizer)


class SampledKDLoss(_LossModule):
    """Module form of `sampled_kd_loss`.

    forward(student_logits [..., V], samples (TeacherSamples), labels [...] | None,
    normalizer=None) -> float32 loss.
    """

    function = staticmethod(sampled_kd_loss)
    call_time = ("normalizer",)

    def forward(self, student_logits, samples, labels=None, normalizer=None):
        return self._call(student_logits, samples, labels, normalizer=normalizer)


class FusedLinearSampledKDLoss(_LossModule):
    """Module form of `fused_linear_sampled_kd_loss`.

    forward(student_hidden [..., H], student_weight [V, H], samples (TeacherSamples),
    labels [...] | None, student_bias [V] | None, normalizer=None) -> float32 loss.
    """

    function = staticmethod(fused_linear_sampled_kd_loss)
    call_time = ("student_bias", "normalizer")

    def forward(self, student_hidden, student_weight, samples, labels=None, student_bias=None,
                normalizer=None):
        return self._call(student_hidden, student_weight, samples, labels,
                          student_bias=student_bias, normalizer=normalizer)


class SinkhornLoss(_LossModule):
    """Module form of `sinkhorn_loss`.

    forward(student_logits [..., B, V], teacher_logits [..., B, V], labels [..., B] | None,
    mask [..., B] | None) -> float32 scalar.
    """

    function = staticmethod(sinkhorn_loss)
    call_time = ("mask",)

    def forward(self, student_logits, teacher_logits, labels=None, mask=None):
        return self._call(student_logits, teacher_logits, labels, mask=mask)


class GraphOnLogitsLoss(_LossModule):
    """Module form of `graph_on_logits_loss`: `k` and the keywords fixed at construction.

    forward(student_logits [G, T, V_s], teacher_logits [G, T, V_t], mask [G, T] | None,
    labels [G, T] | None) -> float32 scalar.
    """

    function = staticmethod(graph_on_logits_loss)
    call_time = ("mask", "labels")
    fixed = ("k",)

    def __init__(self, k, **kwargs):
        super().__init__(k=k, **kwargs)

    def forward(self, student_logits, teacher_logits, mask=None, labels=None):
        return self._call(student_logits, teacher_logits, mask=mask, labels=labels)


__all__ = [
    "KDLoss",
    "FusedLinearKDLoss",
    "FusedLinearTopKKDLoss",
    "GraphOnLogitsLoss",
    "PlackettLuceLoss",
    "SampledKDLoss",
    "FusedLinearSampledKDLoss",
    "SinkhornLoss",
    "TopKKDLoss",
    "ULDLoss",
]
