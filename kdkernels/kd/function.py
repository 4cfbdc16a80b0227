"""`kd_loss`: validation, backend dispatch and the autograd.Function (docs/spec.md §1)."""

from __future__ import annotations

import math
import warnings
from typing import Literal, get_args

import torch

from .._core.backend import Backend
from .._core.rowgrad import as_rows, loss_scale, row_loss, row_loss_function, row_views
from .._core.validate import (
    Reduction,
    check_choice,
    check_float_tensor,
    check_number,
    check_row_args,
    check_same_device,
    compute_dtype,
)
from ..parallel import VocabParallel, check_vocab_parallel, global_shape, unwrap_dtensors
from .components import (
    TEMPERATURE_SCALINGS,
    TemperatureScaling,
    check_return_components,
    components,
    new_parts,
    rerun_with,
)
from .ops import KD_FWD, kd_fwd
from .parallel import kd_fwd_vocab_parallel, vocab_parallel_backend
from .parallel_target import check_vp_divergence
from .params import (
    ALPHA_DEFAULT,
    BETA_DEFAULT,
    DIVERGENCES,
    DKD_ALPHA_DEFAULT,
    DKD_BETA_DEFAULT,
    NEEDS_LABELS,
    NKD_GAMMA_DEFAULT,
    Divergence,
    canonical,
    check_scalar_tensor,
    check_taid_t,
    check_teacher_temperature,
    check_temperature,
    check_unused,
    resolve,
)

VocabMismatch = Literal["error", "truncate"]
VOCAB_MISMATCH: tuple[str, ...] = get_args(VocabMismatch)

KDLossFunction = row_loss_function("kd_loss", kd_fwd)
KDVocabParallelFunction = row_loss_function("kd_loss", kd_fwd_vocab_parallel)


# vocab_mismatch='truncate' between vocabularies this far apart is most likely two
# tokenizers, not one tokenizer padded to two sizes: warn.
_TRUNCATE_WARN_COLUMNS = 1024
_TRUNCATE_WARN_FRACTION = 0.01


def _warn_unrelated_vocabularies(vs: int, vt: int) -> None:
    diff, wide = abs(vs - vt), max(vs, vt)
    if diff > _TRUNCATE_WARN_COLUMNS or diff > _TRUNCATE_WARN_FRACTION * wide:
        warnings.warn(
            f"vocab_mismatch='truncate' with vocabularies of {vs} (student) and {vt} (teacher) "
            f"columns: {diff} columns apart. Truncation is only meaningful when both models "
            "share the tokenizer and the extra columns are padding (the same token ids in "
            "the first min(V_s, V_t) columns); between different tokenizers the loss compares "
            "unrelated tokens",
            UserWarning, stacklevel=4,
        )


def _check_dynamic(name, value, device, check):
    """A number: checked now. A tensor: metadata now; its value is read inside the custom
    op (params.resolve), and checked here too when that is free (CPU, not tracing)."""
    if not isinstance(value, torch.Tensor):
        return check(value), None
    value = check_scalar_tensor(name, value, device)
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        check(value)
    return None, value


def prepare_kd_args(
    student_logits, teacher_logits, labels, *, divergence, beta, alpha, taid_t, temperature,
    ignore_index, reduction, normalizer, hard_label_weight, soft_label_weight, vocab_mismatch,
    student_name="student_logits", teacher_name="teacher_logits",
    dkd_alpha=DKD_ALPHA_DEFAULT, dkd_beta=DKD_BETA_DEFAULT, nkd_gamma=NKD_GAMMA_DEFAULT,
    teacher_temperature=None, temperature_scaling="none",
):
    """Validate the `kd_loss` keywords (shared with the fused linear loss).

    Returns (KDParams, v, normalizer, dynamic): v is the number of vocabulary columns used;
    dynamic = (temperature, taid_t, teacher_temperature), each None or the 0-dim tensor the
    caller passed (its value goes into KDParams inside the custom op: params.resolve).
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
            "vocab_mismatch='truncate' to use the first min(V_s, V_t) columns of both "
            "(only meaningful for one tokenizer padded to two sizes)"
        )
    v = min(vs, vt)
    if v < 1:
        raise ValueError(f"the vocabulary dimension must be >= 1, got {v}")
    if vs != vt:
        _warn_unrelated_vocabularies(vs, vt)
    device = student_logits.device
    temperature, temp_tensor = _check_dynamic("temperature", temperature, device,
                                              check_temperature)
    check_choice("temperature_scaling", temperature_scaling, TEMPERATURE_SCALINGS)
    t_temp, t_temp_tensor = None, None
    if teacher_temperature is not None:
        t_temp, t_temp_tensor = _check_dynamic("teacher_temperature", teacher_temperature,
                                               device, check_teacher_temperature)
    beta = check_number("beta", beta, lo=0.0, hi=1.0)
    alpha = check_number("alpha", alpha, lo=0.0, hi=1.0)
    dkd_alpha = check_number("dkd_alpha", dkd_alpha, lo=0.0)
    dkd_beta = check_number("dkd_beta", dkd_beta, lo=0.0)
    nkd_gamma = check_number("nkd_gamma", nkd_gamma, lo=0.0)
    check_unused(divergence, beta=beta, alpha=alpha, dkd_alpha=dkd_alpha, dkd_beta=dkd_beta,
                 nkd_gamma=nkd_gamma)
    if divergence in NEEDS_LABELS and labels is None:
        raise ValueError(f"divergence={divergence!r} needs labels: it splits each row into "
                         "the target class (the label) and the other classes")
    if taid_t is not None and divergence != "taid":
        raise ValueError(f"taid_t has no effect with divergence={divergence!r}: only 'taid' "
                         "uses it. Drop taid_t (or pass divergence='taid')")
    taid_tensor = None
    if taid_t is not None:
        taid_t, taid_tensor = _check_dynamic("taid_t", taid_t, device, check_taid_t)
    elif divergence == "taid":
        raise ValueError("divergence='taid' needs taid_t in [0, 1] (see TAIDSchedule)")
    hard_w = check_number("hard_label_weight", hard_label_weight, lo=0.0)
    soft_w = check_number("soft_label_weight", soft_label_weight, lo=0.0)
    if hard_w != 0.0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the hard-label cross-entropy)")
    ignore_index, normalizer = check_row_args(
        labels, lead_s, v, device, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer)
    # a tensor's value is filled in by params.resolve, inside the custom op
    prm = canonical(
        divergence, beta=beta, alpha=alpha, taid_t=0.5 if taid_tensor is not None else taid_t,
        temperature=1.0 if temp_tensor is not None else temperature, soft_w=soft_w,
        hard_w=hard_w, ignore_index=ignore_index, dkd_alpha=dkd_alpha, dkd_beta=dkd_beta,
        nkd_gamma=nkd_gamma, teacher_temperature=1.0 if t_temp_tensor is not None else t_temp,
        tau_squared=temperature_scaling == "tau_squared",
    )
    return prm, v, normalizer, (temp_tensor, taid_tensor, t_temp_tensor)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = BETA_DEFAULT,
    alpha: float = ALPHA_DEFAULT,
    taid_t: float | torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    vocab_mismatch: VocabMismatch = "error",
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
    dkd_alpha: float = DKD_ALPHA_DEFAULT,
    dkd_beta: float = DKD_BETA_DEFAULT,
    nkd_gamma: float = NKD_GAMMA_DEFAULT,
    teacher_temperature: float | torch.Tensor | None = None,
    temperature_scaling: TemperatureScaling = "none",
    return_components: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Knowledge-distillation loss between student and teacher logits (docs/spec.md §1).

    Args:
        student_logits: [..., V_s] float tensor (fp16/bf16/fp32/fp64); gets the gradient.
        teacher_logits: [..., V_t] float tensor, same leading shape; treated as a constant.
        labels: optional [...] integer tensor; rows equal to `ignore_index` are ignored.
        divergence: forward_kl | reverse_kl | jsd | skew_forward_kl | skew_reverse_kl |
            tvd | taid | dkd | nkd | cosine (dkd and nkd need labels).
        beta: jsd mixture weight in [0, 1] (0: forward KL, 1: reverse KL, as TRL); another
            divergence with a non-default beta raises ValueError.
        alpha: skew KL mixture weight in [0, 1]; only the skew divergences take a
            non-default alpha.
        taid_t: TAID interpolation λ in [0, 1] (required for divergence='taid'): a number,
            or a 0-dim tensor (read inside the custom op: torch.compile neither recompiles
            for a new value nor breaks the graph).
        temperature: τ > 0; both distributions are softmax(logits / τ); no τ² factor. A
            number or a 0-dim tensor (as taid_t).
        reduction: 'none' ([...] float32 per-row losses) | 'sum' | 'mean'.
        normalizer: denominator of 'mean' (number >= 0, 0-dim or 1-element tensor), default
            the number of valid rows (at least 1). 0 is allowed when no row is valid (the
            loss and gradient are then 0; docs/spec.md).
        hard_label_weight, soft_label_weight: L_n = soft·D_n + hard·CE(s_n, y_n).
        vocab_mismatch: 'error' | 'truncate' (use the first min(V_s, V_t) columns).
        vocab_parallel: a `VocabParallel`: this rank holds vocabulary columns
            [start, stop) of both logits (labels stay global ids); every rank of its
            group returns the full-vocabulary loss and gets its own columns' gradient
            (docs/vocab_parallel.md; backend 'torch' or 'triton', 'auto' takes torch).
            DTensor logits sharded on the last dim imply it.
        backend: 'auto' | 'torch' | 'triton' | 'cuda'.
        dkd_alpha, dkd_beta: DKD's weights (>= 0) of TCKD and NCKD, D = α·TCKD + β·NCKD
            (the paper's 1 and 8); only divergence='dkd' takes non-default values.
        nkd_gamma: NKD's weight γ >= 0 of its non-target term (the paper's 1.5); only
            divergence='nkd' takes a non-default value.
        teacher_temperature: τ_t > 0 of the teacher, p = softmax(t/τ_t) while
            q = softmax(s/τ) (GOLD, CTKD); None: τ_t = τ. A number or a 0-dim tensor (as
            temperature).
        temperature_scaling: 'none' | 'tau_squared' (the soft term times τ², τ the
            student's temperature: Hinton's scaling; the hard-label term is not scaled).
        return_components: return (total, soft, hard), soft and hard reduced like the
            total, total = soft_label_weight·soft + hard_label_weight·hard (Liger's
            return_soft_hard_loss); soft and hard are detached.

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'; with return_components a
        tuple (total, soft, hard) of such tensors.
    """
    call = dict(locals())  # the arguments, for a part return_components computes apart
    vocab_parallel, tens = unwrap_dtensors(vocab_parallel, student_logits=student_logits,
                                           teacher_logits=teacher_logits, labels=labels)
    s = check_float_tensor("student_logits", tens["student_logits"])
    t = check_float_tensor("teacher_logits", tens["teacher_logits"])
    labels = tens["labels"]
    device = check_same_device(student_logits=s, teacher_logits=t)
    shards = None
    if vocab_parallel is not None:
        vp_be = vocab_parallel_backend(backend, device)  # before any collective
        check_vp_divergence("kd_loss", divergence, vp_be)
        shards = check_vocab_parallel(vocab_parallel, "kd_loss", backend,
                                      (s.shape[-1], t.shape[-1]), math.prod(s.shape[:-1]),
                                      device)
    prm, v, normalizer, dynamic = prepare_kd_args(
        global_shape(s, shards), global_shape(t, shards), labels, divergence=divergence,
        beta=beta, alpha=alpha, taid_t=taid_t,
        temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer, hard_label_weight=hard_label_weight,
        soft_label_weight=soft_label_weight, vocab_mismatch=vocab_mismatch,
        dkd_alpha=dkd_alpha, dkd_beta=dkd_beta, nkd_gamma=nkd_gamma,
        teacher_temperature=teacher_temperature, temperature_scaling=temperature_scaling,
    )
    want_parts = check_return_components(divergence, return_components)
    parts = new_parts(math.prod(s.shape[:-1]), device, want_parts)
    if shards is not None:
        prm = resolve(prm, *dynamic)  # (collectives: not a traced path)
        total = row_loss(KDVocabParallelFunction, kd_fwd_vocab_parallel, s, labels,
                         as_rows(t.detach()), prm, shards, parts, reduction=reduction,
                         normalizer=normalizer, ignore_index=prm.ignore_index, backend=vp_be)
    else:
        be = KD_FWD.resolve(backend, device, s_dtype=s.dtype, t_dtype=t.dtype)
        # rows at one or two strides (a [B, T-1, V] slice of [B, T, V]) reach the kernels
        # without a copy
        s_rows, t_rows = row_views(s, t.detach())
        temp_tensor, taid_tensor, t_temp_tensor = dynamic
        total = row_loss(KDLossFunction, kd_fwd, s, labels, t_rows, *prm[:6], v, temp_tensor,
                         taid_tensor, prm.inv_temp_t, prm.tau_sq, t_temp_tensor, parts,
                         reduction=reduction, normalizer=normalizer,
                         ignore_index=prm.ignore_index, backend=be, rows=s_rows)
    if parts is None:
        return total
    y = labels.reshape(-1) if labels is not None else None
    scale = loss_scale(reduction, y, parts.shape[0], normalizer, prm.ignore_index, device,
                       compute_dtype(s))  # (row_loss's)
    soft, hard = components(parts, scale, reduction=reduction, lead=s.shape[:-1],
                            soft_w=soft_label_weight, hard_w=hard_label_weight,
                            has_labels=labels is not None, rerun=rerun_with(kd_loss, call))
    return total, soft, hard
