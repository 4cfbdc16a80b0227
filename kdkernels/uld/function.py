"""`uld_loss`: validation, dispatch and the autograd (docs/spec.md §7)."""

from __future__ import annotations

import torch

from .._core.backend import Backend
from .._core.rowgrad import as_rows, row_loss, row_loss_function
from .._core.validate import (
    Reduction,
    check_float_tensor,
    check_int,
    check_number,
    check_row_args,
    check_same_device,
)
from .ops import ULD_FWD, uld_fwd

# Forward computes the per-row losses and (if needed) the scaled gradient; backward only
# rescales the stored gradient by the upstream gradient.
ULDFunction = row_loss_function("uld_loss", uld_fwd)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    top_k: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    hard_label_weight: float = 0.0,
    soft_label_weight: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Universal Logit Distillation loss across tokenizers (docs/spec.md §7).

    Per row, p = softmax(s/τ) over the student's V_s classes and r = softmax(t/τ_t) over
    the teacher's V_t classes (no correspondence between the two vocabularies), each
    sorted in descending order, the shorter zero-padded to the longer:
    D_n = Σ_{i<K} |p_(i) − r_(i)|, K = max(V_s, V_t), or `top_k`;
    L_n = soft_label_weight·D_n + hard_label_weight·CE(s_n, labels_n).

    Args:
        student_logits: [..., V_s] float tensor (fp16/bf16/fp32/fp64); gets the gradient.
        teacher_logits: [..., V_t] float tensor, same leading shape, any V_t >= 1;
            treated as a constant.
        labels: optional [...] integer tensor (student token ids); rows equal to
            `ignore_index` are ignored.
        temperature: τ > 0 of the student's softmax (and the teacher's, unless
            `teacher_temperature` is given). No τ² factor.
        teacher_temperature: τ_t > 0 of the teacher's softmax; None: `temperature`.
        top_k: None (K = max(V_s, V_t)) or an int in [1, max(V_s, V_t)]: only the first
            K sorted positions of both distributions count; the mass beyond them is
            ignored (the softmaxes are still over the full vocabularies).
        ignore_index, reduction, normalizer: as in `kd_loss` ('none' gives [...] float32
            per-row losses, 0 at ignored rows).
        hard_label_weight, soft_label_weight: the cross-entropy on the untempered student
            logits (needs labels) and the ULD term, as in `kd_loss`.
        backend: 'auto' | 'torch' | 'triton' ('auto' takes torch: the Triton kernel joins
            it once a GPU run validates it). There is no cuda backend: backend='cuda'
            raises BackendUnavailableError.

    Returns:
        float32 loss: a scalar, or [...] for reduction='none'.
    """
    s = check_float_tensor("student_logits", student_logits)
    t = check_float_tensor("teacher_logits", teacher_logits)
    device = check_same_device(student_logits=s, teacher_logits=t)
    lead_s, lead_t = tuple(s.shape[:-1]), tuple(t.shape[:-1])
    if lead_s != lead_t:
        raise ValueError(
            "student_logits and teacher_logits must have the same leading shape (their "
            f"vocabularies may differ), got {tuple(s.shape)} and {tuple(t.shape)}"
        )
    vs, vt = s.shape[-1], t.shape[-1]
    if min(vs, vt) < 1:
        raise ValueError(f"both vocabularies must have >= 1 class, got V_s={vs}, V_t={vt}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    tau_t = temperature
    if teacher_temperature is not None:
        tau_t = check_number("teacher_temperature", teacher_temperature, lo=0.0, lo_open=True)
    width = max(vs, vt)
    k = width if top_k is None else check_int("top_k", top_k, lo=1, hi=width)
    hard_w = check_number("hard_label_weight", hard_label_weight, lo=0.0)
    soft_w = check_number("soft_label_weight", soft_label_weight, lo=0.0)
    if hard_w != 0.0 and labels is None:
        raise ValueError("hard_label_weight > 0 needs labels (the hard-label cross-entropy)")
    ignore_index, normalizer = check_row_args(
        labels, lead_s, vs, device, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer)
    be = ULD_FWD.resolve(backend, device, s_dtype=s.dtype, t_dtype=t.dtype)
    return row_loss(ULDFunction, uld_fwd, s, labels, as_rows(t.detach()), 1.0 / temperature,
                    1.0 / tau_t, k, soft_w, hard_w, ignore_index, reduction=reduction,
                    normalizer=normalizer, ignore_index=ignore_index, backend=be)
