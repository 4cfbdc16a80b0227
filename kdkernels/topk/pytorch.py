"""The `torch` backend of `topk_kd_loss`: exact PyTorch, chunked over rows.

Entries. Each row has k teacher entries (class indices, −1 = padding) and, with
tail="bucket", one more entry for the rest of the vocabulary. Both models become
distributions over those entries; with a = s/τ:
  renormalize: log q_i = a[idx_i] − LSE_j a[idx_j]          (softmax over the k entries)
               log p_i = u_i − LSE_j u_j, u = values/τ (logits) or values (logprobs, τ = 1)
  bucket:      log q_i = a[idx_i] − LSE_v a_v,  log q_tail = LSE_{v∉idx} a_v − LSE_v a_v
               log p_i = values_i,              log p_tail = log(1 − Σ_i exp(values_i))
(the tail terms in log space, so no 1 − Σ cancellation on the student side; when all
V classes are selected the tail is empty and p_tail = 0, whatever rounding left in Σ).

Gradient. Every entry e is a set of classes (one class, or the tail set), and q_e is
the softmax mass of that set. With h_e = q_e ∂D/∂q_e (stable forms below) and
r_e = h_e − q_e Σ_e' h_e' (the gradient with respect to the entry's log-mass),
    ∂D/∂a_v = r_{e(v)} · exp(a_v − LSE_{u∈e(v)} a_u),
i.e. r_e itself for a selected class and r_tail times the within-tail softmax for the
others (no division by a possibly underflowed q_tail). ∂D/∂s = ∂D/∂a / τ.
  forward KL  D = Σ p log(p/q)                   h = −p
  reverse KL  D = Σ q log(q/p)                   h = q log(q/p)
  jsd         D = β Σ p log(p/m) + (1−β) Σ q log(q/m), m = βp + (1−β)q
                                                 h = −(1−β) q log1p(βp / ((1−β)q))
(multiples of q dropped from h: they cancel in r; jsd's form vanishes where p/q → 0
instead of cancelling against q Σh). 0·log 0 = 0 throughout. The entry with the largest
q takes its r from Σ_e r_e = 0 (_entry_grad), not from h − q Σh, which cancels to nothing
where that q rounds to 1 (logit spreads of ~30).

Cost: renormalize touches only the k gathered logits (O(N·k), plus zero-filling the
gradient); bucket needs one pass over the full row (O(N·V)). Arithmetic is float64
per chunk; the temporaries are a few chunk × V (bucket) or chunk × k blocks.
"""

from __future__ import annotations

import math

import torch

from .._core.chunking import chunk_rows
from .._core.codes import Div
from .._core.rowgrad import row_policy

_NEG_INF = float("-inf")

FWD_KL, REV_KL = int(Div.FWD_KL), int(Div.REV_KL)


def _xlog(x, logx, logy):
    """x (log x − log y), 0 where x == 0."""
    return torch.where(x > 0, x * (logx - logy), 0.0)


def _log_normalize(u, dim=1):
    """u − LSE(u); entries stay -inf when the whole slice is -inf (no NaN)."""
    lse = torch.logsumexp(u, dim, keepdim=True)
    return torch.where(lse == _NEG_INF, _NEG_INF, u - lse)


def _div_terms(code: int, beta: float, lp, lq):
    """Per-entry (d, h): d sums to D, h = q ∂D/∂q up to a multiple of q."""
    p, q = lp.exp(), lq.exp()
    if code == FWD_KL:
        return _xlog(p, lp, lq), -p
    if code == REV_KL:
        d = _xlog(q, lq, lp)
        return d, d
    logm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    d = beta * _xlog(p, lp, logm) + (1 - beta) * _xlog(q, lq, logm)
    # h = (1−β) q log(q/m) − c·q with c = −(1−β) log(1−β): −(1−β) q log1p(βp/((1−β)q)),
    # which vanishes where p/q → 0 instead of cancelling against q Σh
    odds = lp - lq + (math.log(beta) - math.log1p(-beta))
    h = torch.where(q > 0, -(1 - beta) * q * torch.nn.functional.softplus(odds), 0.0)
    return d, h


def _lse_pivot(u):
    """LSE over dim 1 as M + log1p(Σ_{v≠argmax} e^{u_v − M}): no rounding of 1 + tiny, so
    1 − Σ e^u = −expm1(LSE) keeps its digits when the entries hold nearly all the mass."""
    m = u.amax(1, keepdim=True)
    m_s = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(u - m_s).scatter_(1, u.argmax(1, keepdim=True), 0.0)
    return torch.where(torch.isfinite(m), m + torch.log1p(e.sum(1, keepdim=True)), m)


def _entry_grad(h, lq):
    """r_e = h_e − q_e Σh = ∂D/∂(log q_e), with the pivot e* (the largest q) taken from
    Σ_e r_e = 0: r_e* = Q'·h_e* − q_e*·H' (Q', H': sums over the other entries), which
    keeps its digits where q_e* rounds to 1 and h − q Σh would cancel to nothing."""
    q = lq.exp()
    r = h - q * h.sum(1, keepdim=True)
    piv = lq.argmax(1, keepdim=True)
    others = torch.ones_like(q, dtype=torch.bool).scatter_(1, piv, False)
    q_rest = torch.where(others, q, 0.0).sum(1, keepdim=True)
    h_rest = torch.where(others, h, 0.0).sum(1, keepdim=True)
    return r.scatter_(1, piv, q_rest * h.gather(1, piv) - q.gather(1, piv) * h_rest)


def topk_kd_fwd_torch(s, scale, loss_out, grad_out, labels, idx, vals, code: int,
                      beta: float, inv_temp: float, logprobs: bool, bucket: bool,
                      ignore_index: int) -> None:
    """Fill loss_out[N] (float32, 0 at ignored rows) and, if grad_out is non-empty,
    grad_out[N, V] = scale·∂L_n/∂s (0 at ignored rows).

    s: [N, V] student logits; idx: [N, k] int (−1 = padding, others unique in [0, V));
    vals: [N, k] teacher logits or log-probabilities; labels: [N] or None;
    scale: 0-dim float tensor. `code` is Div.FWD_KL, REV_KL or JSD (then 0 < beta < 1).
    """
    n, v = s.shape
    want_grad = grad_out.numel() > 0
    rows = chunk_rows(v if bucket else idx.shape[1], itemsize=8)
    f64 = torch.float64
    scale64 = scale.to(device=s.device, dtype=f64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ix = idx[r0:r1].long()
        pad = ix < 0
        ix = ix.clamp_min(0)
        u = vals[r0:r1].to(f64)
        if not logprobs:
            u = u * inv_temp
        u = u.masked_fill(pad, _NEG_INF)
        # the policy (docs/spec.md): NaN / +inf among the logits the loss reads, or a side
        # without any finite entry (where it must be normalised), makes the row's loss NaN
        entries = (~pad).any(1)
        u_max = u.amax(1)
        bad = torch.isnan(u_max) | (u_max == math.inf)
        if not bucket:
            bad |= entries & (u_max == -math.inf)
        if bucket:
            a = s[r0:r1].to(f64, copy=True)  # becomes the tail in place
            if inv_temp != 1.0:
                a.mul_(inv_temp)
            bad |= ~torch.isfinite(a.amax(1))
            a_sel = a.gather(1, ix).masked_fill_(pad, _NEG_INF)
            # mask the selected classes out of `a`: padding slots repeat the row's first
            # selected class (same -inf write); an all-padding row rewrites a[0] unchanged
            first = ix.gather(1, (~pad).int().argmax(1, keepdim=True))
            none = pad.all(1, keepdim=True)
            ix_m = torch.where(pad, first, ix)
            a.scatter_(1, ix_m, torch.where(none, a.gather(1, ix_m), _NEG_INF))
            lse_tail = torch.logsumexp(a, 1, keepdim=True)
            lse_all = torch.logaddexp(lse_tail, torch.logsumexp(a_sel, 1, keepdim=True))
            lq = torch.cat([a_sel, lse_tail], 1) - lse_all
            # log(1 − Σ p_i) = log(−expm1(LSE u)), the mass the teacher left to the tail
            lse_u = _lse_pivot(u).clamp_max(0.0)
            lp_tail = torch.log(-torch.expm1(lse_u))
            # every class selected: the tail is the empty set, whatever rounding left in Σ p
            full = (~pad).sum(1, keepdim=True) == v
            lp = torch.cat([u, lp_tail.masked_fill(full, _NEG_INF)], 1)
        else:
            a_sel = s[r0:r1].gather(1, ix).to(f64) * inv_temp
            a_max = a_sel.masked_fill(pad, _NEG_INF).amax(1)
            bad |= torch.isnan(a_max) | (a_max == math.inf) | (entries & (a_max == -math.inf))
            lq = _log_normalize(a_sel.masked_fill(pad, _NEG_INF))
            lp = _log_normalize(u)
        d, h = _div_terms(code, beta, lp, lq)
        valid = labels[r0:r1] != ignore_index if labels is not None else None
        loss_out[r0:r1] = row_policy(d.sum(1).clamp_min(0.0), bad, valid)
        if not want_grad:
            continue
        r = _entry_grad(h, lq)
        r = torch.where(bad.unsqueeze(1), torch.nan, r * (scale64 * inv_temp))
        if valid is not None:  # a fill, not a product: ignored rows stay 0 even if inf/NaN
            r = torch.where(valid.unsqueeze(1), r, 0.0)
        if bucket:
            # tail classes: r_tail · softmax within the tail; selected classes: r_i
            # (an empty or all -inf tail has a = -inf everywhere: exp gives 0)
            g = a.sub_(lse_tail.clamp_min(torch.finfo(f64).min)).exp_().mul_(r[:, -1:])
            g.scatter_add_(1, ix, r[:, :-1].masked_fill(pad, 0.0))
            if valid is not None:  # a fill: an ignored row's NaN logit times r = 0 is NaN
                g.masked_fill_(~valid.unsqueeze(1), 0.0)
            grad_out[r0:r1] = g
        else:
            blk = grad_out[r0:r1]
            # zero (a NaN row for a bad one: the whole row, not only its k entries)
            fill = torch.where(bad & (valid if valid is not None else True), torch.nan, 0.0)
            blk.copy_(fill.to(blk.dtype).unsqueeze(1).expand_as(blk))
            blk.scatter_add_(1, ix, r.masked_fill(pad, 0.0).to(blk.dtype))
