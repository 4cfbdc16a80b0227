"""The `torch` backend of `uld_loss`: exact PyTorch, a block of rows at a time.

Per row (docs/spec.md §7), with p = softmax(s/τ_s) over V_s columns, r = softmax(t/τ_t)
over V_t, both sorted descending (p_(i), r_(i), zero beyond their vocabulary), and
K = min(top_k, max(V_s, V_t)):

    D = Σ_{i<K} |p_(i) − r_(i)|

Gradient. Let the class holding the student's sorted position i (i < K) take
g = sign(p_(i) − r_(i)) (0 where they are equal: the subgradient chosen), and every
class beyond position K take g = 0. Then ∂D/∂p_v = g_v and through the softmax

    ∂D/∂s_v = (1/τ_s) · p_v (g_v − ḡ),   ḡ = Σ_v p_v g_v = P₊ − P₋,

with P₊, P₋, P₀ the student mass on classes with g = +1, −1, 0 (P₀ includes the mass
beyond position K). Since P₊ + P₋ + P₀ = 1, g − ḡ needs no subtraction of near-equal
numbers where it matters:

    g = +1:  2P₋ + P₀        g = −1:  −(2P₊ + P₀)        g = 0:  P₋ − P₊.

(At a wide logit spread p is nearly one-hot; 1 − ḡ computed as written would be 1 − 1.)
The mass beyond position K is summed directly over those classes, never as 1 − Σ_top.

Ties. Equal student values may sit at their sorted positions in any order without
changing D; they decide only which of them receives which position's sign. Every
backend uses the order of order.py (equal values by lower class index); on the CPU the
library's faster order comes first and only the rows where it could matter are redone.

Hard label. L = soft·D + hard·CE(s, y) on the untempered student logits; CE's gradient
softmax(s) − onehot(y) is written at y as −Σ_{v≠y} softmax(s)_v (no 1 − 1 there).

Precision: float32 arithmetic (float64 for float64 inputs) on logits shifted by their
row maximum, (x − max)·(1/τ), so a probability carries the rounding of its own exponent,
not of a large log-sum-exp. Memory: besides the returned gradient, only a few
[rows, V] temporaries of one block (~4 MiB each, chunking.py; on the CPU at least one row
per thread): e^{(x−max)/τ} of the student's block becomes the tail's probabilities, then
its gradient block.
"""

from __future__ import annotations

import torch

from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from .order import ambiguous_rows, stable_order, student_order, teacher_sorted

_NEG_INF = float("-inf")


def _exp_shifted(x, m, inv_temp: float, cdt):
    """e^{(x − m)·inv_temp} [R, V] in cdt (a new tensor), for m [R, 1] in cdt."""
    e = x.to(cdt) - m
    if inv_temp != 1.0:
        e.mul_(inv_temp)
    return e.exp_()


def _sorted_probs(vals, m, inv_temp: float, lz):
    """e^{(vals − m)·inv_temp − lz}: the probabilities at the sorted positions."""
    a = vals.to(m.dtype) - m
    if inv_temp != 1.0:
        a.mul_(inv_temp)
    return a.sub_(lz).exp_()


def _signs(ps, pt, ks: int):
    """g [R, Ks] = sign(p_(i) − r_(i)) at the student's sorted positions (r = 0 beyond
    the teacher's K)."""
    kt = pt.shape[1]
    if kt >= ks:
        return torch.sign(ps - pt[:, :ks])
    return torch.cat([torch.sign(ps[:, :kt] - pt), torch.sign(ps[:, kt:])], 1)


def _masses(ps, g, tail):
    """(P₊, P₋, P₀) [R, 1]: the student mass at positions of sign +1, −1, 0, and the mass
    beyond position K, tail [R, 1], in P₀."""
    pos = torch.where(g > 0, ps, 0.0).sum(1, keepdim=True)
    neg = torch.where(g < 0, ps, 0.0).sum(1, keepdim=True)
    zero = torch.where(g == 0, ps, 0.0).sum(1, keepdim=True).add_(tail)
    return pos, neg, zero


def uld_fwd_torch(s, scale, loss_out, grad_out, labels, t, inv_temp: float, inv_temp_t: float,
                  top_k: int, soft_w: float, hard_w: float, ignore_index: int) -> None:
    """Fill loss_out[N] (float32 per-row losses, 0 at ignored rows) and, if grad_out is
    non-empty, grad_out[N, V_s] = scale·∂L_n/∂s (0 at ignored rows).

    s: [N, V_s] student logits, t: [N, V_t] teacher logits, labels: [N] or None,
    scale: 0-dim float tensor, top_k: K in [1, max(V_s, V_t)].
    """
    n, vs = s.shape
    vt = t.shape[1]
    soft = soft_w != 0.0
    ks, kt = (min(top_k, vs), min(top_k, vt)) if soft else (0, 0)
    both = min(ks, kt)
    want_grad = grad_out.numel() > 0
    on_cpu = s.device.type == "cpu"
    cdt = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
    scale_c = float(scale) if scale.device.type == "cpu" else scale.to(cdt)
    rows = chunk_rows(max(vs, vt), itemsize=8)  # the sorts' int64 indices
    if on_cpu:  # a row per thread at least: the CPU sorts split a block's rows (order.py)
        rows = max(rows, torch.get_num_threads())
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1]
        valid = y = None
        if labels is not None:
            y = labels[r0:r1]
            valid = y != ignore_index
            y = torch.where(valid, y, 0).long().unsqueeze(1)
        m_s = x.amax(1, keepdim=True).to(cdt)
        bad = ~torch.isfinite(m_s[:, 0])  # NaN or +inf, or every entry -inf
        e = _exp_shifted(x, m_s, inv_temp, cdt)  # → the tail's mass, then the gradient
        z_s = e.sum(1, keepdim=True)
        loss = torch.zeros(r1 - r0, dtype=cdt, device=s.device)
        full = None  # the block's gradient, unscaled
        if hard_w != 0.0:
            e1 = e if inv_temp == 1.0 else _exp_shifted(x, m_s, 1.0, cdt)
            z1 = z_s if inv_temp == 1.0 else e1.sum(1, keepdim=True)
            shift_y = x.gather(1, y).to(cdt) - m_s
            loss += hard_w * (z1.log() - shift_y)[:, 0]
            if want_grad:  # softmax(s) − onehot(y), at y as −Σ_{v≠y} softmax(s)_v
                full = e1.div(z1).scatter_(1, y, 0.0)
                full.scatter_(1, y, -full.sum(1, keepdim=True)).mul_(hard_w)
            del e1
        if soft:
            tb = t[r0:r1]
            m_t = tb.amax(1, keepdim=True).to(cdt)
            bad |= ~torch.isfinite(m_t[:, 0])
            lz_t = _exp_shifted(tb, m_t, inv_temp_t, cdt).sum(1, keepdim=True).log_()
            pt = _sorted_probs(teacher_sorted(tb, kt), m_t, inv_temp_t, lz_t)
            lz_s = z_s.log()
            vals, idx = student_order(x, ks, exact=not on_cpu)
            ps = _sorted_probs(vals, m_s, inv_temp, lz_s)
            g = _signs(ps, pt, ks)
            if on_cpu:  # redo the rows where the order among equal values matters
                fix = ambiguous_rows(x, vals, g)
                if fix.numel():
                    vals_f, idx[fix] = stable_order(x[fix], ks)
                    ps[fix] = _sorted_probs(vals_f, m_s[fix], inv_temp, lz_s[fix])
                    g[fix] = _signs(ps[fix], pt[fix], ks)
            d = torch.abs(ps[:, :both] - pt[:, :both]).sum(1)
            loss += soft_w * d.add_(ps[:, both:].sum(1)).add_(pt[:, both:].sum(1))
            if want_grad:
                tail = 0.0
                if ks < vs:  # classes beyond position K: g = 0, their mass into P₀
                    tail = e.scatter_(1, idx, 0.0).sum(1, keepdim=True).div_(z_s)
                pos, neg, zero = _masses(ps, g, tail)
                c = soft_w * inv_temp
                coef = torch.where(g > 0, 2 * neg + zero,
                                   torch.where(g < 0, -(2 * pos + zero), neg - pos))
                g_top = ps.mul_(coef).mul_(c)
                if ks < vs:
                    e.mul_((neg - pos).mul_(c).div_(z_s))
                # (e's columns beyond K now hold their gradient; the K sorted ones, or all
                # of them when ks == vs, are written here)
                g_soft = e.scatter_(1, idx, g_top)
                full = g_soft if full is None else full.add_(g_soft)
        loss_out[r0:r1] = row_policy(loss, bad, valid)
        if not want_grad:
            continue
        if full is None:
            full = e.zero_()
        full.mul_(scale_c)
        if not on_cpu or bool(bad.any()):
            full.masked_fill_(bad.unsqueeze(1), torch.nan)
        if valid is not None:  # a fill, not a product: ignored rows stay 0 even if inf/NaN
            full.masked_fill_(~valid.unsqueeze(1), 0.0)
        grad_out[r0:r1] = full
