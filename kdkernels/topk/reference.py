"""The oracle for `topk_kd_loss`: docs/spec.md §5 written directly, differentiated by autograd.

Row by row and in probability space on purpose: the student's full-vocabulary
distribution is formed, gathered at the non-padded indices and renormalised (or given
a tail entry holding the mass of the other classes), the teacher's probabilities are
built from the values, and the textbook divergence is taken. TAID's target is the
normalised q^(1−λ)·p^λ over those entries, q held constant; the hard-label term is
`F.cross_entropy` of the untempered row. Gradients come from autograd, which checks the
fast path's hand-derived entry/tail gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kd.reference import reduce_ref


def _kl(x, y):
    """Σ x log(x/y) with 0 log 0 = 0."""
    return torch.where(x > 0, x * (torch.log(x) - torch.log(y)), torch.zeros_like(x)).sum()


def _divergence(p, q, divergence, beta, taid_t):
    if divergence == "taid":
        # r ∝ q^(1−λ) p^λ over the entries (log space: a 0 stays 0), q constant
        logq, logp = torch.log(q.detach()), torch.log(p)
        if taid_t in (0, 1):  # (0 · log 0 would be NaN)
            mix = logq if taid_t == 0 else logp
        else:
            mix = (1 - taid_t) * logq + taid_t * logp
        return _kl(torch.softmax(mix, 0), q)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _kl(p, q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _row_divergence(s, idx, vals, v, values, tail, divergence, beta, taid_t, temperature):
    """D of one row s [V] against its entries idx, vals [k]."""
    keep = idx >= 0
    sel = idx[keep]
    u = vals[keep]
    q_full = torch.softmax(s / temperature, 0)
    q = q_full[sel]
    p = torch.softmax(u / temperature, 0) if values == "logits" else torch.exp(u)
    if tail == "renormalize":
        if sel.numel() == 0:
            return s.new_zeros(())
        p, q = p / p.sum(), q / q.sum()
    else:
        rest = torch.ones(v, dtype=torch.bool)
        rest[sel] = False
        if bool(rest.any()):
            # 1 − Σp as −expm1(LSE log p): the subtraction would cancel where the
            # teacher's entries hold nearly all its mass (std-30 spreads)
            p_tail = -torch.expm1(torch.logsumexp(torch.log(p), 0))
            p = torch.cat([p, p_tail.clamp_min(0).reshape(1)])
            q = torch.cat([q, q_full[rest].sum().reshape(1)])
    return _divergence(p, q, divergence, beta, taid_t)


def topk_kd_loss_ref(
    student_logits,
    teacher_topk_indices,
    teacher_topk_values,
    labels=None,
    *,
    values="logits",
    tail="renormalize",
    divergence="forward_kl",
    beta=0.5,
    taid_t=None,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    hard_label_weight=0.0,
    soft_label_weight=1.0,
    compute_dtype=torch.float64,
):
    """docs/spec.md §5 in `compute_dtype` (no validation: the oracle). Loss in `compute_dtype`.

    student_logits: [..., V]; teacher_topk_indices, teacher_topk_values: [..., k];
    labels: [...] or None. Gradients flow to `student_logits` through autograd.
    """
    v = student_logits.shape[-1]
    k = teacher_topk_indices.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, v).to(compute_dtype)
    idx = teacher_topk_indices.reshape(-1, k)
    vals = teacher_topk_values.reshape(-1, k).to(compute_dtype).detach()
    y = labels.reshape(-1) if labels is not None else None
    rows = []
    for n in range(s.shape[0]):
        if y is not None and y[n] == ignore_index:
            rows.append(s.new_zeros(()))
            continue
        row = s.new_zeros(())
        if soft_label_weight != 0:
            d = _row_divergence(s[n], idx[n], vals[n], v, values, tail, divergence, beta,
                                taid_t, temperature)
            row = row + soft_label_weight * d
        if hard_label_weight != 0:
            row = row + hard_label_weight * F.cross_entropy(s[n], y[n].long())
        rows.append(row)
    out = torch.stack(rows) if rows else s.new_zeros(0)
    n_valid = s.shape[0] if y is None else int((y != ignore_index).sum())
    return reduce_ref(out, lead, reduction, normalizer, n_valid)
