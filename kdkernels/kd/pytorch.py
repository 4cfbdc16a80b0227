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
q_{j*}(g_{j*} − ḡ) cancels catastrophically in float32. We keep the "pivot" j* apart:
G' = Σ_{v≠j*} q_v g_v, ḡ = q_{j*} g_{j*} + G', and the pivot's derivative is
q_{j*}((1 − q_{j*}) g_{j*} − G') with 1 − q_{j*} = −expm1(log q_{j*}), free of
cancellation. Logs come from log_softmax, which computes (a − max) − log Σ e^{a − max}
and so never rounds a large lse. The Triton kernel does the same with Z' = Σ_{v≠j*}
e^{a_v − a_{j*}} (1 − q_{j*} = Z'/(1+Z')), which it accumulates online.
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
        diff = p - q
        d_row = torch.linalg.vector_norm(diff, ord=1, dim=-1, keepdim=True).mul_(0.5)
        return d_row, torch.sign(diff).add_(1.0).mul_(-0.5)  # −½(sign(p − q) + 1)
    log_r = logp - logq
    if code == JSD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        x = log_r.add_(math.log(w) - math.log1p(-w))
        g = torch.where(q > 0, F.softplus(x).mul_(-(1 - w)), 0.0)
        return w * _xlog(p, logp, logm) + _xlog(q, logq, logm) * (1 - w), g
    if code == SKEW_FWD:
        logm = torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))
        x = log_r.add_(math.log(w) - math.log1p(-w))
        g = torch.where(p > 0, torch.sigmoid(x).mul_(-(1 - w) / w), 0.0)
        return _xlog(p, logp, logm), g
    if code == SKEW_REV:
        logm = torch.logaddexp(logp + math.log1p(-w), logq + math.log(w))
        x = log_r.add_(math.log1p(-w) - math.log(w))
        g = torch.where(q > 0, torch.sigmoid(x) - F.softplus(x), 0.0)
        return _xlog(q, logq, logm), g
    raise AssertionError(code)


def kd_fwd_torch(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int) -> None:
    """Fill loss_out[N] (float32, unscaled per-row losses) and, if grad_out is non-empty,
    grad_out[N, Vg] = scale·∂L_n/∂s (zero at ignored rows and at columns >= v).

    s: [N, Vs], t: [N, Vt] (both with >= v columns), labels: [N] or None,
    scale: 0-dim float tensor. grad_out may alias s: a chunk's logits are consumed
    before its gradient is written.
    """
    n = s.shape[0]
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    want_grad = grad_out.numel() > 0
    rows = max(1, CHUNK_ELEMS // max(v, 1))
    # A CPU scale is read once (free); on a GPU it stays a tensor (no host sync).
    scale_c = float(scale) if scale.device.type == "cpu" else scale.to(cdt)
    code = prm.div
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1, :v].to(cdt)
        a = x * prm.inv_temp if prm.inv_temp != 1.0 else x
        # log_softmax computes (a − max) − log Σ e^{a − max}: no rounding of a large lse.
        logq = torch.log_softmax(a, -1)
        valid = y_safe = None
        if labels is not None:
            y = labels[r0:r1]
            valid = y != prm.ignore_index
            y_safe = torch.where(valid, y, 0).long().unsqueeze(-1)
        loss = torch.zeros(r1 - r0, dtype=cdt, device=s.device)
        if prm.hard_w != 0.0:
            logsm = logq if prm.inv_temp == 1.0 else torch.log_softmax(x, -1)
            logsm_y = logsm.gather(-1, y_safe)
            loss = loss - prm.hard_w * logsm_y.squeeze(-1)
        g_pair = None
        if code != ZERO:
            b = t[r0:r1, :v].to(cdt)
            if prm.inv_temp != 1.0:
                b = b * prm.inv_temp
            if code == TAID:  # target r = softmax((1-λ) a + λ b), not lerp: keeps -inf
                b = (1 - prm.w) * a + prm.w * b
            logp = torch.log_softmax(b, -1)
            p = logp.exp()
            if code in (FWD_KL, TAID):
                # Σ p (log p − log q); entries with p = 0 give 0·(finite) or NaN (-inf both)
                d_row = torch.nansum(logp.sub_(logq).mul_(p), -1)
            else:
                q = logq.exp()
                piv = a.argmax(-1, keepdim=True)
                d, g = _pair_terms(code, logq, q, logp, p, prm.w, a, b, piv)
                d_row = d.sum(-1)  # (tvd returns its row sums already: a [R, 1] block)
                del d, logp, p
                if want_grad:
                    # ∂D/∂a = q (g − ḡ), the argmax j* of q kept apart (module docstring):
                    # ḡ = q_{j*} g_{j*} + G', pivot: q_{j*}((1 − q_{j*}) g_{j*} − G').
                    g_piv = g.gather(-1, piv)
                    logq_piv = logq.gather(-1, piv)
                    q_piv = logq_piv.exp()
                    qg = q * g
                    qg.scatter_(-1, piv, 0.0)
                    g_rest = qg.sum(-1, keepdim=True)
                    del qg
                    g_pair = g.sub_(q_piv * g_piv + g_rest).mul_(q)
                    g_pair.scatter_(-1, piv, q_piv * (-torch.expm1(logq_piv) * g_piv - g_rest))
                    del q
            del b
            loss.add_(d_row, alpha=prm.soft_w)
        if valid is not None:
            loss = torch.where(valid, loss, 0.0)
        loss_out[r0:r1] = loss.float()
        if not want_grad:
            continue
        # ∂L/∂s = scale·[soft_w/τ·∂D/∂a + hard_w·(softmax(s) − onehot(y))], written into
        # grad_out's block directly when the dtypes agree (x and a are not read after this).
        gv = grad_out[r0:r1, :v]
        out = gv if gv.dtype == cdt else torch.empty_like(logq)
        c_soft = prm.soft_w * prm.inv_temp * scale_c
        if code in (FWD_KL, TAID):
            torch.exp(logq, out=out).sub_(p).mul_(c_soft)
        elif g_pair is not None:
            torch.mul(g_pair, c_soft, out=out)
        else:
            out.zero_()
        if prm.hard_w != 0.0:
            # softmax(s) − onehot(y); at y, softmax_y − 1 = expm1(log softmax_y) exactly.
            c_hard = prm.hard_w * scale_c
            sm = logsm.exp().mul_(c_hard)
            out.add_(sm)
            fix = torch.expm1(logsm_y).mul_(c_hard) - sm.gather(-1, y_safe)
            out.scatter_add_(-1, y_safe, fix)
        if valid is not None:
            out[~valid] = 0.0
        if out is not gv:
            gv.copy_(out)
    if want_grad and grad_out.shape[1] > v:
        grad_out[:, v:].zero_()
