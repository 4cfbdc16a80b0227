"""The oracle for `uld_loss`: docs/spec.md §7 written literally, differentiated by autograd.

Both softmaxes over the full vocabularies, each sorted in descending order (a stable sort:
equal probabilities by lower class index), the shorter zero-padded to the longer, the
first K positions kept, and the L1 distance. Autograd differentiates the sort (a gather)
and |·| (sign, 0 at 0): the gradient the fast backends compute by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core.oracle import reduce_ref


def _sorted_probs(x, temperature, width):
    """softmax(x/τ) [N, V] sorted descending (ties by lower index), zero-padded to width."""
    p = torch.softmax(x / temperature, -1)
    p = torch.sort(p, dim=-1, descending=True, stable=True).values
    return F.pad(p, (0, width - p.shape[-1]))


def uld_loss_ref(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    teacher_temperature=None,
    top_k=None,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    hard_label_weight=0.0,
    soft_label_weight=1.0,
    compute_dtype=torch.float64,
):
    """docs/spec.md §7 in `compute_dtype` (no validation: the oracle). Loss in `compute_dtype`.

    student_logits: [..., V_s]; teacher_logits: [..., V_t]; labels: [...] or None.
    Gradients flow to `student_logits` through autograd.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vs).to(compute_dtype)
    t = teacher_logits.reshape(-1, vt).to(compute_dtype).detach()
    if labels is not None:
        y = labels.reshape(-1)
        valid = y != ignore_index
    else:
        y, valid = None, torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    # ignored rows are replaced before any arithmetic: their NaN/inf never reach autograd
    s = torch.where(valid.unsqueeze(-1), s, 0.0)
    t = torch.where(valid.unsqueeze(-1), t, 0.0)
    width = max(vs, vt)
    k = width if top_k is None else min(top_k, width)
    tau_t = temperature if teacher_temperature is None else teacher_temperature
    rows = torch.zeros(s.shape[0], dtype=compute_dtype, device=s.device)
    if soft_label_weight != 0:  # (the teacher is not read otherwise)
        ps = _sorted_probs(s, temperature, width)[:, :k]
        pt = _sorted_probs(t, tau_t, width)[:, :k]
        rows = rows + soft_label_weight * (ps - pt).abs().sum(-1)
    if hard_label_weight != 0:
        ce = F.cross_entropy(s, torch.where(valid, y, 0), reduction="none")
        rows = rows + hard_label_weight * ce
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return reduce_ref(rows, lead, reduction, normalizer, valid.sum())
