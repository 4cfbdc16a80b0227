"""`plackett_luce_loss`: validation, backend dispatch and the autograd.Function (SPEC §3)."""

from __future__ import annotations

import torch

from .._backend import resolve_backend
from .._rowgrad import as_rows, rescaled_grad, save_and_reduce
from .._validate import (
    check_float_tensor,
    check_int,
    check_labels,
    check_normalizer,
    check_number,
    check_reduction,
    check_same_device,
)
from ..kd.function import mean_scale
from .ops import pld_fwd


class PlackettLuceFunction(torch.autograd.Function):
    """Forward computes the per-row losses and (if needed) the scaled gradient in one pass
    over the rows; backward only rescales the stored gradient by the upstream gradient.

    Inputs: s [N, V], t [N, V] (unit column stride), labels [N] or None, scale 0-dim
    float32 (1/denominator for mean, else 1).
    """

    @staticmethod
    def forward(ctx, s, t, labels, scale, inv_temp: float, top_k: int, ignore_index: int,
                reduction: str, backend: str):
        n = s.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else s.new_empty(0)
        if n > 0:
            pld_fwd(s, t, labels, scale, loss, grad, backend, inv_temp, top_k, ignore_index)
        return save_and_reduce(ctx, loss, grad, scale, reduction, backend)

    @staticmethod
    def backward(ctx, grad_out):
        return (rescaled_grad(ctx, grad_out, "plackett_luce_loss"),) + (None,) * 8


def plackett_luce_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    top_k=None,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    backend="auto",
):
    """Plackett-Luce distillation loss (PLD, SPEC §3).

    Per row the ranking π puts the label first (when labels are given), then every other
    class by descending teacher logit, ties broken by lower class index; with
    w_k = softmax(t/τ)[π_k] and untempered student logits s,
    L_n = Σ_{k=1..K} w_k (log Σ_{ℓ≥k} exp(s[π_ℓ]) − s[π_k]), K = V or `top_k`.

    Args:
        student_logits: [..., V] float tensor (fp16/bf16/fp32/fp64); gets the gradient.
        teacher_logits: [..., V] float tensor, same shape; treated as a constant.
        labels: optional [...] integer tensor; rows equal to `ignore_index` are ignored.
        temperature: τ > 0 of the teacher weights only (the student is not tempered).
        top_k: None (K = V) or an int in [1, V]: only the first K ranks carry a term;
            each suffix log-sum-exp still runs over every class ranked at or after k.
        ignore_index: label value of ignored rows.
        reduction: 'none' ([...] float32 per-row losses, 0 at ignored rows) | 'sum' | 'mean'.
        normalizer: denominator of 'mean' (positive number or 0-dim tensor), default the
            number of valid rows (at least 1).
        backend: 'auto' | 'torch' (the only implementation so far).

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    s = check_float_tensor("student_logits", student_logits)
    t = check_float_tensor("teacher_logits", teacher_logits)
    device = check_same_device(student_logits=s, teacher_logits=t)
    if tuple(s.shape) != tuple(t.shape):
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [..., V], got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
    v = s.shape[-1]
    if v < 1:
        raise ValueError(f"the vocabulary dimension must be >= 1, got {v}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    k = v if top_k is None else check_int("top_k", top_k, lo=1, hi=v)
    ignore_index = check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    check_labels(labels, s.shape[:-1], v, ignore_index, device)
    normalizer = check_normalizer(normalizer)
    be = resolve_backend(backend, device, op="plackett_luce_loss", supported=("torch",))
    lead = s.shape[:-1]
    s2, t2 = as_rows(s), as_rows(t.detach())
    y = labels.reshape(-1) if labels is not None else None
    if reduction == "mean":
        scale = mean_scale(y, s2.shape[0], normalizer, ignore_index, device)
    else:
        scale = torch.ones((), dtype=torch.float32, device=device)
    out = PlackettLuceFunction.apply(s2, t2, y, scale, 1.0 / temperature, k, ignore_index,
                                     reduction, be)
    return out.reshape(lead) if reduction == "none" else out
