"""`topk_kd_loss`: validation, backend dispatch and the autograd.Function (docs/spec.md §5)."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import torch

from .._core.backend import Backend, BackendUnavailableError
from .._core.codes import Div
from .._core.rowgrad import row_loss, row_loss_function
from .._core.validate import (
    Reduction,
    check_choice,
    check_float_tensor,
    check_int_tensor,
    check_number,
    check_row_args,
    check_same_device,
)
from ..kd.components import TEMPERATURE_SCALINGS, TemperatureScaling
from ..kd.parallel import vocab_parallel_backend
from ..parallel import VocabParallel, check_vocab_parallel, unwrap_dtensors
from .ops import TOPK_KD_FWD, topk_kd_fwd
from .parallel import topk_kd_fwd_vocab_parallel, vocab_parallel_reason

TopKDivergence = Literal["forward_kl", "reverse_kl", "jsd", "taid"]
TopKValues = Literal["logits", "logprobs"]
TopKTail = Literal["renormalize", "bucket"]
TOPK_DIVERGENCES: tuple[str, ...] = get_args(TopKDivergence)
VALUES: tuple[str, ...] = get_args(TopKValues)
TAILS: tuple[str, ...] = get_args(TopKTail)
# Slack for log-probabilities rounded in low precision: Σ exp(values) may exceed 1 by this.
_LOGPROB_SLACK = 1e-2

# Forward computes the per-row losses and (if needed) the scaled gradient in one pass over
# the rows; backward only rescales the stored gradient by the upstream gradient.
TopKKDFunction = row_loss_function("topk_kd_loss", topk_kd_fwd)
TopKVocabParallelFunction = row_loss_function("topk_kd_loss", topk_kd_fwd_vocab_parallel)


def _check_indices(idx: torch.Tensor, v: int) -> None:
    """Values in [−1, V), no class twice in a row (CPU tensors only: no host sync on GPU;
    skipped while torch.compile traces, where values are not known)."""
    if idx.device.type != "cpu" or idx.numel() == 0 or torch.compiler.is_compiling():
        return
    bad = (idx < -1) | (idx >= v)
    if bool(bad.any()):
        first = idx[bad][0].item()
        raise ValueError(
            f"teacher_topk_indices must be class indices in [0, {v}) or -1 (padding); "
            f"found {first}"
        )
    srt = torch.sort(idx, dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    if bool(dup.any()):
        first = srt[..., 1:][dup][0].item()
        raise ValueError(
            f"teacher_topk_indices must not repeat a class within a row; class {first} "
            "appears twice (pad unused slots with -1)"
        )


def _check_logprobs(vals: torch.Tensor, idx: torch.Tensor, labels, ignore_index: int) -> None:
    """Non-padded log-probabilities of a counted row must have Σ exp <= 1 (CPU tensors
    only, not traced). NaN is data, not an argument error: it makes the row's loss NaN."""
    if vals.device.type != "cpu" or vals.numel() == 0 or torch.compiler.is_compiling():
        return
    u = vals.double().masked_fill(idx < 0, float("-inf"))
    lse = torch.logsumexp(u, -1)
    if labels is not None:
        lse = torch.where(labels == ignore_index, float("-inf"), lse)
    too_big = lse > _LOGPROB_SLACK  # (NaN compares False)
    if bool(too_big.any()):
        worst = lse[too_big].max().exp().item()
        raise ValueError(
            "teacher_topk_values with values='logprobs' must be log-probabilities over the "
            f"full vocabulary (Σ exp(values) <= 1 per row); found a row summing to {worst:.4g}. "
            "Pass values='logits' for unnormalised scores"
        )


class TopKArgs(NamedTuple):
    """The validated top-k arguments, in the launcher's form (`topk_kd_fwd`)."""

    idx: torch.Tensor  # [N, k] (−1 = padding)
    vals: torch.Tensor  # [N, k], detached
    code: int  # Div.FWD_KL, REV_KL, JSD (0 < w < 1), TAID (0 < w < 1) or ZERO
    w: float  # the mixture weight: β (jsd), λ = taid_t (taid)
    inv_temp: float
    logprobs: bool
    bucket: bool
    ignore_index: int
    normalizer: float | torch.Tensor | None
    soft_w: float  # soft_label_weight (0 when the divergence term is dropped: ZERO)
    hard_w: float  # hard_label_weight

    @property
    def launch_args(self) -> tuple:
        """The launcher's arguments after idx, vals (`topk_kd_fwd`)."""
        return (self.code, self.w, self.inv_temp, self.logprobs, self.bucket,
                self.ignore_index, self.soft_w, self.hard_w)


def refuse_vocab_parallel(op: str, backend: str, a: TopKArgs) -> None:
    """BackendUnavailableError when the vocabulary-parallel launcher of `backend` lacks
    an option of `a` (kdkernels/topk/parallel.py says which). Every rank raises alike."""
    why = vocab_parallel_reason(backend, div=a.code, hard_label=a.hard_w != 0.0)
    if why is not None:
        raise BackendUnavailableError(f"{op} with vocab_parallel: {why}")


def check_topk_tensors(idx, vals) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's indices (an integer tensor) and values (a float tensor)."""
    return (check_int_tensor("teacher_topk_indices", idx),
            check_float_tensor("teacher_topk_values", vals))


def prepare_topk_args(lead: tuple, v: int, device, idx: torch.Tensor, vals: torch.Tensor,
                      labels, *, values, tail, divergence, beta, temperature, ignore_index,
                      reduction, normalizer, taid_t=None, hard_label_weight=0.0,
                      soft_label_weight=1.0, temperature_scaling="none") -> TopKArgs:
    """Every check of the top-k keywords and tensors against a student of leading shape
    `lead` and vocabulary `v` (shared by `topk_kd_loss` and `fused_linear_topk_kd_loss`;
    the tensors' types and devices are checked before)."""
    check_choice("values", values, VALUES)
    check_choice("tail", tail, TAILS)
    check_choice("divergence", divergence, TOPK_DIVERGENCES)
    if v < 1:
        raise ValueError(f"the vocabulary dimension must be >= 1, got {v}")
    lead = tuple(lead)
    if idx.dim() < 1 or tuple(idx.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_topk_indices must have shape [..., k] with the student's leading shape "
            f"{lead}, got {tuple(idx.shape)}"
        )
    if tuple(vals.shape) != tuple(idx.shape):
        raise ValueError(
            f"teacher_topk_values must have the shape of teacher_topk_indices "
            f"{tuple(idx.shape)}, got {tuple(vals.shape)}"
        )
    k = idx.shape[-1]
    if not 1 <= k <= v:
        raise ValueError(
            f"teacher_topk_indices must hold k entries per row with 1 <= k <= V={v}, got k={k}"
        )
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    beta = check_number("beta", beta, lo=0.0, hi=1.0)
    if taid_t is not None:
        taid_t = check_number("taid_t", taid_t, lo=0.0, hi=1.0)
    elif divergence == "taid":
        raise ValueError("divergence='taid' needs taid_t in [0, 1] (see TAIDSchedule)")
    hard_w = check_number("hard_label_weight", hard_label_weight, lo=0.0)
    soft_w = check_number("soft_label_weight", soft_label_weight, lo=0.0)
    check_choice("temperature_scaling", temperature_scaling, TEMPERATURE_SCALINGS)
    if temperature_scaling == "tau_squared":  # the soft term times τ² (kd_loss's rule)
        soft_w = soft_w * temperature * temperature
    if hard_w != 0.0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the hard-label cross-entropy)")
    if values == "logprobs" and temperature != 1.0:
        raise ValueError(
            "values='logprobs' needs temperature=1.0 (stored log-probabilities cannot be "
            f"re-tempered); got temperature={temperature:g}. Store logits and use values='logits'"
        )
    if tail == "bucket" and values != "logprobs":
        raise ValueError(
            "tail='bucket' needs values='logprobs': logits over k entries carry no tail mass; "
            "use tail='renormalize' with values='logits'"
        )
    ignore_index, normalizer = check_row_args(
        labels, lead, v, device, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer)
    _check_indices(idx, v)
    if values == "logprobs":
        _check_logprobs(vals, idx, labels, ignore_index)
    code, w = _canonical(divergence, beta, taid_t, soft_w)
    return TopKArgs(idx.reshape(-1, k), vals.detach().reshape(-1, k), code, w,
                    1.0 / temperature, values == "logprobs", tail == "bucket", ignore_index,
                    normalizer, soft_w if code != Div.ZERO else 0.0, hard_w)


def _canonical(divergence: str, beta: float, taid_t, soft_w: float) -> tuple[int, float]:
    """(kernel code, mixture weight), so that kernels never see a log 0 weight: jsd's
    endpoints are the plain KLs (TRL); TAID at λ = 1 is forward KL and at λ = 0
    identically 0 (r = q); soft_label_weight = 0 drops the divergence (ZERO)."""
    code = {"forward_kl": Div.FWD_KL, "reverse_kl": Div.REV_KL, "jsd": Div.JSD,
            "taid": Div.TAID}[divergence]
    w = taid_t if code == Div.TAID else beta
    if code == Div.JSD and beta in (0.0, 1.0):
        code = Div.FWD_KL if beta == 0.0 else Div.REV_KL
    if code == Div.TAID and taid_t in (0.0, 1.0):
        code = Div.FWD_KL if taid_t == 1.0 else Div.ZERO
    if soft_w == 0.0:
        code = Div.ZERO
    return int(code), float(w)


def topk_facts(s_dtype: torch.dtype, a: TopKArgs) -> dict:
    """What the verifiers of TOPK_KD_FWD are told about a call: the student logits' dtype,
    the teacher values' dtype, k, whether the tail bucket is used, the divergence code
    and whether the hard-label term is on."""
    return dict(s_dtype=s_dtype, t_dtype=a.vals.dtype, k=a.idx.shape[-1], bucket=a.bucket,
                div=a.code, hard_label=a.hard_w != 0.0)


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    teacher_topk_values: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    values: TopKValues = "logits",
    tail: TopKTail = "renormalize",
    divergence: TopKDivergence = "forward_kl",
    beta: float = 0.5,
    taid_t: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    vocab_parallel: VocabParallel | None = None,
    backend: Backend = "auto",
    temperature_scaling: TemperatureScaling = "none",
) -> torch.Tensor:
    """Distillation from a teacher's stored top-k entries (docs/spec.md §5).

    Student log-probs log_softmax(s/τ) over the full vocabulary are gathered at the
    teacher's indices. Teacher: values='logits' → softmax(values/τ) over the k entries;
    values='logprobs' → exp(values), full-vocabulary probabilities (τ must be 1).
    tail='renormalize': both sides restricted to the k entries and renormalised;
    tail='bucket' (values='logprobs' only): a (k+1)-th entry holds each side's
    remaining mass 1 − Σ. The divergence (as in `kd_loss`) is taken over those entries;
    TAID's target is r = softmax((1−λ)·log q + λ·log p) over them (q held constant).
    Row loss L_n = soft_label_weight·D_n + hard_label_weight·CE(s_n, labels_n), the
    cross-entropy on the untempered logits over the full vocabulary.

    Args:
        student_logits: [..., V] float tensor (fp16/bf16/fp32/fp64); gets the gradient.
        teacher_topk_indices: [..., k] integer tensor, classes in [0, V) without repeats
            in a row, −1 for padding (1 <= k <= V). Checked on CPU tensors only.
        teacher_topk_values: [..., k] float tensor, the teacher's logits or log-probs at
            those indices (ignored at padding); a constant.
        labels: optional [...] integer tensor: rows equal to `ignore_index` are ignored;
            the hard-label term's classes (needed when hard_label_weight > 0).
        values: 'logits' | 'logprobs'.
        tail: 'renormalize' | 'bucket'.
        divergence: 'forward_kl' (KL(p‖q)) | 'reverse_kl' (KL(q‖p)) | 'jsd' | 'taid'
            (KL(r‖q), r TAID's interpolated target over the entries).
        beta: jsd mixture weight in [0, 1] (0: forward KL, 1: reverse KL, as TRL).
        taid_t: TAID interpolation λ in [0, 1] (required for divergence='taid').
        temperature: τ > 0 (student always; teacher for values='logits'); no τ² factor.
        ignore_index: label value of ignored rows.
        reduction: 'none' ([...] float32 per-row losses, 0 at ignored rows) | 'sum' | 'mean'.
        normalizer: denominator of 'mean' (positive number or 0-dim tensor), default the
            number of valid rows (at least 1).
        hard_label_weight, soft_label_weight: L_n = soft·D_n + hard·CE(s_n, y_n), as in
            `kd_loss` (>= 0; soft 0 reads no teacher entry).
        vocab_parallel: a `VocabParallel`: this rank holds student columns
            [start, stop) (the indices stay global ids); every rank of its group returns
            the full-vocabulary loss and gets its own columns' gradient
            (docs/vocab_parallel.md; backend 'torch', or 'triton' when asked for;
            hard_label_weight > 0 runs on 'torch' only).
            DTensor student logits sharded on the last dim imply it.
        backend: 'auto' | 'torch' | 'triton' | 'cuda' ('auto' takes torch; triton and
            cuda only when asked for; cuda takes fp16/bf16/fp32 student logits and
            neither 'taid', hard_label_weight > 0 nor soft_label_weight = 0).
        temperature_scaling: 'none' | 'tau_squared' (the soft term times τ², as kd_loss).

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    vocab_parallel, tens = unwrap_dtensors(
        vocab_parallel, student_logits=student_logits, teacher_topk_indices=teacher_topk_indices,
        teacher_topk_values=teacher_topk_values, labels=labels)
    s = check_float_tensor("student_logits", tens["student_logits"])
    idx, vals = check_topk_tensors(tens["teacher_topk_indices"], tens["teacher_topk_values"])
    labels = tens["labels"]
    device = check_same_device(student_logits=s, teacher_topk_indices=idx,
                               teacher_topk_values=vals)
    shards, v = None, s.shape[-1]
    if vocab_parallel is not None:
        vp_be = vocab_parallel_backend(backend, device, "topk_kd_loss")  # before collectives
        shards = check_vocab_parallel(vocab_parallel, "topk_kd_loss", backend, (v,),
                                      math.prod(s.shape[:-1]), device)
        v = shards.v
    a = prepare_topk_args(
        s.shape[:-1], v, device, idx, vals, labels, values=values, tail=tail,
        divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
        reduction=reduction, normalizer=normalizer, taid_t=taid_t,
        hard_label_weight=hard_label_weight, soft_label_weight=soft_label_weight,
        temperature_scaling=temperature_scaling)
    if shards is not None:
        refuse_vocab_parallel("topk_kd_loss", vp_be, a)  # before the loss's collectives
        return row_loss(TopKVocabParallelFunction, topk_kd_fwd_vocab_parallel, s, labels,
                        a.idx, a.vals, *a.launch_args[:6], shards, *a.launch_args[6:],
                        reduction=reduction, normalizer=a.normalizer,
                        ignore_index=a.ignore_index, backend=vp_be)
    be = TOPK_KD_FWD.resolve(backend, device, **topk_facts(s.dtype, a))
    return row_loss(TopKKDFunction, topk_kd_fwd, s, labels, a.idx, a.vals, *a.launch_args,
                    reduction=reduction, normalizer=a.normalizer,
                    ignore_index=a.ignore_index, backend=be)
