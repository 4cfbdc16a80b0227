"""The oracles of sampled KD (docs/spec.md, "Sampled KD"): the formulas written directly in
float64, row by row, differentiated by autograd. Tests only.
"""

from __future__ import annotations

import torch

from .._core.oracle import reduce_ref


def proposal_ref(teacher_logits, temperature):
    """softmax(t/τ) [..., V] in float64: the distribution the draws come from."""
    return torch.softmax(teacher_logits.double() / temperature, -1)


def estimate_ref(counts, teacher_logits, temperature, proposal_temperature):
    """p̂ [N, V] from dense draw counts [N, V] (Σ = k per row): c_i ρ_i / Σ_j c_j ρ_j with
    ρ = p / r, p = softmax(t/τ), r = softmax(t/τ_r) formed in full (= c / k when τ_r = τ)."""
    p = proposal_ref(teacher_logits, temperature)
    r = proposal_ref(teacher_logits, proposal_temperature)
    c = counts.double()
    rho = torch.where(c > 0, p / r, 0.0)
    num = c * rho
    return num / num.sum(-1, keepdim=True)


def sampled_kd_loss_ref(student_logits, indices, weights, labels=None, *, temperature=1.0,
                        ignore_index=-100, hard_label_weight=0.0, soft_label_weight=1.0,
                        reduction="mean", normalizer=None):
    """L_n = soft·KL(p̂_n ‖ softmax(s_n/τ)) + hard·CE(s_n, y_n), KL over the sampled ids
    (0 log 0 = 0), CE on the untempered logits; reduced as every row loss."""
    v = student_logits.shape[-1]
    k = indices.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, v).double()
    idx = indices.reshape(-1, k).long()
    w = weights.reshape(-1, k).double().detach()
    y = labels.reshape(-1) if labels is not None else None
    rows = []
    for n in range(s.shape[0]):
        if y is not None and y[n] == ignore_index:
            rows.append(s.new_zeros(()))
            continue
        keep = idx[n] >= 0
        p, sel = w[n][keep], idx[n][keep]
        log_q = torch.log_softmax(s[n] / temperature, 0)[sel]
        kl = torch.where(p != 0, p * (torch.log(p) - log_q), 0.0).sum()  # NaN stays NaN
        row = soft_label_weight * kl
        if hard_label_weight:
            row = row - hard_label_weight * torch.log_softmax(s[n], 0)[y[n]]
        rows.append(row)
    out = torch.stack(rows) if rows else s.new_zeros(0)
    n_valid = s.shape[0] if y is None else int((y != ignore_index).sum())
    return reduce_ref(out, lead, reduction, normalizer, n_valid)
