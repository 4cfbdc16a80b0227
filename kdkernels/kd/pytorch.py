"""The `torch` backend of `kd_loss`: exact PyTorch, chunked over rows.

Same contract as the Triton launcher: per-row losses and, when asked, the gradient of
Σ_n scale·L_n w.r.t. the student logits, written into preallocated outputs. A chunk of
rows is processed at a time, so besides the returned gradient the only float
temporaries are a few `chunk x V` blocks (about 4 MiB each).

Gradient algebra (shared with the kernels). With a = s/τ, q = softmax(a) and
g = ∂D/∂q (constants dropped: they cancel), ∂D/∂a_j = q_j (g_j − ḡ), ḡ = Σ_v q_v g_v:
  reverse KL  g = log q − log p
  jsd         g = (1−β)(log q − log m)        m = βp + (1−β)q
  skew fwd    g = −(1−α) p/m                  m = αp + (1−α)q
  skew rev    g = log q − log m − α q/m       m = (1−α)p + αq
  tvd         g = ½ sign(q − p)
(_pair_terms evaluates them in a cancellation-free form.)
Forward KL and TAID use the closed form q − p (q − r). The hard-label term adds
CE'(s) = softmax(s) − onehot(y) on the untempered logits.

Precision: at wide logit spreads q is nearly one-hot at its argmax j*, ḡ ≈ g_{j*}, and
q_{j*}(g_{j*} − ḡ) cancels catastrophically in float32. Every term of the gradient sums to
0 over the row (softmax Jacobians), so the "pivot" j*'s entry is written as minus the sum
of the others, which carry no cancellation: this also covers forward KL's and TAID's
q − p and the hard label's softmax_y − 1, which are 1 − 1 at the pivot when student and
teacher peak at the same class (forward KL and TAID, whose other terms need no pivot,
find it on the CPU only in rows with an entry near 1: _near_one_hot_pivots). tvd takes its
pivot term p − q as Σ_{v≠j*} q − Σ_{v≠j*} p for the same reason. Logs come from
log_softmax, which computes (a − max) − log Σ e^{a − max} and so never rounds a large
lse. The Triton and CUDA kernels do the same (the pivot's entry last).
"""

from __future__ import annotations

import math

import torch

from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from .._core.validate import compute_dtype
from .params import (
    COSINE,
    DKD,
    FWD_KL,
    JSD,
    NKD,
    REV_KL,
    SKEW_FWD,
    SKEW_REV,
    TAID,
    TVD,
    ZERO,
    KDParams,
)


def _xlog(x, logx, logy):
    """x (log x − log y), 0 where x == 0 (covers entries masked to -inf in both)."""
    return torch.where(x > 0, x * (logx - logy), 0.0)


def _softplus(x):
    """log(1 + e^x) to the last bit at every x (F.softplus returns x above its threshold,
    off by log1p(e^-x), ~2e-9 at x = 20)."""
    return x.clamp_min(0).add_(torch.log1p(torch.exp(-x.abs())))


def _pair_terms(code: int, logq, q, logp, p, w: float, a, b, piv):
    """Per-element (d, g): d sums to D_n (tvd: d is already [R, 1]), g = ∂D/∂q up to a
    row constant.

    Reverse KL: g = log q − log p shifted to vanish at the pivot j*, computed from the
    logits themselves, g_v = (a_v − a_{j*}) − (b_v − b_{j*}): each term is one rounding of
    a difference of inputs, with no normaliser in it (a 300-sized lse costs 3e-5).

    Each g is shifted by the constant that makes it vanish where p/q → 0 (where a
    saturated student puts its mass), so that g − ḡ does not cancel there: with
    x = log(κ) + log p − log q,
      jsd       g = −(1−β) softplus(x),          κ = β/(1−β)
      skew fwd  g = −((1−α)/α) sigmoid(x),       κ = α/(1−α)
      skew rev  g = −softplus(x) + sigmoid(x),   κ = (1−α)/α
      tvd       g = 0 (q > p), −1 (q < p), −½ (q = p)
    """
    if code == REV_KL:
        g = (a - a.gather(-1, piv)).sub_(b - b.gather(-1, piv))
        return _xlog(q, logq, logp), torch.where(q > 0, g, 0.0)
    if code == TVD:
        # p − q, at the pivot as Σ_{v≠j*} q − Σ_{v≠j*} p (1 − 1 when both peak at j*)
        diff = (p - q).scatter_(-1, piv, 0.0)
        diff.scatter_(-1, piv, -diff.sum(-1, keepdim=True))
        # (a cascade sum: linalg.vector_norm's L1 loses ~1e-5 at V = 50k in float32)
        d_row = diff.abs().sum(-1, keepdim=True).mul_(0.5)
        return d_row, torch.sign(diff).add_(1.0).mul_(-0.5)  # −½(sign(p − q) + 1)
    log_r = logp - logq
    if code == JSD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        x = log_r.add_(math.log(w) - math.log1p(-w))
        g = torch.where(q > 0, _softplus(x).mul_(-(1 - w)), 0.0)
        return w * _xlog(p, logp, logm) + _xlog(q, logq, logm) * (1 - w), g
    if code == SKEW_FWD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        x = log_r.add_(math.log(w) - math.log1p(-w))
        g = torch.where(p > 0, torch.sigmoid(x).mul_(-(1 - w) / w), 0.0)
        return _xlog(p, logp, logm), g
    if code == SKEW_REV:
        logm = torch.logaddexp(logp + math.log1p(-w), logq + math.log(w))
        x = log_r.add_(math.log1p(-w) - math.log(w))
        # (sigmoid − softplus cancels where both are ≈ w ≪ 1: rows whose gradient is that
        # small keep ~1e-3 of it here; the kernels evaluate it as a series instead)
        g = torch.where(q > 0, torch.sigmoid(x) - _softplus(x), 0.0)
        return _xlog(q, logq, logm), g
    raise AssertionError(code)


def _centered(q, g):
    """∂D/∂a = q (g − ḡ), ḡ = Σ_v q_v g_v. The pivot's own entry, where this cancels, is
    replaced afterwards (kd_fwd_torch)."""
    g_bar = (q * g).sum(-1, keepdim=True)
    return g.sub_(g_bar).mul_(q)


# A row whose largest probability is above 1 − 2⁻¹⁰ may lose its pivot entry to 1 − 1.
_NEAR_ONE_HOT = -(2.0**-10)


def _pivot_last(g, piv, rows=None):
    """Rewrite the pivot's entry of the row-gradient g [R, V] as minus the sum of the
    others (every term sums to 0 over the row). piv: the argmax [R', 1] of the rows
    `rows` ([R'] indices, None: all rows)."""
    if rows is None:
        g.scatter_(-1, piv, 0.0)
        g.scatter_(-1, piv, -g.sum(-1, keepdim=True))
    elif rows.numel():
        sub = g[rows].scatter_(-1, piv, 0.0)
        g[rows] = sub.scatter_(-1, piv, -sub.sum(-1, keepdim=True))


def _near_one_hot_pivots(a, lq_max, logsm):
    """(rows, their argmax) of the rows where q (or softmax(s), for the hard label) has
    an entry near 1: forward KL's and TAID's closed-form q − p, and softmax_y − 1, only
    cancel there. Found on the CPU with one cheap reduction (an argmax of every row would
    cost this path a fifth of its time); on a GPU every row (no host sync)."""
    if a.device.type != "cpu":
        return None, a.argmax(-1, keepdim=True)
    near = lq_max > _NEAR_ONE_HOT
    if logsm is not None:
        near |= logsm.amax(-1) > _NEAR_ONE_HOT
    rows = near.nonzero()[:, 0]
    return rows, a[rows].argmax(-1, keepdim=True)


def kd_fwd_torch(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int,
                 parts=None) -> None:
    """Fill loss_out[N] (float32, unscaled per-row losses) and, if grad_out is non-empty,
    grad_out[N, Vg] = scale·∂L_n/∂s (zero at ignored rows and at columns >= v).

    s: [N, Vs], t: [N, Vt] (both with >= v columns), labels: [N] or None,
    scale: 0-dim float tensor. grad_out may alias s: a chunk's logits are consumed
    before its gradient is written. parts: None or [N, 2] float32, each row's addends
    soft_w·D_n and hard_w·CE_n (the loss is their sum; NaN / 0 as the loss).
    """
    if prm.div in (DKD, NKD, COSINE):  # a label's target column, or row norms
        from .cosine import kd_fwd_torch_cosine
        from .decoupled import kd_fwd_torch_decoupled

        fn = kd_fwd_torch_cosine if prm.div == COSINE else kd_fwd_torch_decoupled
        return fn(s, t, labels, scale, loss_out, grad_out, prm, v, parts)
    n = s.shape[0]
    cdt = compute_dtype(s)
    want_grad = grad_out.numel() > 0
    rows = chunk_rows(v)
    # A CPU scale is read once (free); on a GPU it stays a tensor (no host sync).
    scale_c = float(scale) if scale.device.type == "cpu" else scale.to(cdt)
    code = prm.div
    inv_temp_t = prm.teacher_inv_temp
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1, :v].to(cdt)
        a = x * prm.inv_temp if prm.inv_temp != 1.0 else x
        logq = torch.log_softmax(a, -1)
        # A row without a softmax (NaN or +inf anywhere, or every entry -inf) has a NaN
        # in its log_softmax, which amax propagates: its loss and gradient row are NaN,
        # whatever the terms below make of it (docs/spec.md).
        lq_max = logq.amax(-1)
        piv_rows = None
        if code not in (FWD_KL, TAID, ZERO):
            piv = a.argmax(-1, keepdim=True)
        valid = y_safe = None
        if labels is not None:
            y = labels[r0:r1]
            valid = y != prm.ignore_index
            y_safe = torch.where(valid, y, 0).long().unsqueeze(-1)
        loss = torch.zeros(r1 - r0, dtype=cdt, device=s.device)
        bad = torch.isnan(lq_max)
        if prm.hard_w != 0.0:
            logsm = logq if prm.inv_temp == 1.0 else torch.log_softmax(x, -1)
            logsm_y = logsm.gather(-1, y_safe)
            loss = loss - prm.hard_w * logsm_y.squeeze(-1)
        if parts is not None:
            hard_part, soft_part = loss.clone(), torch.zeros_like(loss)
        if want_grad and code in (FWD_KL, TAID, ZERO):  # (now: the gradient may overwrite a)
            sep = prm.hard_w != 0.0 and prm.inv_temp != 1.0
            piv_rows, piv = _near_one_hot_pivots(a, lq_max, logsm if sep else None)
        g_pair = None
        if code != ZERO:
            b = t[r0:r1, :v].to(cdt)
            if inv_temp_t != 1.0:
                b = b * inv_temp_t
            if code == TAID:  # target r = softmax((1-λ) a + λ b), not lerp: keeps -inf
                b = (1 - prm.w) * a + prm.w * b
            logp = torch.log_softmax(b, -1)
            bad |= torch.isnan(logp.amax(-1))
            p = logp.exp()
            if code in (FWD_KL, TAID):
                # Σ p (log p − log q); an entry with p = 0 gives 0·(finite) or NaN (-inf
                # in both), which nansum drops (a real NaN input is caught by `bad`)
                d_row = torch.nansum(logp.sub_(logq).mul_(p), -1)
            else:
                q = logq.exp()
                d, g = _pair_terms(code, logq, q, logp, p, prm.w, a, b, piv)
                d_row = d.sum(-1)  # (tvd returns its row sums already: a [R, 1] block)
                del d, logp, p
                if want_grad:
                    g_pair = _centered(q, g)
                    del q
            del b
            # every divergence here is >= 0: rounding may not make it negative (NaN stays)
            loss.add_(d_row.clamp_min(0.0), alpha=prm.soft_w)
            if parts is not None:
                soft_part = d_row.clamp_min(0.0).mul_(prm.soft_w)
        loss_out[r0:r1] = row_policy(loss, bad, valid)
        if parts is not None:
            parts[r0:r1, 0] = row_policy(soft_part, bad, valid)
            parts[r0:r1, 1] = row_policy(hard_part, bad, valid)
        if not want_grad:
            continue
        # ∂L/∂s = scale·[soft_w/τ·∂D/∂a + hard_w·(softmax(s) − onehot(y))], written into
        # grad_out's block directly when the dtypes agree (x and a are not read after this).
        gv = grad_out[r0:r1, :v]
        out = gv if gv.dtype == cdt else torch.empty_like(logq)
        c_soft = prm.soft_w * prm.inv_temp * scale_c
        c_soft = torch.as_tensor(c_soft, dtype=cdt, device=s.device)
        row_c = torch.where(bad, torch.nan, c_soft).unsqueeze(-1)  # NaN in bad rows
        if code in (FWD_KL, TAID):
            torch.exp(logq, out=out).sub_(p).mul_(row_c)
        elif g_pair is not None:
            torch.mul(g_pair, row_c, out=out)
        else:
            out.copy_(row_c.mul(0.0).expand_as(out))  # zeros, NaN in bad rows
        if prm.hard_w != 0.0:  # + softmax(s) − onehot(y)
            c_hard = prm.hard_w * scale_c
            out.add_(logsm.exp_().mul_(c_hard))
            out.scatter_add_(-1, y_safe, torch.ones_like(logsm_y).mul_(-c_hard))
        # Every term sums to 0 over the row (softmax Jacobians), so the pivot's entry is
        # minus the sum of the others: there q (and p, softmax(s)) may round to 1, and
        # q − p, q(g − ḡ) or softmax_y − 1 would be 1 − 1.
        _pivot_last(out, piv, piv_rows)
        if valid is not None:
            out.masked_fill_(~valid.unsqueeze(-1), 0.0)
        if out is not gv:
            gv.copy_(out)
    if want_grad and grad_out.shape[1] > v:
        grad_out[:, v:].zero_()
