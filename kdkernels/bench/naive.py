"""Naive PyTorch eager baselines: the code a user would write without this library.

These are baselines to beat, not oracles (the oracles are each op's `reference.py`,
computed in float64 by the tests). They run in the input dtype, materialise whatever
the textbook formula materialises, and rely on autograd for the gradient. Where the
naive formula already exists in the package (the divergence family), it is reused.
`torch.compile` of these same functions is the "compile" provider.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kd.reference import divergence_ref

# -- divergence family (SPEC §1) -------------------------------------------------------


def kd_eager(s, t, divergence="forward_kl", *, beta=0.5, alpha=0.1, taid_t=0.5,
             temperature=1.0, labels=None):
    """Mean over rows of D_n. forward_kl is log_softmax + kl_div, as most training code has it
    (labels: dkd and nkd)."""
    if divergence == "forward_kl":
        return F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t.detach() / temperature, -1),
            reduction="batchmean",
            log_target=True,
        )
    d = divergence_ref(s, t, divergence, beta=beta, alpha=alpha, taid_t=taid_t,
                       temperature=temperature, labels=labels)
    return d.mean()


def trl_jsd_formula(s, t, *, beta=0.5, temperature=1.0):
    """TRL GKD's generalized JSD as its trainer writes it (log-space mixture, batchmean).

    m = βp + (1−β)q formed as logsumexp of a stacked pair; loss =
    β·KL(p‖m) + (1−β)·KL(q‖m), summed and divided by the number of rows.
    """
    logq = F.log_softmax(s / temperature, -1)
    logp = F.log_softmax(t.detach() / temperature, -1)
    b = torch.tensor(beta, dtype=logq.dtype, device=logq.device)
    logm = torch.logsumexp(torch.stack([logq + torch.log1p(-b), logp + torch.log(b)]), 0)
    kl_p = F.kl_div(logm, logp, reduction="none", log_target=True)
    kl_q = F.kl_div(logm, logq, reduction="none", log_target=True)
    return (beta * kl_p + (1 - beta) * kl_q).sum() / s.shape[0]


# -- fused linear (SPEC §2) ------------------------------------------------------------


def fused_linear_eager(hs, ws, ht, wt, divergence="forward_kl", **kw):
    """Materialise both N×V logits with a matmul, then the eager divergence."""
    with torch.no_grad():
        tl = ht @ wt.T
    return kd_eager(hs @ ws.T, tl, divergence, **kw)


# -- Plackett-Luce (SPEC §3) -----------------------------------------------------------


def pld_eager(s, t, *, temperature=1.0, top_k=None):
    """Full stable sort of the teacher, gather, reversed logcumsumexp for the suffix LSEs."""
    t = t.detach()
    order = torch.sort(t, dim=-1, descending=True, stable=True).indices
    w = torch.softmax(t / temperature, -1).gather(-1, order)
    sp = s.gather(-1, order)
    lse = torch.logcumsumexp(sp.flip(-1), -1).flip(-1)
    terms = w * (lse - sp)
    if top_k is not None:
        terms = terms[:, :top_k]
    return terms.sum(-1).mean()


# -- Sinkhorn (SPEC §4) ----------------------------------------------------------------


def sinkhorn_eager(cost, *, epsilon, n_iters):
    """Log-domain Sinkhorn with uniform marginals: n_iters alternating logsumexp updates."""
    b1, b2 = cost.shape[-2], cost.shape[-1]
    f = cost.new_zeros(cost.shape[:-1])
    g = cost.new_zeros(cost.shape[:-2] + (b2,))
    la, lb = -math.log(b1), -math.log(b2)
    for _ in range(n_iters):
        f = epsilon * la - epsilon * torch.logsumexp((g.unsqueeze(-2) - cost) / epsilon, -1)
        g = epsilon * lb - epsilon * torch.logsumexp((f.unsqueeze(-1) - cost) / epsilon, -2)
    return f, g


def sinkhorn_loss_eager(s, t, *, temperature=1.0, epsilon=0.1, n_iters=20):
    """SinKD's batch-wise loss: L1 cost by cdist, unrolled Sinkhorn, ⟨P, C⟩ (autograd)."""
    ps = torch.softmax(s / temperature, -1)
    pt = torch.softmax(t.detach() / temperature, -1)
    cost = torch.cdist(ps, pt, p=1)
    f, g = sinkhorn_eager(cost, epsilon=epsilon, n_iters=n_iters)
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / epsilon)
    return (plan * cost).sum((-2, -1)).mean()


# -- top-k KD (SPEC §5) ----------------------------------------------------------------


def topk_kd_eager(s, idx, vals, *, temperature=1.0):
    """Full-vocabulary log_softmax, gather the teacher's k entries, renormalise, forward KL."""
    logq = F.log_softmax(s / temperature, -1).gather(-1, idx)
    logq = logq - torch.logsumexp(logq, -1, keepdim=True)
    logp = F.log_softmax(vals / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def fused_linear_topk_eager(hs, ws, idx, vals, *, temperature=1.0):
    """Materialise the N×V student logits with a matmul, then the eager top-k formula
    (full log_softmax, gather, renormalise, forward KL)."""
    return topk_kd_eager(hs @ ws.T, idx, vals, temperature=temperature)


# -- graph on logits (SPEC §5) ---------------------------------------------------------


def _strengths(z, k, temperature):
    """Sorted (descending) node strengths d_u = Σ_t a_{t,u} Σ_v a_{t,v} of one [T, V] group."""
    a = torch.softmax(z / temperature, -1)
    vals, idx = a.topk(k, -1)
    weighted = vals * vals.sum(-1, keepdim=True)
    d = z.new_zeros(z.shape[-1]).scatter_add(0, idx.reshape(-1), weighted.reshape(-1))
    nodes = torch.unique(idx)
    return d[nodes].sort(descending=True).values


def _gw_1d(x, y):
    """(1/n²) Σ_ij ((x_i − x_j)² − (y_i − y_j)²)², formed as an n×n matrix."""
    dx = (x.unsqueeze(1) - x.unsqueeze(0)) ** 2
    dy = (y.unsqueeze(1) - y.unsqueeze(0)) ** 2
    return ((dx - dy) ** 2).mean()


def graph_loss_eager(s, t, k, *, temperature=1.0):
    """Per group: top-k strengths of both models, zero-padded, 1-D GW at identity/reversal."""
    losses = []
    for gi in range(s.shape[0]):
        x = _strengths(s[gi], k, temperature)
        y = _strengths(t[gi].detach(), k, temperature)
        n = max(x.numel(), y.numel())
        x = F.pad(x, (0, n - x.numel()))
        y = F.pad(y, (0, n - y.numel()))
        losses.append(torch.minimum(_gw_1d(x, y), _gw_1d(x, y.flip(0))))
    return torch.stack(losses).mean()
