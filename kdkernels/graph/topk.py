"""Top-k softmax entries per row, ties by lower index, with a chunked dense backward.

For a row z [V], p = softmax(z/τ) and K = the k largest logits (equal logits: lower index
first; τ > 0 keeps the order). Outputs a_k = p[K_k].

Backward, from ā [k]: with c = Σ_{k∈K} p_k ā_k,
    ∂L/∂z_w = p_w (ā_w − c)/τ   for w ∈ K,      ∂L/∂z_w = −p_w c/τ   for w ∉ K
(the gradient is dense: every logit moves the softmax normaliser). When p is nearly
one-hot, c ≈ ā at the mode r and ā_w − c cancels; it is taken relative to the mode,
    ā_w − c = (ā_w − ā_r) + ā_r·tail − Σ_{k∈K} p_k (ā_k − ā_r),   tail = Σ_{w∉K} p_w,
with the tail mass summed directly (never as 1 − Σ_K p).

Memory: rows are processed CHUNK_ELEMS/4 elements at a time (the softmax, the
selection masks and an int64 running count of that size); besides the returned
gradient only O(N·k) numbers are kept. Time O(N·V).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kd.chunked import CHUNK_ELEMS


def _row_step(v: int) -> int:
    return max(1, CHUNK_ELEMS // 4 // max(v, 1))


def topk_lower_index(z, k: int):
    """Indices [r, k] of the k largest entries of each row of z [r, V], ties by lower index.

    Everything strictly above the k-th largest value is taken, then the lowest-indexed
    entries equal to it fill the remaining places. Exactly k entries are marked per row,
    so `topk` over the 0/1 marks returns them all (in no particular order); no host sync.
    """
    thr = z.topk(k, dim=-1).values[:, -1:]
    sel = z > thr
    need = k - sel.sum(-1, keepdim=True)
    eq = z == thr
    sel |= eq & (eq.cumsum(-1) <= need)
    return sel.to(torch.uint8).topk(k, dim=-1).indices


class TopkSoftmaxFunction(torch.autograd.Function):
    """z [N, V] -> (a [N, k] top-k softmax(z/τ) entries in cdt, idx [N, k] long)."""

    @staticmethod
    def forward(ctx, z, k: int, inv_temp: float, cdt):
        n, v = z.shape
        vals = torch.empty(n, k, dtype=cdt, device=z.device)
        idx = torch.empty(n, k, dtype=torch.long, device=z.device)
        lse = torch.empty(n, dtype=cdt, device=z.device)
        tail = torch.empty(n, dtype=cdt, device=z.device)
        step = _row_step(v)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            zc = z[r0:r1]
            ic = topk_lower_index(zc, k)
            x = zc.to(cdt, copy=True).mul_(inv_temp)
            lc = torch.logsumexp(x, dim=-1, keepdim=True)
            p = x.sub_(lc).exp_()
            vals[r0:r1] = p.gather(1, ic)
            tail[r0:r1] = p.scatter_(1, ic, 0.0).sum(-1)
            idx[r0:r1] = ic
            lse[r0:r1] = lc.squeeze(-1)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(z, vals, idx, lse, tail)
        ctx.inv_temp = inv_temp
        return vals, idx

    @staticmethod
    @once_differentiable
    def backward(ctx, a_bar, _idx_bar):
        z, vals, idx, lse, tail = ctx.saved_tensors
        inv_temp = ctx.inv_temp
        cdt = vals.dtype
        if a_bar is None:
            return None, None, None, None
        a_bar = a_bar.to(cdt)
        # per row: c = Σ_K p ā, and ā_w − c relative to the mode (the largest a in K)
        c = (vals * a_bar).sum(-1, keepdim=True)
        top = vals.argmax(-1, keepdim=True)
        rel = a_bar - a_bar.gather(1, top)
        in_k = rel + a_bar.gather(1, top) * tail.unsqueeze(-1) - (vals * rel).sum(-1, keepdim=True)
        in_k = vals * in_k * inv_temp
        grad = torch.empty_like(z)
        n, v = z.shape
        step = _row_step(v)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            p = z[r0:r1].to(cdt, copy=True).mul_(inv_temp).sub_(lse[r0:r1, None]).exp_()
            p.mul_(c[r0:r1] * -inv_temp).scatter_(1, idx[r0:r1], in_k[r0:r1])
            grad[r0:r1] = p
        return grad, None, None, None
