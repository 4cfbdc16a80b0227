"""`kd_loss`: validation, backend dispatch and the autograd.Function (docs/spec.md §1)."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from .._core.backend import Backend
from .._core.rowgrad import as_rows, row_loss, row_loss_function
from .._core.validate import (
    Reduction,
    check_choice,
    check_float_tensor,
    check_number,
    check_row_args,
    check_same_device,
)
from ..parallel import VocabParallel, check_vocab_parallel, global_shape, unwrap_dtensors
from .ops import KD_FWD, kd_fwd
from .parallel import kd_fwd_vocab_parallel, vocab_parallel_backend
from .params import DIVERGENCES, Divergence, canonical

VocabMismatch = Literal["error", "truncate"]
VOCAB_MISMATCH: tuple[str, ...] = get_args(VocabMismatch)

KDLossFunction = row_loss_function("kd_loss", kd_fwd)
KDVocabParallelFunction = row_loss_function("kd_loss", kd_fwd_vocab_parallel)


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
    hard_w = check_number("hard_label_weight", hard_label_weight, lo=0.0)
    soft_w = check_number("soft_label_weight", soft_label_weight, lo=0.0)
    if hard_w != 0.0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the hard-label cross-entropy)")
    ignore_index, normalizer = check_row_args(
        labels, lead_s, v, student_logits.device, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer)
    prm = canonical(
        divergence, beta=beta, alpha=alpha, taid_t=taid_t, temperature=temperature,
        soft_w=soft_w, hard_w=hard_w, ignore_index=ignore_index,
    )
    return prm, v, normalizer


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
    taid_t: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    vocab_mismatch: VocabMismatch = "error",
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Knowledge-distillation loss between student and teacher logits (docs/spec.md §1).

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
        vocab_parallel: a `VocabParallel`: this rank holds vocabulary columns
            [start, stop) of both logits (labels stay global ids); every rank of its
            group returns the full-vocabulary loss and gets its own columns' gradient
            (docs/vocab_parallel.md; backend 'torch' or 'triton', 'auto' takes torch).
            DTensor logits sharded on the last dim imply it.
        backend: 'auto' | 'torch' | 'triton' | 'cuda'.

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    vocab_parallel, tens = unwrap_dtensors(vocab_parallel, student_logits=student_logits,
                                           teacher_logits=teacher_logits, labels=labels)
    s = check_float_tensor("student_logits", tens["student_logits"])
    t = check_float_tensor("teacher_logits", tens["teacher_logits"])
    labels = tens["labels"]
    device = check_same_device(student_logits=s, teacher_logits=t)
    shards = None
    if vocab_parallel is not None:
        vp_be = vocab_parallel_backend(backend, device)  # before any collective
        shards = check_vocab_parallel(vocab_parallel, "kd_loss", backend,
                                      (s.shape[-1], t.shape[-1]), math.prod(s.shape[:-1]),
                                      device)
    prm, v, normalizer = prepare_kd_args(
        global_shape(s, shards), global_shape(t, shards), labels, divergence=divergence,
        beta=beta, alpha=alpha, taid_t=taid_t,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight, vocab_mismatch=vocab_mismatch,
    )
    if shards is not None:
        return row_loss(KDVocabParallelFunction, kd_fwd_vocab_parallel, s, labels,
                        as_rows(t.detach()), prm, shards, reduction=reduction,
                        normalizer=normalizer, ignore_index=prm.ignore_index, backend=vp_be)
    be = KD_FWD.resolve(backend, device, s_dtype=s.dtype, t_dtype=t.dtype)
    return row_loss(KDLossFunction, kd_fwd, s, labels, as_rows(t.detach()), *prm, v,
                    reduction=reduction, normalizer=normalizer, ignore_index=prm.ignore_index,
                    backend=be)
