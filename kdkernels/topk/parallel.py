"""`topk_kd_loss` over a vocabulary split across ranks: the torch launcher
(docs/vocab_parallel.md).

The teacher's k indices are global class ids; each one lives on exactly one rank. Per
block of rows (the same blocks on every rank), in float64:

1. The student's tempered logits at the k indices: the owning rank writes its values,
   the others 0, and an all-reduce SUM of [rows, k] gives every rank all k of them
   exactly (x + 0 = x; NaN and ±inf pass through). O(N·k) bytes, not O(N).
2. tail="bucket" also needs the log-sum-exp over the unselected classes (the tail),
   taken from the classes themselves, never as total − selected: the local max of the
   tail with a NaN/+inf flag (all-reduce MAX of [rows, 2]), then Σ e^{a − M} over the
   local tail columns, sent in the same all-reduce SUM as step 1 ([rows, k + 1]).
3. Every rank then evaluates the same entry distributions, divergence and per-entry
   gradient r as the single-process path (kdkernels/topk/pytorch.py, whose helpers this
   reuses) and writes the gradient of its own columns: r_i at the selected classes it
   owns and, for the bucket, r_tail·exp(a_v − LSE_tail) at its tail classes.

Steps 3's per-entry math (`teacher_side`, `entry_logs`, `loss_and_r`) is shared with the
Triton launcher (parallel_triton.py), which replaces the local O(N·W) work of steps 1–3.
"""

from __future__ import annotations

import math

import torch

from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from ..parallel import Shards, all_reduce
from .pytorch import _div_terms, _entry_grad, _log_normalize, _lse_pivot

_NEG_INF = float("-inf")


def teacher_side(vals, pad, inv_temp: float, logprobs: bool, bucket: bool):
    """(u, entries, bad): the teacher's float64 u ([R, k], −inf at padding), whether the
    row has entries, and the rows whose teacher side has no softmax."""
    u = vals.to(torch.float64)
    if not logprobs:
        u = u * inv_temp
    u = u.masked_fill(pad, _NEG_INF)
    entries = (~pad).any(1)
    u_max = u.amax(1)
    bad = torch.isnan(u_max) | (u_max == math.inf)
    if not bucket:
        bad |= entries & (u_max == -math.inf)
    return u, entries, bad


def entry_logs(u, a_sel, pad, entries, bad, lse_tail, full):
    """(log p, log q, bad) over the entries (and the tail, lse_tail [R, 1] given: bucket).

    a_sel: [R, k] the all-reduced tempered student logits at the indices; full: [R, 1]
    every class selected (bucket: an empty tail)."""
    a_sel = a_sel.masked_fill(pad, _NEG_INF)
    if lse_tail is None:
        a_max = a_sel.amax(1)
        bad = bad | torch.isnan(a_max) | (a_max == math.inf) | (entries & (a_max == -math.inf))
        return _log_normalize(u), _log_normalize(a_sel), bad
    # lse_tail is −inf exactly when the tail max is: the row max's finiteness is the same
    row_max = torch.maximum(lse_tail[:, 0], a_sel.amax(1))
    bad = bad | ~torch.isfinite(row_max)
    lse_all = torch.logaddexp(lse_tail, torch.logsumexp(a_sel, 1, keepdim=True))
    lq = torch.cat([a_sel, lse_tail], 1) - lse_all
    lse_u = _lse_pivot(u).clamp_max(0.0)
    lp_tail = torch.log(-torch.expm1(lse_u))
    lp = torch.cat([u, lp_tail.masked_fill(full, _NEG_INF)], 1)
    return lp, lq, bad


def loss_and_r(code: int, beta: float, lp, lq, bad, labels, ignore_index: int,
               want_grad: bool, scale64, inv_temp: float):
    """(per-row loss, valid rows or None, r): r = scale·∂L/∂a per entry (None without
    the gradient); NaN at bad rows, 0 at ignored ones."""
    d, h = _div_terms(code, beta, lp, lq)
    valid = labels != ignore_index if labels is not None else None
    loss = row_policy(d.sum(1).clamp_min(0.0), bad, valid)
    if not want_grad:
        return loss, valid, None
    r = _entry_grad(h, lq)
    r = torch.where(bad.unsqueeze(1), torch.nan, r * (scale64 * inv_temp))
    if valid is not None:  # a fill, not a product: ignored rows stay 0 even if inf/NaN
        r = torch.where(valid.unsqueeze(1), r, 0.0)
    return loss, valid, r


def topk_kd_fwd_vocab_parallel(s, scale, loss_out, grad_out, backend, labels, idx, vals,
                               code: int, beta: float, inv_temp: float, logprobs: bool,
                               bucket: bool, ignore_index: int, sh: Shards) -> None:
    """Fill loss_out[N] (float32, 0 at ignored rows, the same on every rank) and, if
    grad_out is non-empty, grad_out[N, W] = scale·∂L_n/∂s at this rank's columns.

    s: [N, W] local student logits; idx: [N, k] global class ids (−1 = padding);
    vals: [N, k]; the other arguments as `topk_kd_fwd_torch`.
    """
    if backend == "triton":  # the same collectives, the local work in Triton kernels
        from .parallel_triton import topk_kd_fwd_vocab_parallel_triton

        return topk_kd_fwd_vocab_parallel_triton(s, scale, loss_out, grad_out, labels, idx,
                                                 vals, code, beta, inv_temp, logprobs,
                                                 bucket, ignore_index, sh)
    n = s.shape[0]
    k = idx.shape[1]
    f64 = torch.float64
    want_grad = grad_out.numel() > 0
    rows = chunk_rows(sh.max_width if bucket else k, itemsize=8)
    scale64 = scale.to(device=s.device, dtype=f64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ix = idx[r0:r1].long()
        pad = ix < 0
        owned = ~pad & (ix >= sh.start) & (ix < sh.stop)
        lix = torch.where(owned, ix - sh.start, 0)
        u, entries, bad = teacher_side(vals[r0:r1], pad, inv_temp, logprobs, bucket)
        x = s[r0:r1]
        part = torch.where(owned, x.gather(1, lix).to(f64) * inv_temp, 0.0)
        lse_tail = full = None
        if bucket:
            a = x.to(f64)
            if inv_temp != 1.0:
                a = a * inv_temp
            nonfin = torch.isnan(a) | (a == math.inf)
            sel = torch.zeros_like(a).scatter_add_(1, lix, owned.to(f64)) > 0
            tail = a.masked_fill(nonfin | sel, _NEG_INF)
            mx = torch.stack([tail.amax(1), nonfin.any(1).to(f64)], 1)
            all_reduce(mx, "max", sh.group)
            m_tail = mx[:, 0:1]
            m_safe = torch.where(torch.isfinite(m_tail), m_tail, 0.0)
            sums = torch.cat([part, torch.exp(tail - m_safe).sum(1, keepdim=True)], 1)
            all_reduce(sums, "sum", sh.group)
            part = sums[:, :k]
            lse_tail = torch.where(m_tail == _NEG_INF, _NEG_INF,
                                   m_safe + torch.log(sums[:, k:]))
            bad = bad | (mx[:, 1] > 0)
            full = (~pad).sum(1, keepdim=True) == sh.v  # every class selected: empty tail
        else:
            all_reduce(part, "sum", sh.group)
        lp, lq, bad = entry_logs(u, part, pad, entries, bad, lse_tail, full)
        lab = labels[r0:r1] if labels is not None else None
        loss, valid, r = loss_and_r(code, beta, lp, lq, bad, lab, ignore_index, want_grad,
                                    scale64, inv_temp)
        loss_out[r0:r1] = loss
        if not want_grad:
            continue
        if bucket:
            # tail classes: r_tail · softmax within the tail (selected and non-finite
            # entries are −inf in `tail`: exp gives 0, and a bad row's NaN r_tail spreads)
            g = torch.exp(tail - lse_tail.clamp_min(torch.finfo(f64).min)) * r[:, -1:]
        else:
            counted = bad & (valid if valid is not None else True)
            g = torch.where(counted, torch.nan, 0.0).to(f64).unsqueeze(1)
            g = g.expand(r1 - r0, s.shape[1]).clone()
        g.scatter_add_(1, lix, torch.where(owned, r[:, :k], 0.0))
        grad_out[r0:r1] = g
