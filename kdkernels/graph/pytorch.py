"""The `torch` backend of `topk_logit_graph` and `graph_on_logits_loss` (after InfiGFusion's GLD).

Per model and group of T positions: a_t keeps the top-k entries of softmax(z_t/τ);
the graph's nodes U are the classes in any valid position's top-k and its adjacency is
A = Σ_t a_t a_tᵀ on U. The loss compares the two graphs through their node strengths

    d_u = Σ_v A_uv = Σ_t a_{t,u} m_t,      m_t = Σ_v a_{t,v}  (the top-k mass)

sorted descending (x: student, y: teacher), the shorter padded with zeros to
n = max(|U_s|, |U_t|), by the 1-D Gromov-Wasserstein cost with squared distances

    GW(σ) = (1/n²) Σ_{i,j} ((x_i − x_j)² − (y_σ(i) − y_σ(j))²)²,   σ ∈ {identity, reversal}

taking the smaller (identity on ties); loss = mean over groups with a valid position.

Closed form. (x_i − x_j)² − (y_i − y_j)² = (e_i − e_j)(s_i − s_j) with e = x − y and
s = x + y, and both are translation invariant, so with e, s centred over the n entries
(Σe = Σs = 0):

    Σ_{i,j} (e_i − e_j)²(s_i − s_j)² = 2n Σe²s² + 2 Σe² Σs² + 4 (Σes)²
                                       − 4 Σe²s Σs − 4 Σes² Σe

(the last two vanish up to rounding and are kept for exactness). Every remaining term is
non-negative, so the value keeps its relative accuracy even when the two graphs are
nearly equal, unlike the expansion in powers of x and y. O(n) after the O(n log n) sort.

Gradient: autograd through the closed form, the sort (order fixed), the scatter of
strengths (selection fixed) and the top-k softmax entries (`TopkSoftmaxFunction`).
The strengths live in a dense [G, V] vector (zero off U), so no data-dependent shapes
and no host sync are needed; n is counted on the device.

Top-k softmax entries. For a row z [V], p = softmax(z/τ) and K = the k largest logits
(`topk_select`'s order: equal logits by lower index). Outputs a_k = p[K_k]. Backward, from
ā [k]: with c = Σ_{k∈K} p_k ā_k,
    ∂L/∂z_w = p_w (ā_w − c)/τ   for w ∈ K,      ∂L/∂z_w = −p_w c/τ   for w ∉ K
(the gradient is dense: every logit moves the softmax normaliser). When p is nearly
one-hot, c ≈ ā at the mode r and ā_w − c cancels; it is taken relative to the mode,
    ā_w − c = (ā_w − ā_r) + ā_r·tail − Σ_{k∈K} p_k (ā_k − ā_r),   tail = Σ_{w∉K} p_w,
with the tail mass summed directly (never as 1 − Σ_K p). Rows go a block at a time
(the softmax, keys and selection of ~4 MiB); besides the returned gradient only O(N·k)
numbers are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core.chunking import chunk_rows
from .._core.rowgrad import refuse_double_backward
from .._core.validate import compute_dtype
from ..select.pytorch import top_indices


def _rows_ok(z, row_ok, r0: int, r1: int):
    """Rows r0:r1 of z, the rows that are not ok replaced by zeros."""
    zc = z[r0:r1]
    return zc if row_ok is None else torch.where(row_ok[r0:r1, None], zc, 0.0)


class TopkSoftmaxFunction(torch.autograd.Function):
    """z [N, V] -> (a [N, k] top-k softmax(z/τ) entries in cdt, idx [N, k] long).

    row_ok: [N] bool or None; a row that is not ok (a masked position) is read as zeros,
    so that whatever it holds (NaN, ±inf) never reaches the outputs or the gradient."""

    @staticmethod
    def forward(ctx, z, k: int, inv_temp: float, cdt, row_ok):
        n, v = z.shape
        vals = torch.empty(n, k, dtype=cdt, device=z.device)
        idx = torch.empty(n, k, dtype=torch.long, device=z.device)
        lse = torch.empty(n, dtype=cdt, device=z.device)
        tail = torch.empty(n, dtype=cdt, device=z.device)
        step = chunk_rows(v, itemsize=16)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            zc = _rows_ok(z, row_ok, r0, r1)
            ic = top_indices(zc, k)
            x = zc.to(cdt, copy=True).mul_(inv_temp)
            lc = torch.logsumexp(x, dim=-1, keepdim=True)
            p = x.sub_(lc).exp_()
            vals[r0:r1] = p.gather(1, ic)
            tail[r0:r1] = p.scatter_(1, ic, 0.0).sum(-1)
            idx[r0:r1] = ic
            lse[r0:r1] = lc.squeeze(-1)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(z, vals, idx, lse, tail, row_ok)
        ctx.inv_temp = inv_temp
        return vals, idx

    @staticmethod
    def backward(ctx, a_bar, _idx_bar):
        refuse_double_backward("graph_on_logits_loss")
        z, vals, idx, lse, tail, row_ok = ctx.saved_tensors
        inv_temp = ctx.inv_temp
        cdt = vals.dtype
        if a_bar is None:
            return None, None, None, None, None
        a_bar = a_bar.to(cdt)
        # per row: c = Σ_K p ā, and ā_w − c relative to the mode (the largest a in K)
        c = (vals * a_bar).sum(-1, keepdim=True)
        top = vals.argmax(-1, keepdim=True)
        rel = a_bar - a_bar.gather(1, top)
        in_k = rel + a_bar.gather(1, top) * tail.unsqueeze(-1) - (vals * rel).sum(-1, keepdim=True)
        in_k = vals * in_k * inv_temp
        grad = torch.empty_like(z)
        n, v = z.shape
        step = chunk_rows(v, itemsize=16)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            zc = _rows_ok(z, row_ok, r0, r1)
            p = zc.to(cdt, copy=True).mul_(inv_temp).sub_(lse[r0:r1, None]).exp_()
            p.mul_(c[r0:r1] * -inv_temp).scatter_(1, idx[r0:r1], in_k[r0:r1])
            grad[r0:r1] = p
        return grad, None, None, None, None


def _strengths(z, k: int, inv_temp: float, valid, masked: bool):
    """Dense node strengths d [G, V] (float64, zero off U) and node counts |U| [G].

    z: [G, T, V]; valid: [G, T] bool; masked: whether any position may be masked (else
    the rows are read as they are, without a zeroing pass).
    """
    g, t_len, v = z.shape
    cdt = compute_dtype(z)
    zz = z.reshape(g * t_len, v)
    zz = zz if zz.stride(-1) == 1 else zz.contiguous()
    row_ok = valid.reshape(-1) if masked else None
    vals, idx = TopkSoftmaxFunction.apply(zz, k, inv_temp, cdt, row_ok)
    # a selection, not a product: a NaN upstream of a group never reaches masked rows (0·NaN)
    a = torch.where(valid.unsqueeze(-1), vals.reshape(g, t_len, k).double(), 0.0)
    mass = a.sum(-1, keepdim=True)  # m_t
    idx = idx.reshape(g, t_len * k)
    d = torch.zeros(g, v, dtype=torch.float64, device=z.device)
    d = d.scatter_add(1, idx, (a * mass).reshape(g, t_len * k))
    hits = torch.zeros(g, v, dtype=torch.int32, device=z.device)
    hits.scatter_add_(1, idx, valid.to(torch.int32).repeat_interleave(k, dim=1))
    return d, (hits > 0).sum(-1)


def _sorted_padded(d, width: int):
    """Strengths sorted descending (stable: ties by lower class index), cut or zero-padded
    to `width` columns: [G, width]."""
    x = torch.sort(d, dim=-1, descending=True, stable=True).values
    if x.shape[1] >= width:
        return x[:, :width]
    return F.pad(x, (0, width - x.shape[1]))


def _pair_sum(e, s, n):
    """Σ_{i,j} (e_i − e_j)²(s_i − s_j)² over the first n entries, e, s [G, W] zero beyond."""
    sum_ = lambda u: u.sum(-1)
    e2, s2 = e * e, s * s
    return (
        2 * n * sum_(e2 * s2)
        + 2 * sum_(e2) * sum_(s2)
        + 4 * sum_(e * s).square()
        - 4 * sum_(e2 * s) * sum_(s)
        - 4 * sum_(e * s2) * sum_(e)
    )


def gw_sorted_cost(x, y, n):
    """min over σ ∈ {id, reversal} of (1/n²) Σ_{i,j}((x_i − x_j)² − (y_σi − y_σj)²)²: [G].

    x, y: [G, W] float64 sorted descending, zero beyond n (the pad); n: [G] int (0 -> 0).
    """
    w = x.shape[1]
    pos = torch.arange(w, device=x.device)
    inside = pos < n.unsqueeze(-1)
    nf = n.clamp_min(1).to(x.dtype).unsqueeze(-1)
    y_rev = y.gather(1, (n.unsqueeze(-1) - 1 - pos).clamp_min(0)) * inside

    def cost(yy):
        e, s = (x - yy) * inside, (x + yy) * inside
        e = (e - e.sum(-1, keepdim=True) / nf) * inside
        s = (s - s.sum(-1, keepdim=True) / nf) * inside
        return _pair_sum(e, s, nf.squeeze(-1))

    c_id, c_rev = cost(y), cost(y_rev)
    best = torch.where(c_rev < c_id, c_rev, c_id)
    return best / nf.squeeze(-1).square()


def topk_logit_graph_torch(z, k: int, inv_temp: float, valid):
    """(nodes [n] int64 ascending, adjacency [n, n]) of one group z [T, V] (unit column
    stride); valid: [T] bool or None."""
    cdt = compute_dtype(z)
    vals, idx = TopkSoftmaxFunction.apply(z, k, inv_temp, cdt, valid)
    if valid is not None:
        vals, idx = vals[valid], idx[valid]
    nodes, inv = torch.unique(idx, sorted=True, return_inverse=True)
    rows = torch.zeros(vals.shape[0], nodes.numel(), dtype=cdt, device=z.device)
    rows = rows.scatter(1, inv.reshape(vals.shape), vals)  # a_t restricted to U: [T', n]
    return nodes, rows.transpose(0, 1) @ rows


def graph_on_logits_loss_torch(s, t, k: int, inv_temp: float, valid):
    """The loss of s [G, T, V_s] against the constant t [G, T, V_t] with valid [G, T]
    (None: every position; G, T >= 1): mean over groups with a valid position of the
    better 1-D GW cost."""
    masked = valid is not None
    if not masked:
        valid = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
    t_len, v_s, v_t = s.shape[1], s.shape[2], t.shape[2]
    d_s, n_s = _strengths(s, k, inv_temp, valid, masked)
    with torch.no_grad():
        d_t, n_t = _strengths(t.detach(), k, inv_temp, valid, masked)
    width = max(min(v_s, t_len * k), min(v_t, t_len * k))
    x = _sorted_padded(d_s, width)
    y = _sorted_padded(d_t, width)
    n = torch.maximum(n_s, n_t)
    per_group = gw_sorted_cost(x, y, n)
    groups = valid.any(-1)
    total = torch.where(groups, per_group, 0.0).sum()
    return (total / groups.sum().clamp_min(1)).float()
