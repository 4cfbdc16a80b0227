"""`kd_loss`: validation, backend dispatch and the autograd.Function (SPEC §1)."""

from __future__ import annotations

import torch

from .._backend import BackendUnavailableError, explicit_backend, resolve_backend
from .._rowgrad import as_rows, rescaled_grad, save_and_reduce
from .._validate import (
    check_choice,
    check_float_tensor,
    check_int,
    check_labels,
    check_normalizer,
    check_number,
    check_reduction,
    check_same_device,
)
from .ops import kd_fwd
from .params import DIVERGENCES, KDParams, canonical

VOCAB_MISMATCH = ("error", "truncate")
# Preference order on a GPU (auto takes cuda only for ops listed in _backend._auto_cuda_ops).
KD_BACKENDS = ("cuda", "triton", "torch")


class KDLossFunction(torch.autograd.Function):
    """Forward computes the loss and (if needed) the scaled gradient; backward rescales it.

    Inputs: s [N, Vs], t [N, Vt] (unit column stride), labels [N] or None, scale 0-dim
    float32 (1/denominator for mean, else 1).
    """

    @staticmethod
    def forward(ctx, s, t, labels, scale, prm: KDParams, v: int, reduction: str, backend: str):
        n = s.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(s) if want_grad else s.new_empty(0)
        if n > 0:
            kd_fwd(s, t, labels, scale, loss, grad, backend, prm.div, prm.inv_temp, prm.w,
                   prm.soft_w, prm.hard_w, prm.ignore_index, v)
        return save_and_reduce(ctx, loss, grad, scale, reduction, backend)

    @staticmethod
    def backward(ctx, grad_out):
        return (rescaled_grad(ctx, grad_out, "kd_loss"),) + (None,) * 7


def prepare_kd_args(
    student_logits, teacher_logits, labels, *, divergence, beta, alpha, taid_t, temperature,
    ignore_index, reduction, normalizer, hard_label_weight, soft_label_weight, vocab_mismatch,
    student_name="student_logits", teacher_name="teacher_logits",
):
    """Validate the `kd_loss` keywords (shared with the fused linear loss).

    Returns (KDParams, v, normalizer): v is the number of vocabulary columns used.
    `student_logits`/`teacher_logits` only need `.shape`/`.dtype`/`.device` here.
    """
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("vocab_mismatch", vocab_mismatch, VOCAB_MISMATCH)
    check_reduction(reduction)
    lead_s, lead_t = tuple(student_logits.shape[:-1]), tuple(teacher_logits.shape[:-1])
    if lead_s != lead_t:
        raise ValueError(
            f"{student_name} and {teacher_name} must have the same leading shape, "
            f"got {lead_s} and {lead_t}"
        )
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs != vt and vocab_mismatch == "error":
        raise ValueError(
            f"vocabulary sizes differ: student {vs}, teacher {vt}; pass "
            "vocab_mismatch='truncate' to use the first min(V_s, V_t) columns of both"
        )
    v = min(vs, vt)
    if v < 1:
        raise ValueError(f"the vocabulary dimension must be >= 1, got {v}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    beta = check_number("beta", beta, lo=0.0, hi=1.0)
    alpha = check_number("alpha", alpha, lo=0.0, hi=1.0)
    if taid_t is not None:
        taid_t = check_number("taid_t", taid_t, lo=0.0, hi=1.0)
    elif divergence == "taid":
        raise ValueError("divergence='taid' needs taid_t in [0, 1] (see TAIDSchedule)")
    ignore_index = check_int("ignore_index", ignore_index)
    hard_w = check_number("hard_label_weight", hard_label_weight, lo=0.0)
    soft_w = check_number("soft_label_weight", soft_label_weight, lo=0.0)
    if hard_w != 0.0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the hard-label cross-entropy)")
    check_labels(labels, lead_s, v, ignore_index, student_logits.device)
    normalizer = check_normalizer(normalizer)
    prm = canonical(
        divergence, beta=beta, alpha=alpha, taid_t=taid_t, temperature=temperature,
        soft_w=soft_w, hard_w=hard_w, ignore_index=ignore_index,
    )
    return prm, v, normalizer


def mean_scale(labels, n_rows: int, normalizer, ignore_index: int, device) -> torch.Tensor:
    """0-dim float32 tensor 1/denominator for reduction='mean', built without a host sync."""
    if normalizer is None:
        if labels is None:
            return torch.full((), 1.0 / max(1, n_rows), dtype=torch.float32, device=device)
        count = (labels != ignore_index).sum().clamp_min(1)
        return count.to(torch.float32).reciprocal()
    if isinstance(normalizer, torch.Tensor):
        return normalizer.to(device=device, dtype=torch.float32).reciprocal()
    return torch.full((), 1.0 / normalizer, dtype=torch.float32, device=device)


def kd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    divergence="forward_kl",
    beta=0.5,
    alpha=0.1,
    taid_t=None,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    hard_label_weight=0.0,
    soft_label_weight=1.0,
    vocab_mismatch="error",
    backend="auto",
):
    """Knowledge-distillation loss between student and teacher logits (SPEC §1).

    Args:
        student_logits: [..., V_s] float tensor (fp16/bf16/fp32/fp64); gets the gradient.
        teacher_logits: [..., V_t] float tensor, same leading shape; treated as a constant.
        labels: optional [...] integer tensor; rows equal to `ignore_index` are ignored.
        divergence: forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl |
            tvd | taid.
        beta: jsd mixture weight in [0, 1] (0: forward KL, 1: reverse KL, as TRL).
        alpha: skew KL mixture weight in [0, 1].
        taid_t: TAID interpolation λ in [0, 1] (required for divergence='taid').
        temperature: τ > 0; both distributions are softmax(logits / τ); no τ² factor.
        reduction: 'none' ([...] float32 per-row losses) | 'sum' | 'mean'.
        normalizer: denominator of 'mean' (number or 0-dim tensor), default the number
            of valid rows (at least 1).
        hard_label_weight, soft_label_weight: L_n = soft·D_n + hard·CE(s_n, y_n).
        vocab_mismatch: 'error' | 'truncate' (use the first min(V_s, V_t) columns).
        backend: 'auto' | 'torch' | 'triton' | 'cuda'.

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    s = check_float_tensor("student_logits", student_logits)
    t = check_float_tensor("teacher_logits", teacher_logits)
    device = check_same_device(student_logits=s, teacher_logits=t)
    prm, v, normalizer = prepare_kd_args(
        s, t, labels, divergence=divergence, beta=beta, alpha=alpha, taid_t=taid_t,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight, vocab_mismatch=vocab_mismatch,
    )
    be = resolve_backend(backend, device, op="kd_loss", supported=KD_BACKENDS)
    if be == "cuda":
        from .cuda import unsupported_reason

        reason = unsupported_reason(s, t)
        if reason is not None:
            if explicit_backend(backend):
                raise BackendUnavailableError(f"kd_loss: backend='cuda' cannot run: {reason}")
            be = resolve_backend(backend, device, op="kd_loss", supported=("triton", "torch"))
    lead = s.shape[:-1]
    s2, t2 = as_rows(s), as_rows(t.detach())
    y = labels.reshape(-1) if labels is not None else None
    if reduction == "mean":
        scale = mean_scale(y, s2.shape[0], normalizer, prm.ignore_index, device)
    else:
        scale = torch.ones((), dtype=torch.float32, device=device)
    out = KDLossFunction.apply(s2, t2, y, scale, prm, v, reduction, be)
    return out.reshape(lead) if reduction == "none" else out
