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
3. Every rank then evaluates the same entry distributions, divergence (TAID's target
   included: it is O(k) per row) and per-entry gradient r as the single-process path
   (kdkernels/topk/pytorch.py, whose helpers this reuses) and writes the gradient of its
   own columns: r_i at the selected classes it owns and, for the bucket,
   r_tail·exp(a_v − LSE_tail) at its tail classes.
4. hard_label_weight > 0: the cross-entropy of the untempered row x needs its full-row
   log-sum-exp and x_y. The local max of x and a NaN/+inf flag join the all-reduce MAX
   (giving M); Σ e^{x − M} over the local columns, leaving out the local argmax on a
   rank whose max is M (a claimant, as kd/parallel.py), the claimant count and x_y from
   the label's owner (0 elsewhere) join the all-reduce SUM: Z' = Σ + (claimants − 1),
   CE = (M − x_y) + log1p(Z'), and the label column's softmax − 1 is −Z'/(1 + Z') where
   the owner's argmax is the label and it alone holds M. No collective is added to the
   bucket's two; renormalize gains the MAX.

Steps 3's per-entry math (`teacher_side`, `entry_logs`, `loss_and_r`) is shared with the
Triton launcher (parallel_triton.py), which replaces the local O(N·W) work of steps 1–3
(not step 4: the hard-label term runs on backend='torch' only, `vocab_parallel_reason`).
"""

from __future__ import annotations

import math

import torch

from .._core.chunking import chunk_rows
from .._core.codes import Div
from .._core.rowgrad import row_policy
from ..parallel import Shards, all_reduce
from .pytorch import _entry_grad, _log_normalize, _lse_pivot, soft_terms

_NEG_INF = float("-inf")
ZERO, TAID = int(Div.ZERO), int(Div.TAID)


def vocab_parallel_reason(backend: str, *, div: int, hard_label: bool) -> str | None:
    """None when the vocabulary-parallel launcher of `backend` takes these options, else
    why not: the hard-label term runs on 'torch' only; TAID on 'torch' and 'triton' (its
    O(k) entry math is the torch path's)."""
    if backend == "torch":
        return None
    if hard_label:
        return (f"hard_label_weight > 0 runs on backend='torch' only (the {backend} "
                "two-phase kernels have no hard-label term); pass backend='torch' or 'auto'")
    if div == TAID and backend != "triton":
        return (f"divergence='taid' runs on backend='torch' or 'triton' only, not "
                f"{backend!r}; pass backend='torch' or 'auto'")
    return None


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


def soft_rows(code: int, w: float, lp, lq, has, bad, want_grad: bool, c_grad):
    """(D [R] >= 0, bad [R], r): the divergence per row, the bad rows plus TAID's with
    disjoint supports (`has`: the rows with entries), and r = c_grad·∂D/∂log q_e per
    entry (None without the gradient); no policy applied."""
    d, h, bad_mix = soft_terms(code, w, lp, lq, has)
    if bad_mix is not None:
        bad = bad | bad_mix
    r = _entry_grad(h, lq) * c_grad if want_grad else None
    return d.sum(1).clamp_min(0.0), bad, r


def loss_and_r(code: int, w: float, lp, lq, has, bad, labels, ignore_index: int,
               want_grad: bool, scale64, inv_temp: float, soft_w: float = 1.0):
    """(per-row loss, valid rows or None, r): the loss soft_w·D and r = scale·∂L/∂a per
    entry (None without the gradient) under the policy: NaN at bad rows, 0 at ignored
    ones."""
    d, bad, r = soft_rows(code, w, lp, lq, has, bad, want_grad, scale64 * (soft_w * inv_temp))
    valid = labels != ignore_index if labels is not None else None
    loss = row_policy(d * soft_w, bad, valid)
    if not want_grad:
        return loss, valid, None
    r = torch.where(bad.unsqueeze(1), torch.nan, r)
    if valid is not None:  # a fill, not a product: ignored rows stay 0 even if inf/NaN
        r = torch.where(valid.unsqueeze(1), r, 0.0)
    return loss, valid, r


def _masked(x):
    """(x with NaN/+inf entries as −inf, [R] float flag: the row had such an entry)."""
    nonfin = torch.isnan(x) | (x == math.inf)
    return x.masked_fill(nonfin, _NEG_INF), nonfin.any(1).to(x.dtype)


class _HardLabel:
    """Step 4 of the module docstring for one block of rows: `local()` the MAX columns,
    `partial(M)` the SUM columns, `finish(sums)` the CE and bad rows, `grad()` the local
    softmax(x) − onehot(y)."""

    def __init__(self, x, labels, valid, sh: Shards):
        self.x, bad_x = _masked(x.to(torch.float64))
        self.m_loc, self.bad_x = self.x.amax(1), bad_x
        y = labels.long()
        self.y_ok = valid & (y >= 0) & (y < sh.v)
        self.owns = self.y_ok & (y >= sh.start) & (y < sh.stop)
        self.y_loc = torch.where(self.owns, y - sh.start, 0).unsqueeze(1)
        self.j = self.x.argmax(1, keepdim=True)

    def local(self):
        return [self.m_loc, self.bad_x]

    def partial(self, big_m, flag):
        self.big_m, self.bad = big_m, flag > 0
        self.m_safe = torch.where(torch.isfinite(big_m), big_m, 0.0).unsqueeze(1)
        self.claim = (self.m_loc == big_m) & torch.isfinite(big_m)
        e = torch.exp(self.x - self.m_safe)
        self.e = e
        rest = e.scatter(1, self.j, 0.0).sum(1)
        z_loc = torch.where(self.claim, rest, e.sum(1))
        x_y = torch.where(self.owns, self.x.gather(1, self.y_loc)[:, 0], 0.0)
        return [z_loc, self.claim.to(self.x.dtype), x_y]

    def finish(self, sums, valid):
        z_loc, claims, x_y = sums.unbind(1)
        self.z = (z_loc + (claims - 1.0).clamp_min(0.0)).unsqueeze(1)
        self.alone = self.claim & (claims == 1.0)
        ce = (self.big_m - x_y) + torch.log1p(self.z[:, 0])
        bad = self.bad | ~torch.isfinite(self.big_m) | (valid & ~self.y_ok)
        return ce, bad

    def grad(self):
        g = self.e.div_(1.0 + self.z)
        at_piv = self.alone.unsqueeze(1) & (self.y_loc == self.j)
        g_y = torch.where(at_piv, -self.z / (1.0 + self.z), g.gather(1, self.y_loc) - 1.0)
        return g.scatter_(1, self.y_loc, torch.where(self.owns.unsqueeze(1), g_y,
                                                     g.gather(1, self.y_loc)))


def topk_kd_fwd_vocab_parallel(s, scale, loss_out, grad_out, backend, labels, idx, vals,
                               code: int, w: float, inv_temp: float, logprobs: bool,
                               bucket: bool, ignore_index: int, sh: Shards,
                               soft_w: float = 1.0, hard_w: float = 0.0) -> None:
    """Fill loss_out[N] (float32, 0 at ignored rows, the same on every rank) and, if
    grad_out is non-empty, grad_out[N, W] = scale·∂L_n/∂s at this rank's columns.

    s: [N, W] local student logits; idx: [N, k] global class ids (−1 = padding);
    vals: [N, k]; the other arguments as `topk_kd_fwd_torch` (backend 'triton': no
    hard-label term, see `vocab_parallel_reason`).
    """
    if backend == "triton":  # the same collectives, the local work in Triton kernels
        from .parallel_triton import topk_kd_fwd_vocab_parallel_triton

        return topk_kd_fwd_vocab_parallel_triton(s, scale, loss_out, grad_out, labels, idx,
                                                 vals, code, w, inv_temp, logprobs,
                                                 bucket, ignore_index, sh, soft_w)
    if backend == "cuda":  # the same collectives, the local work in CUDA kernels
        from .parallel_cuda import topk_kd_fwd_vocab_parallel_cuda

        return topk_kd_fwd_vocab_parallel_cuda(s, scale, loss_out, grad_out, labels, idx,
                                               vals, code, w, inv_temp, logprobs, bucket,
                                               ignore_index, sh, soft_w)
    n = s.shape[0]
    k = idx.shape[1]
    f64 = torch.float64
    want_grad = grad_out.numel() > 0
    soft = code != ZERO
    bucket = bucket and soft
    hard = hard_w != 0.0
    rows = chunk_rows(sh.max_width if bucket or hard else k, itemsize=8)
    scale64 = scale.to(device=s.device, dtype=f64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1]
        lab = labels[r0:r1] if labels is not None else None
        valid = lab != ignore_index if lab is not None else None
        ix = idx[r0:r1].long()
        pad = ix < 0
        owned = ~pad & (ix >= sh.start) & (ix < sh.stop)
        lix = torch.where(owned, ix - sh.start, 0)
        hl = _HardLabel(x, lab, valid, sh) if hard else None
        # --- the all-reduce MAX: the tail's max and flag (bucket), x's max and flag (hard)
        maxes = []
        if bucket:
            a = x.to(f64)
            if inv_temp != 1.0:
                a = a * inv_temp
            nonfin = torch.isnan(a) | (a == math.inf)
            sel = torch.zeros_like(a).scatter_add_(1, lix, owned.to(f64)) > 0
            tail = a.masked_fill(nonfin | sel, _NEG_INF)
            maxes += [tail.amax(1), nonfin.any(1).to(f64)]
        if hard:
            maxes += hl.local()
        if maxes:
            mx = torch.stack(maxes, 1)
            all_reduce(mx, "max", sh.group)
        # --- the all-reduce SUM: the gathered logits, the tail's Σ, the hard label's sums
        sums = []
        if soft:
            sums.append(torch.where(owned, x.gather(1, lix).to(f64) * inv_temp, 0.0))
        if bucket:
            m_tail = mx[:, 0:1]
            m_safe = torch.where(torch.isfinite(m_tail), m_tail, 0.0)
            sums.append(torch.exp(tail - m_safe).sum(1, keepdim=True))
        if hard:
            sums.append(torch.stack(hl.partial(mx[:, -2], mx[:, -1]), 1))
        sm = torch.cat(sums, 1)
        all_reduce(sm, "sum", sh.group)
        loss = torch.zeros(r1 - r0, dtype=f64, device=s.device)
        bad = torch.zeros(r1 - r0, dtype=torch.bool, device=s.device)
        r = None
        if soft:
            u, entries, bad = teacher_side(vals[r0:r1], pad, inv_temp, logprobs, bucket)
            lse_tail = full = None
            if bucket:
                lse_tail = torch.where(m_tail == _NEG_INF, _NEG_INF,
                                       m_safe + torch.log(sm[:, k:k + 1]))
                bad = bad | (mx[:, 1] > 0)
                full = (~pad).sum(1, keepdim=True) == sh.v  # every class selected
            lp, lq, bad = entry_logs(u, sm[:, :k], pad, entries, bad, lse_tail, full)
            has = torch.ones_like(entries) if bucket else entries
            d, bad, r = soft_rows(code, w, lp, lq, has, bad, want_grad,
                                  scale64 * (soft_w * inv_temp))
            loss = d * soft_w
        if hard:
            ce, bad_h = hl.finish(sm[:, -3:], valid)
            loss = loss + hard_w * ce
            bad = bad | bad_h
        loss_out[r0:r1] = row_policy(loss, bad, valid)
        if not want_grad:
            continue
        if bucket:
            # tail classes: r_tail · softmax within the tail (selected and non-finite
            # entries are −inf in `tail`: exp gives 0)
            g = torch.exp(tail - lse_tail.clamp_min(torch.finfo(f64).min)) * r[:, -1:]
        else:
            g = torch.zeros(r1 - r0, s.shape[1], dtype=f64, device=s.device)
        if hard:
            g.add_(hl.grad().mul_(scale64 * hard_w))
        if r is not None:
            g.scatter_add_(1, lix, torch.where(owned, r[:, :k], 0.0))
        counted = bad if valid is None else bad & valid
        g.masked_fill_(counted.unsqueeze(1), torch.nan)  # fills: NaN·0 would be NaN
        if valid is not None:
            g.masked_fill_(~valid.unsqueeze(1), 0.0)
        grad_out[r0:r1] = g
