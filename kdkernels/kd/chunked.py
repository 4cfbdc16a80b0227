"""The `torch` backend of `kd_loss`: exact PyTorch, chunked over rows.

Same contract as the Triton launcher (`kd_fwd`): per-row losses and, when asked, the
gradient of sum_n scale * L_n w.r.t. the student logits, written into preallocated
outputs. A chunk of rows is processed at a time, so besides the returned gradient the
only float temporaries are a few `chunk x V` blocks (about 4 MiB each).

Gradient algebra (shared with the kernels). With a = s/τ, q = softmax(a) and g = ∂D/∂q,
∂D/∂a_j = q_j g_j − q_j Σ_v q_v g_v. Each divergence supplies h_j = q_j g_j (computed
stably, never dividing by q) so that ∂D/∂a = h − q·Σh:
  forward KL   h = −p                        reverse KL  h = q (log q − log p)
  jsd          h = (1−β) q (log q − log m)   m = βp + (1−β)q
  skew fwd     h = −(1−α) p q / m            m = αp + (1−α)q
  skew rev     h = q (log q − log m − α q/m) m = (1−α)p + αq
  tvd          h = ½ q sign(q − p)           taid        h = −r
(constants dropped from g: they cancel in h − qΣh). The hard-label term adds
CE'(s) = softmax(s) − onehot(y) on the untempered logits.
"""

from __future__ import annotations

import math

import torch

from .params import FWD_KL, JSD, REV_KL, SKEW_FWD, SKEW_REV, TAID, TVD, ZERO, KDParams

CHUNK_ELEMS = 1 << 20  # elements per chunk block (4 MiB in float32)


def _xlog(x, logx, logy):
    """x (log x − log y), 0 where x == 0 (covers entries masked to -inf in both)."""
    return torch.where(x > 0, x * (logx - logy), 0.0)


def _terms(code: int, a, b, logq, q, w: float):
    """Per-element (d, h) for `code`; d sums to D_n, h as in the module docstring."""
    logp = torch.log_softmax(b, -1)
    p = logp.exp()
    if code == FWD_KL:
        return _xlog(p, logp, logq), -p
    if code == REV_KL:
        d = _xlog(q, logq, logp)
        return d, d
    if code == TAID:
        mix = (1 - w) * a + w * b  # not lerp: -inf in both must stay -inf
        logr = torch.log_softmax(mix, -1)
        r = logr.exp()
        return _xlog(r, logr, logq), -r
    if code == TVD:
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p)
    if code == JSD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        hq = (1 - w) * _xlog(q, logq, logm)
        return w * _xlog(p, logp, logm) + hq, hq
    if code == SKEW_FWD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        h = torch.where(p > 0, -(1 - w) * p * torch.exp(logq - logm), 0.0)
        return _xlog(p, logp, logm), h
    if code == SKEW_REV:
        logm = torch.logaddexp(logp + math.log1p(-w), logq + math.log(w))
        d = _xlog(q, logq, logm)
        h = torch.where(q > 0, d - w * q * torch.exp(logq - logm), 0.0)
        return d, h
    raise AssertionError(code)


def kd_fwd_torch(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int) -> None:
    """Fill loss_out[N] (float32, unscaled per-row losses) and, if grad_out is non-empty,
    grad_out[N, Vg] = scale * ∂L_n/∂s (zero at ignored rows and at columns >= v).

    s: [N, Vs], t: [N, Vt] (both with >= v columns), labels: [N] or None,
    scale: 0-dim float tensor.
    """
    n = s.shape[0]
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    want_grad = grad_out.numel() > 0
    if want_grad and grad_out.shape[1] > v:
        grad_out[:, v:].zero_()
    rows = max(1, CHUNK_ELEMS // max(v, 1))
    scale_c = scale.to(cdt)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1, :v].to(cdt)
        a = x * prm.inv_temp
        lse_a = torch.logsumexp(a, -1, keepdim=True)
        logq = a - lse_a
        q = logq.exp()
        if prm.div != ZERO:
            b = t[r0:r1, :v].to(cdt) * prm.inv_temp
            d, h = _terms(prm.div, a, b, logq, q, prm.w)
            loss = prm.soft_w * d.sum(-1)
            del d
        else:
            h = None
            loss = torch.zeros(r1 - r0, dtype=cdt, device=s.device)
        if labels is not None:
            y = labels[r0:r1]
            valid = y != prm.ignore_index
            y_safe = torch.where(valid, y, 0).long().unsqueeze(-1)
        else:
            valid = None
        if prm.hard_w != 0.0:
            lse_x = lse_a if prm.inv_temp == 1.0 else torch.logsumexp(x, -1, keepdim=True)
            ce = (lse_x - x.gather(-1, y_safe)).squeeze(-1)
            loss = loss + prm.hard_w * ce
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
        loss_out[r0:r1] = loss.float()
        if not want_grad:
            continue
        # ∂L/∂s = soft_w/τ · (h − q Σh) + hard_w (softmax(s) − onehot(y))
        if h is not None:
            if prm.div in (FWD_KL, TAID):  # Σh = −1 exactly
                g = q.add_(h)
            else:
                g = h.sub_(q * h.sum(-1, keepdim=True))
            g.mul_(prm.soft_w * prm.inv_temp)
        else:
            g = torch.zeros_like(q)
        if prm.hard_w != 0.0:
            sm = torch.exp(x - lse_x) if prm.inv_temp != 1.0 else logq.exp()
            g.add_(sm, alpha=prm.hard_w)
            g.scatter_add_(-1, y_safe, torch.full_like(y_safe, -prm.hard_w, dtype=cdt))
        g.mul_(scale_c)
        if valid is not None:
            g = torch.where(valid.unsqueeze(-1), g, 0.0)
        grad_out[r0:r1, :v] = g
