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
q_{j*}(g_{j*} − ḡ) cancels catastrophically in float32. We therefore keep the "pivot"
j* apart: Z' = Σ_{v≠j*} e^{a_v − a_{j*}} (so lse = a_{j*} + log1p(Z'), q_{j*} = 1/(1+Z'),
1 − q_{j*} = Z'/(1+Z') exactly), G' = Σ_{v≠j*} q_v g_v, and the pivot's derivative is
q_{j*}((1 − q_{j*}) g_{j*} − G'), free of cancellation. The Triton kernel does the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .params import FWD_KL, JSD, REV_KL, SKEW_FWD, SKEW_REV, TAID, TVD, ZERO, KDParams

CHUNK_ELEMS = 1 << 20  # elements per chunk block (4 MiB in float32)


def _xlog(x, logx, logy):
    """x (log x − log y), 0 where x == 0 (covers entries masked to -inf in both)."""
    return torch.where(x > 0, x * (logx - logy), 0.0)


def _pair_terms(code: int, logq, q, logp, p, w: float, la_lb, dc):
    """Per-element (d, g): d sums to D_n, g = ∂D/∂q up to a row constant.

    la_lb = (a − M_a) − (b − M_b) and dc = c_a − c_b give log r = log p − log q = dc − la_lb
    without the rounding of the normalisers. Each g is shifted by the constant that makes
    it vanish where p/q → 0 (where a saturated student puts its mass), so that g − ḡ does
    not cancel there: with x = log(κ) + log r,
      jsd       g = −(1−β) softplus(x),          κ = β/(1−β)
      skew fwd  g = −((1−α)/α) sigmoid(x),       κ = α/(1−α)
      skew rev  g = −softplus(x) + sigmoid(x),   κ = (1−α)/α
      tvd       g = 0 (q > p), −1 (q < p), −½ (q = p)
    """
    if code == REV_KL:
        g = torch.where(q > 0, la_lb, 0.0)
        return _xlog(q, logq, logp), g
    if code == TVD:
        g = torch.where(q > p, 0.0, torch.where(q < p, -1.0, -0.5))
        return 0.5 * (p - q).abs(), g
    log_r = dc - la_lb
    if code == JSD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        x = (math.log(w) - math.log1p(-w)) + log_r
        g = torch.where(q > 0, -(1 - w) * F.softplus(x), 0.0)
        return w * _xlog(p, logp, logm) + _xlog(q, logq, logm) * (1 - w), g
    if code == SKEW_FWD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        x = (math.log(w) - math.log1p(-w)) + log_r
        g = torch.where(p > 0, -((1 - w) / w) * torch.sigmoid(x), 0.0)
        return _xlog(p, logp, logm), g
    if code == SKEW_REV:
        logm = torch.logaddexp(logp + math.log1p(-w), logq + math.log(w))
        x = (math.log1p(-w) - math.log(w)) + log_r
        g = torch.where(q > 0, torch.sigmoid(x) - F.softplus(x), 0.0)
        return _xlog(q, logq, logm), g
    raise AssertionError(code)


def _neg_inf_safe(m):
    return torch.where(m == float("-inf"), 0.0, m)


def _pivot_shift(a):
    """(a − M, log1p(Z'), j*, Z') per row, M = max a at j*, Z' = Σ_{v≠j*} e^{a_v − M}.

    log q = (a − M) − log1p(Z'): both terms are small and exact-ish, whereas a − lse
    loses ulp(lse) when logits are large.
    """
    m, j = a.max(-1, keepdim=True)
    la = a - _neg_inf_safe(m)
    e = torch.exp(la)
    e.scatter_(-1, j, 0.0)
    zp = e.sum(-1, keepdim=True)
    return la, torch.log1p(zp), j, zp


def _shift(b):
    """(b − M, log Σ e^{b − M}) per row."""
    lb = b - _neg_inf_safe(b.amax(-1, keepdim=True))
    return lb, torch.logsumexp(lb, -1, keepdim=True)


def kd_fwd_torch(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int) -> None:
    """Fill loss_out[N] (float32, unscaled per-row losses) and, if grad_out is non-empty,
    grad_out[N, Vg] = scale·∂L_n/∂s (zero at ignored rows and at columns >= v).

    s: [N, Vs], t: [N, Vt] (both with >= v columns), labels: [N] or None,
    scale: 0-dim float tensor. grad_out may alias s (each chunk is read before written).
    """
    n = s.shape[0]
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    want_grad = grad_out.numel() > 0
    rows = max(1, CHUNK_ELEMS // max(v, 1))
    scale_c = scale.to(device=s.device, dtype=cdt)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1, :v].to(cdt)
        a = x * prm.inv_temp
        la, c_a, piv, zp = _pivot_shift(a)
        logq = la - c_a
        q = logq.exp()
        grad_a = None
        code = prm.div
        if code == ZERO:
            d_row = torch.zeros(r1 - r0, dtype=cdt, device=s.device)
        else:
            lb, c_b = _shift(t[r0:r1, :v].to(cdt) * prm.inv_temp)
            if code == TAID:  # target r = softmax((1-λ) a + λ b), not lerp: keeps -inf
                lb, c_b = _shift((1 - prm.w) * la + prm.w * lb)
            logp = lb - c_b
            p = logp.exp()
            if code in (FWD_KL, TAID):
                d_row = _xlog(p, logp, logq).sum(-1)
                if want_grad:
                    grad_a = q - p
            else:
                d, g = _pair_terms(code, logq, q, logp, p, prm.w, la - lb, c_a - c_b)
                d_row = d.sum(-1)
                if want_grad:
                    qg = q * g
                    g_piv = g.gather(-1, piv)
                    qg.scatter_(-1, piv, 0.0)
                    g_rest = qg.sum(-1, keepdim=True)  # G'
                    q_piv = 1.0 / (1.0 + zp)
                    grad_a = q * (g - (q_piv * g_piv + g_rest))
                    grad_a.scatter_(-1, piv, q_piv * (zp * q_piv * g_piv - g_rest))
            del lb, logp, p
        loss = prm.soft_w * d_row
        valid = None
        if labels is not None:
            y = labels[r0:r1]
            valid = y != prm.ignore_index
            y_safe = torch.where(valid, y, 0).long().unsqueeze(-1)
        if prm.hard_w != 0.0:
            lx, c_x = (la, c_a) if prm.inv_temp == 1.0 else _shift(x)
            loss = loss + prm.hard_w * (c_x - lx.gather(-1, y_safe)).squeeze(-1)
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
        loss_out[r0:r1] = loss.float()
        if not want_grad:
            continue
        # ∂L/∂s = soft_w/τ·∂D/∂a + hard_w·(softmax(s) − onehot(y))
        g_s = grad_a.mul_(prm.soft_w * prm.inv_temp) if grad_a is not None else torch.zeros_like(a)
        if prm.hard_w != 0.0:
            sm = torch.exp(lx - c_x) if prm.inv_temp != 1.0 else q
            ce_y = sm.gather(-1, y_safe) - 1.0
            if prm.inv_temp == 1.0:  # 1 − q_{j*} = Z'/(1+Z') when the label is the pivot
                ce_y = torch.where(y_safe == piv, -zp / (1.0 + zp), ce_y)
            g_s.add_(sm, alpha=prm.hard_w)
            g_s.scatter_(-1, y_safe, g_s.gather(-1, y_safe) - prm.hard_w * sm.gather(-1, y_safe)
                         + prm.hard_w * ce_y)
        g_s.mul_(scale_c)
        if valid is not None:
            g_s = torch.where(valid.unsqueeze(-1), g_s, 0.0)
        grad_out[r0:r1, :v] = g_s
    if want_grad and grad_out.shape[1] > v:
        grad_out[:, v:].zero_()
