"""The oracle for docs/spec.md §4: the formulas written as plain loops, differentiated by autograd.

Unchunked and unoptimised on purpose: the pairwise cost is built from the full
B × B × V difference tensor and the Sinkhorn iterations are a plain Python loop whose
every step autograd records, so the hand-written reverse pass and the vocabulary
chunking of the fast path are checked against an independent derivation. Tests call it
in float64; memory is O(B²·V + K·B²), so keep shapes small.
"""

from __future__ import annotations

import torch


def sinkhorn_ref(cost, a=None, b=None, *, epsilon, n_iters):
    """docs/spec.md §4 `sinkhorn` for cost [..., B1, B2] (a [.., B1], b [.., B2] or None), in
    cost's dtype; returns (f, g) with autograd through every iteration."""
    *lead, b1, b2 = cost.shape
    if a is None:
        a = torch.full((b1,), 1.0 / b1, dtype=cost.dtype, device=cost.device)
    if b is None:
        b = torch.full((b2,), 1.0 / b2, dtype=cost.dtype, device=cost.device)
    a = a.to(cost.dtype).expand(*lead, b1)
    b = b.to(cost.dtype).expand(*lead, b2)
    eps = epsilon
    f = torch.zeros_like(cost[..., :, 0])
    g = torch.zeros_like(cost[..., 0, :])
    for _ in range(n_iters):
        f = eps * torch.log(a) - eps * torch.logsumexp((g.unsqueeze(-2) - cost) / eps, dim=-1)
        g = eps * torch.log(b) - eps * torch.logsumexp((f.unsqueeze(-1) - cost) / eps, dim=-2)
    return f, g


def pairwise_cost_ref(student_logits, teacher_logits, *, temperature=1.0, cost="l1"):
    """C [..., B, B] between softmax rows of [..., B, V] logits (full B × B × V tensor)."""
    ps = torch.softmax(student_logits / temperature, dim=-1)
    pt = torch.softmax(teacher_logits.detach() / temperature, dim=-1)
    diff = ps.unsqueeze(-2) - pt.unsqueeze(-3)  # [..., B, B, V]
    if cost == "l1":
        return diff.abs().sum(-1)
    return 0.5 * diff.square().sum(-1)


def sinkhorn_loss_ref(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    temperature=1.0,
    cost="l1",
    epsilon=0.1,
    n_iters=20,
    grad="unrolled",
    ignore_index=-100,
    mask=None,
    compute_dtype=torch.float64,
):
    """docs/spec.md §4 `sinkhorn_loss` in `compute_dtype` (no validation: the oracle).

    `unrolled` differentiates through every recorded iteration; `envelope` detaches the
    plan. Rows with labels == ignore_index or mask False are left out: each problem is
    solved on its kept rows alone (one at a time), the mean taken over the problems that
    keep one. The loss comes back in `compute_dtype` (0 when there is no batch at all).
    """
    kw = dict(temperature=temperature, cost=cost, epsilon=epsilon, n_iters=n_iters, grad=grad)
    s = student_logits.to(compute_dtype)
    t = teacher_logits.to(compute_dtype)
    if labels is None and mask is None:
        return _batch_loss(s, t, **kw)
    keep = torch.ones(s.shape[:-1], dtype=torch.bool)
    if labels is not None:
        keep &= labels.cpu() != ignore_index
    if mask is not None:
        keep &= mask.cpu().bool()
    b, v = s.shape[-2:]
    s, t, keep = s.reshape(-1, b, v), t.reshape(-1, b, v), keep.reshape(-1, b)
    losses = [_batch_loss(s[m][keep[m]], t[m][keep[m]], **kw)
              for m in range(s.shape[0]) if bool(keep[m].any())]
    return torch.stack(losses).mean() if losses else s[:0].sum()


def _batch_loss(s, t, *, temperature, cost, epsilon, n_iters, grad):
    """The loss of [..., B, V] logits, every row kept."""
    c = pairwise_cost_ref(s, t, temperature=temperature, cost=cost)
    f, g = sinkhorn_ref(c, epsilon=epsilon, n_iters=n_iters)
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - c) / epsilon)
    if grad == "envelope":
        plan = plan.detach()
    loss = (plan * c).sum(dim=(-2, -1))
    return loss.mean() if loss.numel() else loss.sum()  # no batch at all: 0
