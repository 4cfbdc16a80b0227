"""`plackett_luce_loss`: validation, dispatch and the autograd (docs/spec.md §3)."""

from __future__ import annotations

import torch

from .._core.backend import Backend
from .._core.rowgrad import as_rows, row_loss, row_loss_function
from .._core.rowmask import check_row_mask
from .._core.validate import (
    Reduction,
    check_float_tensor,
    check_int,
    check_number,
    check_row_args,
    check_same_device,
)
from .ops import PLD_FWD, pld_fwd

# Forward computes the per-row losses and (if needed) the scaled gradient in one pass over
# the rows; backward only rescales the stored gradient by the upstream gradient.
PlackettLuceFunction = row_loss_function("plackett_luce_loss", pld_fwd)


def _masked_labels(labels, keep, t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Labels that say what `mask` says: ignore_index where keep is False. Without labels, a
    kept row gets its teacher's first class in PLD's order (the first maximum: ties by
    lower index, NaN above every number), so that putting the label first changes nothing
    and the row keeps the plain teacher ranking."""
    if labels is None:
        labels = t.detach().argmax(-1)
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))


def plackett_luce_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Plackett-Luce distillation loss (PLD, docs/spec.md §3).

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
        ignore_index, reduction, normalizer: as in `kd_loss` ('none' gives [...] float32
            per-row losses, 0 at ignored rows).
        mask: optional [...] bool (or 0/1 integer) tensor, True = keep the row: a row
            masked out is ignored as a row labelled `ignore_index` is (with labels too, a
            row counts where both keep it). Without labels a kept row keeps the plain
            teacher order (it is given the teacher's first class, which that order puts
            first anyway: one more read of the teacher logits).
        backend: 'auto' | 'torch' | 'triton' | 'cuda' ('auto' takes torch: the GPU
            kernels join it once a GPU run validates them; cuda: not float64).

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
    ignore_index, normalizer = check_row_args(
        labels, s.shape[:-1], v, device, ignore_index=ignore_index, reduction=reduction,
        normalizer=normalizer)
    keep = check_row_mask(mask, s.shape[:-1], device)
    if keep is not None:
        labels = _masked_labels(labels, keep, t, ignore_index)
    be = PLD_FWD.resolve(backend, device, s_dtype=s.dtype, t_dtype=t.dtype)
    return row_loss(PlackettLuceFunction, pld_fwd, s, labels, as_rows(t.detach()),
                    1.0 / temperature, k, ignore_index, reduction=reduction,
                    normalizer=normalizer, ignore_index=ignore_index, backend=be)
