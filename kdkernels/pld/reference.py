"""The oracle for `plackett_luce_loss`: docs/spec.md §3 written as a literal sort and loop.

Deliberately naive (O(V²) per row, Python loops): the ranking is built with Python's
`sorted` on the key (label first, −teacher logit, class index), each suffix
log-sum-exp is a separate `torch.logsumexp`, and the gradient comes from autograd.
It checks the fast path's ranking, its tail collapse for `top_k`, and its hand-derived
scan gradient against an independent derivation. Use small V.
"""

from __future__ import annotations

import torch

from ..kd.reference import reduce_ref


def plackett_luce_loss_ref(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    top_k=None,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    compute_dtype=torch.float64,
):
    """docs/spec.md §3 in `compute_dtype` (no validation: the oracle). Loss in `compute_dtype`.

    student_logits, teacher_logits: [..., V]; labels: [...] or None.
    Gradients flow to `student_logits` through autograd.
    """
    v = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, v).to(compute_dtype)
    t = teacher_logits.reshape(-1, v).to(compute_dtype).detach()
    y = labels.reshape(-1).tolist() if labels is not None else [None] * s.shape[0]
    k_max = v if top_k is None else top_k
    rows = []
    for n in range(s.shape[0]):
        if y[n] is not None and y[n] == ignore_index:
            rows.append(s.new_zeros(()))
            continue
        tn = t[n].tolist()
        label = y[n]
        pi = sorted(range(v), key=lambda c, tn=tn, label=label: (c != label, -tn[c], c))
        w = torch.softmax(t[n] / temperature, 0)
        total = s.new_zeros(())
        for k in range(k_max):
            if w[pi[k]] == 0:  # 0 · (LSE − s) = 0
                continue
            suffix = s[n][pi[k:]]
            total = total + w[pi[k]] * (torch.logsumexp(suffix, 0) - s[n][pi[k]])
        rows.append(total)
    out = torch.stack(rows) if rows else s.new_zeros(0)
    n_valid = sum(1 for yn in y if yn is None or yn != ignore_index)
    return reduce_ref(out, lead, reduction, normalizer, n_valid)
