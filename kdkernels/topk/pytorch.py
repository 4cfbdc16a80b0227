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
  taid        D = Σ r log(r/q), r = softmax_e((1−λ) log q_e + λ log p_e), r constant
                                                 h = −r  (so ∂D/∂log q_e = q_e − r_e)
(multiples of q dropped from h: they cancel in r; jsd's form vanishes where p/q → 0
instead of cancelling against q Σh). 0·log 0 = 0 throughout. The entry with the largest
q takes its r from Σ_e r_e = 0 (_entry_grad), not from h − q Σh, which cancels to nothing
where that q rounds to 1 (logit spreads of ~30).

Row loss L = soft_w·D + hard_w·CE(s, y), CE on the untempered row over the full
vocabulary: CE = (M − s_y) + log1p(Z'), M the row max at column j*, Z' = Σ_{v≠j*} e^{s_v − M};
its gradient softmax(s) − onehot(y) is written at y = j* as −Z'/(1 + Z') (no 1 − 1).
soft_w = 0 (Div.ZERO) reads no teacher entry.

Cost: renormalize touches only the k gathered logits (O(N·k), plus zero-filling the
gradient); bucket and the hard label need passes over the full row (O(N·V)). Arithmetic is float64
per chunk; the temporaries are a few chunk × V (bucket) or chunk × k blocks.
"""

from __future__ import annotations

import math

import torch

from .._core.chunking import chunk_rows
from .._core.codes import Div
from .._core.rowgrad import row_policy

_NEG_INF = float("-inf")

FWD_KL, REV_KL, TAID, ZERO = int(Div.FWD_KL), int(Div.REV_KL), int(Div.TAID), int(Div.ZERO)


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


def soft_terms(code: int, w: float, lp, lq, has):
    """(d, h, bad) over the entries: _div_terms, with TAID as forward KL against its
    target log r = log_softmax((1−λ) log q + λ log p) (λ = w, r constant, so that
    ∂D/∂log q_e = q_e − r_e). bad: TAID rows with entries (`has`) whose mix has no finite
    entry (the student and teacher supports are disjoint); None for the others."""
    if code != TAID:
        d, h = _div_terms(code, w, lp, lq)
        return d, h, None
    mix = (1 - w) * lq + w * lp
    d, h = _div_terms(FWD_KL, w, _log_normalize(mix), lq)
    return d, h, has & (mix.amax(1) == _NEG_INF)


def hard_terms(x, y, want_grad: bool):
    """(CE [R], bad [R], g [R, V] or None) of the untempered rows x [R, V] (float64) and
    labels y [R] (int64, in range): CE = LSE(x) − x_y, g = softmax(x) − onehot(y), taken
    at the row's argmax j* as −Z'/(1 + Z') where y = j* (module docstring). bad: the row
    has no softmax (NaN or +inf, or every entry −inf)."""
    m = x.amax(1, keepdim=True)  # (NaN propagates)
    bad = ~torch.isfinite(m[:, 0])
    j = x.argmax(1, keepdim=True)
    e = torch.exp(x - torch.where(torch.isfinite(m), m, 0.0))
    z = e.scatter(1, j, 0.0).sum(1, keepdim=True)  # Z' = Σ_{v≠j*} e^{x_v − M}
    yy = y.unsqueeze(1)
    ce = ((m - x.gather(1, yy)) + torch.log1p(z))[:, 0]
    if not want_grad:
        return ce, bad, None
    g = e.div_(1.0 + z)
    g_y = torch.where(yy == j, -z / (1.0 + z), g.gather(1, yy) - 1.0)
    return ce, bad, g.scatter_(1, yy, g_y)


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


def topk_kd_fwd_torch(s, scale, loss_out, grad_out, labels, idx, vals, code: int, w: float,
                      inv_temp: float, logprobs: bool, bucket: bool, ignore_index: int,
                      soft_w: float = 1.0, hard_w: float = 0.0) -> None:
    """Fill loss_out[N] (float32, 0 at ignored rows) and, if grad_out is non-empty,
    grad_out[N, V] = scale·∂L_n/∂s (0 at ignored rows), L_n = soft_w·D_n + hard_w·CE_n.

    s: [N, V] student logits; idx: [N, k] int (−1 = padding, others unique in [0, V));
    vals: [N, k] teacher logits or log-probabilities; labels: [N] or None (needed when
    hard_w != 0); scale: 0-dim float tensor. `code` is Div.FWD_KL, REV_KL, JSD (then
    0 < w = β < 1), TAID (0 < w = λ < 1) or ZERO (no divergence term: soft_w unused).
    grad_out may alias s (a block's logits are read before its gradient is written).
    """
    n, v = s.shape
    want_grad = grad_out.numel() > 0
    soft = code != ZERO
    bucket = bucket and soft
    dense = bucket or hard_w != 0.0 or not soft  # the gradient is written densely
    rows = chunk_rows(v if dense else idx.shape[1], itemsize=8)
    f64 = torch.float64
    scale64 = scale.to(device=s.device, dtype=f64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        valid = labels[r0:r1] != ignore_index if labels is not None else None
        loss = torch.zeros(r1 - r0, dtype=f64, device=s.device)
        bad = torch.zeros(r1 - r0, dtype=torch.bool, device=s.device)
        r = g_hard = None
        if soft:
            ix, pad, a, lse_tail, lq, lp, bad = _entry_logs(s[r0:r1], idx[r0:r1],
                                                           vals[r0:r1], v, inv_temp,
                                                           logprobs, bucket)
            has = torch.ones_like(bad) if bucket else (~pad).any(1)
            d, h, bad_mix = soft_terms(code, w, lp, lq, has)
            if bad_mix is not None:
                bad |= bad_mix
            loss += soft_w * d.sum(1).clamp_min(0.0)
            if want_grad:
                r = _entry_grad(h, lq).mul_(scale64 * (soft_w * inv_temp))
        if hard_w != 0.0:
            y = labels[r0:r1].long()
            y_ok = (y >= 0) & (y < v)  # (out of range on a GPU, unchecked: the row is NaN)
            ce, bad_h, g_hard = hard_terms(s[r0:r1].to(f64), torch.where(y_ok, y, 0),
                                           want_grad)
            loss += hard_w * ce
            bad |= bad_h | (valid & ~y_ok)
        loss_out[r0:r1] = row_policy(loss, bad, valid)
        if not want_grad:
            continue
        counted = bad if valid is None else bad & valid
        if not dense:
            blk = grad_out[r0:r1]
            # zero (a NaN row for a bad one: the whole row, not only its k entries)
            fill = torch.where(counted, torch.nan, 0.0)
            blk.copy_(fill.to(blk.dtype).unsqueeze(1).expand_as(blk))
            r = torch.where(bad.unsqueeze(1), 0.0, r)
            if valid is not None:
                r = torch.where(valid.unsqueeze(1), r, 0.0)
            blk.scatter_add_(1, ix, r.masked_fill(pad, 0.0).to(blk.dtype))
            continue
        if bucket:
            # tail classes: r_tail · softmax within the tail; selected classes: r_i
            # (an empty or all -inf tail has a = -inf everywhere: exp gives 0)
            g = a.sub_(lse_tail.clamp_min(torch.finfo(f64).min)).exp_().mul_(r[:, -1:])
        else:
            g = torch.zeros(r1 - r0, v, dtype=f64, device=s.device)
        if g_hard is not None:
            g.add_(g_hard.mul_(scale64 * hard_w))
        if r is not None:
            g.scatter_add_(1, ix, r[:, :ix.shape[1]].masked_fill(pad, 0.0))
        # fills, not products: an ignored row's NaN logit times 0 would be NaN
        g.masked_fill_(counted.unsqueeze(1), torch.nan)
        if valid is not None:
            g.masked_fill_(~valid.unsqueeze(1), 0.0)
        grad_out[r0:r1] = g


def _entry_logs(s, idx, vals, v: int, inv_temp: float, logprobs: bool, bucket: bool):
    """The entries of a block of rows: (ix [R, k] (padding as 0), pad [R, k], a, lse_tail,
    lq, lp, bad). Bucket: a [R, V] is the tempered row with the selected classes at −inf
    (the tail) and lse_tail [R, 1] its LSE, lq, lp [R, k + 1]; renormalize: a = lse_tail =
    None, lq, lp [R, k]. bad: NaN / +inf among the logits read, or a side without any
    finite entry where it must be normalised (docs/spec.md)."""
    f64 = torch.float64
    ix = idx.long()
    pad = ix < 0
    ix = ix.clamp_min(0)
    u = vals.to(f64)
    if not logprobs:
        u = u * inv_temp
    u = u.masked_fill(pad, _NEG_INF)
    entries = (~pad).any(1)
    u_max = u.amax(1)
    bad = torch.isnan(u_max) | (u_max == math.inf)
    if not bucket:
        a_sel = s.gather(1, ix).to(f64) * inv_temp
        a_max = a_sel.masked_fill(pad, _NEG_INF).amax(1)
        bad |= entries & (u_max == -math.inf)
        bad |= torch.isnan(a_max) | (a_max == math.inf) | (entries & (a_max == -math.inf))
        return (ix, pad, None, None, _log_normalize(a_sel.masked_fill(pad, _NEG_INF)),
                _log_normalize(u), bad)
    a = s.to(f64, copy=True)  # becomes the tail in place
    if inv_temp != 1.0:
        a.mul_(inv_temp)
    bad |= ~torch.isfinite(a.amax(1))
    a_sel = a.gather(1, ix).masked_fill_(pad, _NEG_INF)
    # mask the selected classes out of `a`: padding slots repeat the row's first selected
    # class (same -inf write); an all-padding row rewrites a[0] unchanged
    first = ix.gather(1, (~pad).int().argmax(1, keepdim=True))
    none = pad.all(1, keepdim=True)
    ix_m = torch.where(pad, first, ix)
    a.scatter_(1, ix_m, torch.where(none, a.gather(1, ix_m), _NEG_INF))
    lse_tail = torch.logsumexp(a, 1, keepdim=True)
    lse_all = torch.logaddexp(lse_tail, torch.logsumexp(a_sel, 1, keepdim=True))
    lq = torch.cat([a_sel, lse_tail], 1) - lse_all
    # log(1 − Σ p_i) = log(−expm1(LSE u)), the mass the teacher left to the tail
    lp_tail = torch.log(-torch.expm1(_lse_pivot(u).clamp_max(0.0)))
    # every class selected: the tail is the empty set, whatever rounding left in Σ p
    full = (~pad).sum(1, keepdim=True) == v
    lp = torch.cat([u, lp_tail.masked_fill(full, _NEG_INF)], 1)
    return ix, pad, a, lse_tail, lq, lp, bad
