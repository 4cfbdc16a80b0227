"""The oracle for docs/spec.md §5's graph half: adjacency built densely, GW summed over all pairs.

Unchunked and unoptimised on purpose: the top-k rows come from a stable full sort, the
adjacency is the dense V × V matrix Σ_t a_t a_tᵀ restricted to the nodes, strengths are
its row sums, and the Gromov-Wasserstein cost is the O(n²) double sum, so the closed
form, the dense-strength trick and the hand-written softmax backward of the fast path
are checked against an independent derivation (autograd). Keep V small.
"""

from __future__ import annotations

import torch


def topk_rows_ref(z, k: int, temperature: float = 1.0):
    """a [T, V]: softmax(z/τ) on each row's top-k (stable sort: ties by lower index), 0
    elsewhere; and the bool selection [T, V]."""
    p = torch.softmax(z / temperature, dim=-1)
    order = torch.sort(z.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(1, order, True)
    return torch.where(keep, p, torch.zeros_like(p)), keep


def topk_logit_graph_ref(logits, k: int, *, temperature=1.0, mask=None):
    """(nodes [n] ascending, adjacency [n, n]) of one [T, V] group, in logits' dtype."""
    a, keep = topk_rows_ref(logits, k, temperature)
    if mask is not None:
        a, keep = a[mask.bool()], keep[mask.bool()]
    nodes = keep.any(0).nonzero().squeeze(-1)
    adjacency = a.transpose(0, 1) @ a  # [V, V]
    return nodes, adjacency[nodes][:, nodes]


def gw_1d_ref(x, y):
    """min over σ ∈ {id, reversal} of (1/n²) Σ_{i,j} ((x_i − x_j)² − (y_σi − y_σj)²)²,
    x, y [n] (identity on ties)."""
    n = x.shape[0]
    dx = (x.unsqueeze(0) - x.unsqueeze(1)).square()

    def cost(yy):
        dy = (yy.unsqueeze(0) - yy.unsqueeze(1)).square()
        return (dx - dy).square().sum() / n**2

    c_id, c_rev = cost(y), cost(y.flip(0))
    return c_rev if c_rev < c_id else c_id


def graph_on_logits_loss_ref(
    student_logits, teacher_logits, k: int, *, temperature=1.0, mask=None,
    compute_dtype=torch.float64,
):
    """docs/spec.md §5 `graph_on_logits_loss` in `compute_dtype` (no validation: the oracle)."""
    s = student_logits.to(compute_dtype)
    t = teacher_logits.detach().to(compute_dtype)
    g, t_len = s.shape[:2]
    losses = []
    for gi in range(g):
        m = None if mask is None else mask[gi].bool()
        if m is not None and not bool(m.any()):
            continue
        xs = []
        for z in (s[gi], t[gi]):
            _, adjacency = topk_logit_graph_ref(z, k, temperature=temperature, mask=m)
            strength = adjacency.sum(1)
            xs.append(torch.sort(strength, descending=True, stable=True).values)
        n = max(xs[0].shape[0], xs[1].shape[0])
        x, y = (torch.cat([v, v.new_zeros(n - v.shape[0])]) for v in xs)
        losses.append(gw_1d_ref(x, y))
    if not losses:
        return s.sum() * 0.0
    return torch.stack(losses).mean()
