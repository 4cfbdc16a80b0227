"""Random-sampling KD (docs/spec.md §8, docs/sampled_kd.md): `sample_teacher` draws a
sparse, unbiased estimate p̂ of the teacher's distribution; `sampled_kd_loss` and
`fused_linear_sampled_kd_loss` train the student on KL(p̂ ‖ q).

The losses are top-k KD with the bucket tail over the sampled ids (`topk_kd_loss` /
`fused_linear_topk_kd_loss`, values = log p̂): with Σ p̂ = 1 the tail holds no teacher
mass, so the loss is exactly Σ_i p̂_i log(p̂_i / q_i) and its gradient with respect to
the tempered logits is q − p̂ over the full vocabulary (every backend of those ops).
"""

from __future__ import annotations

import torch

from .._core.backend import Backend
from .._core.rowgrad import row_loss
from .._core.validate import (
    Reduction,
    check_float_tensor,
    check_int,
    check_labels,
    check_number,
)
from ..fused_linear import fused_linear_topk_kd_loss
from ..topk import topk_kd_loss
from ..topk.function import TopKKDFunction, prepare_topk_args, topk_facts
from ..topk.ops import TOPK_KD_FWD, topk_kd_fwd
from .merge import merge_draws
from .ops import SAMPLE
from .storage import TeacherSamples

# every loss call: forward KL toward the stored log p̂ with the (empty) tail bucket
_TOPK = dict(values="logprobs", tail="bucket", divergence="forward_kl")


def sample_teacher(
    teacher_logits: torch.Tensor,
    k: int,
    *,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    proposal_temperature: float | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> TeacherSamples:
    """k draws with replacement per token from the teacher, merged into a sparse estimate.

    p = softmax(t/τ) is estimated; the k ids are drawn from r = softmax(t/τ_r)
    (τ_r = proposal_temperature, default τ: r = p). Distinct ids are kept with
    p̂_i = c_i / k (r = p: E[p̂] = p exactly), else the self-normalised importance weights
    c_i ρ_i / Σ_j c_j ρ_j, ρ = p / r (biased by O(1/k), consistent).

    Args:
        teacher_logits: [..., V] float tensor; read, never differentiated.
        k: draws per row (>= 1); the record holds min(k, V) slots per row.
        labels: optional [...] integer tensor; rows equal to ignore_index are not read
            and get no samples (all padding).
        temperature: τ > 0 of the estimated distribution.
        proposal_temperature: τ_r > 0 of the proposal (None: τ).
        ignore_index: label value of skipped rows.
        generator: a torch.Generator (any device) or None (the default generator): the
            same seed gives the same draws on a backend; the backends' streams differ.
        backend: 'auto' | 'torch' | 'triton' ('auto' takes torch; triton when asked for).

    Returns:
        TeacherSamples with indices [..., min(k, V)] int32 (ascending, −1 padding) and
        weights float32 (p̂; NaN in the first slot of a counted row whose logits hold NaN
        or +inf or no finite entry).
    """
    x = check_float_tensor("teacher_logits", teacher_logits)
    v = x.shape[-1]
    if v < 1:
        raise ValueError(f"the vocabulary dimension must be >= 1, got {v}")
    k = check_int("k", k, lo=1)
    tau = check_number("temperature", temperature, lo=0.0, lo_open=True)
    tau_r = (tau if proposal_temperature is None else
             check_number("proposal_temperature", proposal_temperature, lo=0.0, lo_open=True))
    ignore_index = check_int("ignore_index", ignore_index)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    lead = tuple(x.shape[:-1])
    check_labels(labels, lead, v, ignore_index, x.device)
    be = SAMPLE.resolve(backend, x.device)
    x2 = x.detach()
    x2 = (x2 if x2.stride(-1) == 1 else x2.contiguous()).reshape(-1, v)
    draws = torch.empty(x2.shape[0], k, dtype=torch.int32, device=x.device)
    y = labels.reshape(-1) if labels is not None else None
    SAMPLE(be, x2, k, 1.0 / tau_r, y, ignore_index, generator, draws)
    ids, w = merge_draws(draws, x2, 1.0 / tau, 1.0 / tau_r, min(k, v))
    width = ids.shape[1]
    return TeacherSamples(ids.reshape(*lead, width), w.reshape(*lead, width), v, tau, tau_r,
                          k)


def _check_samples(samples, lead: tuple, v: int, device) -> TeacherSamples:
    if not isinstance(samples, TeacherSamples):
        raise TypeError(f"samples must be a TeacherSamples (from sample_teacher), got "
                        f"{type(samples).__name__}")
    if samples.vocab_size != v:
        raise ValueError(f"samples were drawn over a vocabulary of {samples.vocab_size} "
                         f"classes, the student has {v}")
    if tuple(samples.indices.shape[:-1]) != tuple(lead):
        raise ValueError(f"samples must have the student's leading shape {tuple(lead)}, got "
                         f"{tuple(samples.indices.shape[:-1])}")
    if samples.indices.device != device:
        raise ValueError(f"samples are on {samples.indices.device} but the student is on "
                         f"{device}")
    return samples


def _loss_args(samples: TeacherSamples, labels, temperature, hard_label_weight,
               soft_label_weight):
    tau = (samples.temperature if temperature is None else
           check_number("temperature", temperature, lo=0.0, lo_open=True))
    hard = check_number("hard_label_weight", hard_label_weight, lo=0.0)
    soft = check_number("soft_label_weight", soft_label_weight, lo=0.0)
    if hard != 0.0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the hard-label cross-entropy)")
    return tau, hard, soft, samples.log_weights().detach()


def _label_ids(labels, ignore_index: int, samples: TeacherSamples):
    """The hard-label term as top-k KD toward the one-hot label (KL(δ_y ‖ q) = −log q_y,
    the cross-entropy): the label as a single entry of log-probability 0 (ignored rows:
    padding). Used where the cross-entropy needs other logits than the divergence."""
    y = labels.reshape(*labels.shape, 1)
    ids = torch.where(y == ignore_index, -1, y).to(samples.indices.dtype)
    return ids, torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    samples: TeacherSamples,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | None = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Random-sampling KD: L_n = soft·KL(p̂_n ‖ q_n) + hard·CE(s_n, y_n) (docs/spec.md §8).

    q = softmax(s/τ) over the full vocabulary, p̂ the sampled estimate (`sample_teacher`);
    ∂L/∂(s/τ) = soft·(q − p̂), whose expectation over the draws is the full forward-KL
    gradient q − p when the ids were drawn from p. The cross-entropy uses the untempered
    logits. Computed by `topk_kd_loss(s, ids, log p̂, values='logprobs', tail='bucket')`.

    Args:
        student_logits: [..., V] float tensor (fp16/bf16/fp32/fp64); gets the gradient.
        samples: TeacherSamples of the same leading shape, vocab_size V; a constant.
        labels: optional [...] integer tensor: rows equal to ignore_index are ignored;
            the hard-label term's classes (needed when hard_label_weight > 0).
        temperature: the student's τ > 0 (default: samples.temperature); no τ² factor.
            τ ≠ 1 costs nothing extra (the kernels temper the student).
        ignore_index, reduction, normalizer: as in `kd_loss`.
        hard_label_weight, soft_label_weight: >= 0, as in `kd_loss`.
        backend: 'auto' | 'torch' | 'triton' | 'cuda': `topk_kd_loss`'s backends.

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    s = check_float_tensor("student_logits", student_logits)
    smp = _check_samples(samples, s.shape[:-1], s.shape[-1], s.device)
    tau, hard, soft, vals = _loss_args(smp, labels, temperature, hard_label_weight,
                                       soft_label_weight)
    common = dict(_TOPK, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                  backend=backend)
    if tau == 1.0 or soft == 0.0:
        return topk_kd_loss(s, smp.indices, vals, labels, hard_label_weight=hard,
                            soft_label_weight=soft, **common)
    # p̂ is the target at τ already: the top-k launcher takes the log-probabilities as
    # they are and tempers only the student (inside the kernels, no copy); its hard
    # label is the untempered cross-entropy. topk_kd_loss itself refuses log-probs at
    # τ ≠ 1 (it cannot re-temper a stored distribution), so set τ after its checks.
    a = prepare_topk_args(s.shape[:-1], s.shape[-1], s.device, smp.indices, vals, labels,
                          **_TOPK, beta=0.5, temperature=1.0, ignore_index=ignore_index,
                          reduction=reduction, normalizer=normalizer,
                          hard_label_weight=hard, soft_label_weight=soft)
    a = a._replace(inv_temp=1.0 / tau)
    be = TOPK_KD_FWD.resolve(backend, s.device, **topk_facts(s.dtype, a))
    return row_loss(TopKKDFunction, topk_kd_fwd, s, labels, a.idx, a.vals, *a.launch_args,
                    reduction=reduction, normalizer=a.normalizer,
                    ignore_index=a.ignore_index, backend=be)


def fused_linear_sampled_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    samples: TeacherSamples,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | None = None,
    ignore_index: int = -100,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    student_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    chunk_size: int | None = None,
    weight_grad_accumulation: str = "float32",
    backend: Backend = "auto",
) -> torch.Tensor:
    """`sampled_kd_loss` on the logits S = f(student_hidden @ student_weightᵀ + student_bias)
    of a linear head, without materialising them (`fused_linear_topk_kd_loss`).

    The student temperature is folded into the head: f at scale m/τ and softcap c/τ is
    exactly f/τ, so τ ≠ 1 costs no copy; with τ ≠ 1 and hard_label_weight > 0 the
    untempered cross-entropy is a second pass over the head.

    Args:
        student_hidden: [..., H]; student_weight: [V, H]; student_bias: optional [V].
        samples: TeacherSamples with the hidden states' leading shape, vocab_size V.
        labels, temperature, ignore_index, hard_label_weight, soft_label_weight,
        reduction, normalizer: as in `sampled_kd_loss`.
        student_softcap, student_logit_scale, chunk_size, weight_grad_accumulation,
        backend: as in `fused_linear_topk_kd_loss`.

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    if not isinstance(student_weight, torch.Tensor) or student_weight.dim() != 2:
        raise ValueError("student_weight must be a [V, H] tensor")
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() < 1:
        raise ValueError("student_hidden must be a [..., H] tensor")
    smp = _check_samples(samples, student_hidden.shape[:-1], student_weight.shape[0],
                         student_hidden.device)
    tau, hard, soft, vals = _loss_args(smp, labels, temperature, hard_label_weight,
                                       soft_label_weight)
    common = dict(_TOPK, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer,
                  student_bias=student_bias, chunk_size=chunk_size,
                  weight_grad_accumulation=weight_grad_accumulation, backend=backend)
    head = dict(student_softcap=student_softcap, student_logit_scale=student_logit_scale)
    if tau == 1.0 or soft == 0.0:
        return fused_linear_topk_kd_loss(student_hidden, student_weight, smp.indices, vals,
                                         labels, hard_label_weight=hard,
                                         soft_label_weight=soft, **head, **common)
    scale = check_number("student_logit_scale", student_logit_scale)
    cap = student_softcap
    if cap is not None:
        cap = check_number("student_softcap", cap, lo=0.0, lo_open=True) / tau
    out = fused_linear_topk_kd_loss(student_hidden, student_weight, smp.indices, vals, labels,
                                    soft_label_weight=soft, student_softcap=cap,
                                    student_logit_scale=scale / tau, **common)
    if hard != 0.0:
        out = out + hard * fused_linear_topk_kd_loss(
            student_hidden, student_weight, *_label_ids(labels, ignore_index, smp), labels,
            **head, **common)
    return out
