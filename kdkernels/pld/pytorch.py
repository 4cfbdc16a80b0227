"""The `torch` backend of `plackett_luce_loss`: exact PyTorch, chunked over rows.

Per row, with the ranking π (label first, then descending teacher logit, ties by lower
class index), weights w_k = softmax(t/τ)[π_k] and suffix log-sum-exps
LSE_k = log Σ_{ℓ≥k} exp(s[π_ℓ]) of the untempered student logits:

    L = Σ_{k<K} w_k (LSE_k − s[π_k])                              (0-indexed, K = top_k or V)

Gradient. ∂LSE_k/∂s[π_j] = softmax over the suffix k, exp(s[π_j] − LSE_k), for j ≥ k, so

    ∂L/∂s[π_j] = Σ_{k ≤ min(j, K−1)} w_k exp(s[π_j] − LSE_k) − w_j [j < K]
               = exp(s[π_j] + c_j) − w_j [j < K],
    c_j = log Σ_{k ≤ min(j, K−1)} w_k exp(−LSE_k)   (a prefix log-cum-sum-exp of log w_k − LSE_k).

Each term exp(s[π_j] − LSE_k) ≤ 1 (π_j is in suffix k), so exp(s[π_j] + c_j) ≤ Σ w ≤ 1:
no overflow at any logit spread. Both scans are O(K) per row after the ranking; no V×V.
For j ≥ K the gradient is exp(s_v + c_{K−1}), which needs no ranking: only the first K
positions of π are ever built, and the suffix sums beyond them collapse into one
log-sum-exp over the unranked tail, LSE_k = logaddexp(LSE_tail, LSE over π_k..π_{K−1}).

Ranking (ranking.py). The first K positions of π are `topk_select`'s order over the
teacher logits (descending, ties by lower index); with labels the label is moved to (or
inserted at) the front of that list.

Precision: all arithmetic per chunk is float64, whatever the input dtype, so the float32
result is the float64 result rounded once. Memory: a chunk of rows at a time, so the
only temporaries besides the returned gradient are a few chunk × V blocks.
"""

from __future__ import annotations

import torch

from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from .ranking import rank_rows

_NEG_INF = float("-inf")


def pld_fwd_torch(s, scale, loss_out, grad_out, labels, t, inv_temp: float, top_k: int,
                  ignore_index: int) -> None:
    """Fill loss_out[N] (float32 per-row losses, 0 at ignored rows) and, if grad_out is
    non-empty, grad_out[N, V] = scale·∂L_n/∂s (0 at ignored rows).

    s: [N, V] student logits, t: [N, V] teacher logits, labels: [N] or None,
    scale: 0-dim float tensor, top_k: K in [1, V].
    """
    n, v = s.shape
    k = top_k
    want_grad = grad_out.numel() > 0
    rows = chunk_rows(v, itemsize=8)
    f64 = torch.float64
    scale64 = scale.to(device=s.device, dtype=f64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        tc = t[r0:r1]
        y = labels[r0:r1] if labels is not None else None
        top, _ = rank_rows(tc, y, k, ignore_index)  # ignored rows: their loss is zeroed below
        valid = y != ignore_index if y is not None else None
        x = s[r0:r1].to(f64, copy=True)  # modified in place below
        b = tc.to(f64) * inv_temp
        # no softmax on either side (a NaN or +inf, or all -inf): the row's loss is NaN
        bad = ~torch.isfinite(x.amax(1)) | ~torch.isfinite(b.amax(1))
        logw = b.gather(1, top).sub_(torch.logsumexp(b, 1, keepdim=True))  # log w_k, k < K
        del b
        w = logw.exp()
        xs = x.gather(1, top)  # s[π_k]
        lse = torch.logcumsumexp(xs.flip(1), 1).flip(1)  # suffix LSE within the first K
        if k < v:
            x.scatter_(1, top, _NEG_INF)  # x now holds the unranked tail only
            lse = torch.logaddexp(lse, torch.logsumexp(x, 1, keepdim=True))
        has_w = w > 0  # 0 · (LSE − s) = 0 even where both are -inf
        loss = torch.where(has_w, w * (lse - xs), 0.0).sum(1).clamp_min(0.0)
        loss_out[r0:r1] = row_policy(loss, bad, valid)
        if not want_grad:
            continue
        c = torch.logcumsumexp(torch.where(has_w, logw - lse, _NEG_INF), 1)
        g = x.add_(c[:, k - 1 :]).exp_() if k < v else x  # tail: exp(s_v + c_{K−1})
        g.scatter_(1, top, torch.exp(xs + c) - w)
        g.mul_(scale64).masked_fill_(bad.unsqueeze(1), torch.nan)
        if valid is not None:  # a fill, not a product: ignored rows stay 0 even if inf/NaN
            g.masked_fill_(~valid.unsqueeze(1), 0.0)
        grad_out[r0:r1] = g
