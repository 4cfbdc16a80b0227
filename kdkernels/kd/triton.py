"""Triton kernels of the softmax-KL family (docs/spec.md §1).

One program per row streams the vocabulary in BLOCK_V tiles with an online softmax
(running max and rescaled sum per distribution, merged exactly), float32 arithmetic,
int64 row offsets, and no N x V float32 buffer. Per row:

  pass 1  online log-sum-exp of a = s/τ (with its argmax kept apart, see pytorch.py) and
          of b = t/τ_t (τ_t: the teacher's temperature, τ unless given; or of the TAID
          mix; and of the untempered s when a tempered run has a hard-label term).
          Forward KL and TAID also accumulate their loss online:
          KL(p‖q) = Σp(b−a) − lse_b + lse_a with Σp(b−a) = Σ e^{b−M}(b−a) / Σ e^{b−M},
          rescaled whenever the running max M moves.
  pass 2  (reverse KL, jsd, skew KL, tvd) D = Σ d_j and the gradient statistics
          G' = Σ_{v≠j*} q_v g_v, g_{j*} with the final normalisers.
  pass 3  (only when the student needs a gradient) the gradient, in the input dtype:
          ∂L/∂s_j = scale·[soft_w/τ·q_j (g_j − ḡ) + hard_w·(softmax(s)_j − [j=y])]
          (g as in pytorch.py; forward KL and TAID use q − p and q − r directly).

The gradient is computed here, in the forward pass, rather than recomputed in backward:
the logits need not be kept for backward (the caller may free both N x V inputs and only
the gradient, one input-sized tensor, stays alive), and the teacher is never re-read.
Backward only rescales the stored gradient by the upstream gradient, on the device, and
skips rows whose upstream factor is exactly 1 (the usual loss.backward()).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.math import (
    log1p,
    logaddexp,
    nonfinite_count,
    online_step,
    safe_max,
    sigmoid,
    sigmoid_minus_softplus,
    softplus,
)
from .._triton.rows import store_zeros
from .._triton.tiles import row_tile
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

C_ZERO = tl.constexpr(ZERO)
C_FWD = tl.constexpr(FWD_KL)
C_REV = tl.constexpr(REV_KL)
C_JSD = tl.constexpr(JSD)
C_SKEW_FWD = tl.constexpr(SKEW_FWD)
C_SKEW_REV = tl.constexpr(SKEW_REV)
C_TVD = tl.constexpr(TVD)
C_TAID = tl.constexpr(TAID)


@triton.jit
def _pair_terms(logq, logp, la_lb, dc, w, log_w, log_1mw, DIV: tl.constexpr):
    """Per-element (d, g) of the divergences that need normalised p and q: d sums to D_n,
    g = ∂D/∂q shifted to vanish where p/q → 0 (pytorch._pair_terms derives each form).
    la_lb = (a − M_a) − (b − b_ref) (b_ref = M_b, or b at the pivot for reverse KL), so
    log r = log p − log q = dc − la_lb without the normalisers' rounding."""
    q = tl.exp(logq)
    p = tl.exp(logp)
    log_r = dc - la_lb
    if DIV == C_REV:
        g = tl.where(q > 0, la_lb, 0.0)
        d = tl.where(q > 0, q * (logq - logp), 0.0)
    elif DIV == C_JSD:  # m = βp + (1−β)q
        logm = logaddexp(logp + log_w, logq + log_1mw)
        g = tl.where(q > 0, -(1.0 - w) * softplus(log_w - log_1mw + log_r), 0.0)
        d = tl.where(p > 0, w * p * (logp - logm), 0.0) + tl.where(
            q > 0, (1.0 - w) * q * (logq - logm), 0.0)
    elif DIV == C_SKEW_FWD:  # m = αp + (1−α)q, D = KL(p‖m)
        logm = logaddexp(logp + log_w, logq + log_1mw)
        d = tl.where(p > 0, p * (logp - logm), 0.0)
        g = tl.where(p > 0, -((1.0 - w) / w) * sigmoid(log_w - log_1mw + log_r), 0.0)
    elif DIV == C_SKEW_REV:  # m = (1−α)p + αq, D = KL(q‖m)
        logm = logaddexp(logp + log_1mw, logq + log_w)
        d = tl.where(q > 0, q * (logq - logm), 0.0)
        x = log_1mw - log_w + log_r
        g = tl.where(q > 0, sigmoid_minus_softplus(x), 0.0)
    else:  # tvd
        d = 0.5 * tl.abs(p - q)
        g = tl.where(q > p, 0.0, tl.where(q < p, -1.0, -0.5))
    return d, g


@triton.jit
def _kd_fwd_kernel(
    S, T, LABELS, SCALE, LOSS, GRAD, PARTS,
    n_inner, stride_s_outer, stride_s, stride_t_outer, stride_t, stride_g, V, V_G,
    inv_temp, inv_temp_t, w, log_w, log_1mw, soft_w, hard_w, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, TEMPERED: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ZERO_TAIL: tl.constexpr, WRITE_PARTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Notation: a = s/τ, b = t/τ_t (τ_t the teacher's temperature: inv_temp_t),
    # q = softmax(a), p = softmax(b). PARTS (WRITE_PARTS): each row's two addends of the
    # loss, soft_w·D and hard_w·CE, at [2·row] and [2·row + 1]. The student's running
    # max M_a sits at the pivot column j*; Z' = Σ_{v≠j*} e^{a_v − M_a} excludes it, so
    # log q = (a − M_a) − log1p(Z') and 1 − q_{j*} = Z'/(1+Z') carry no cancellation
    # (pytorch.py explains why). Rows of p use (M_b, Z_b) the same way without a pivot.
    # Row n of the logits sits at (n // n_inner)·stride_outer + (n % n_inner)·stride: a
    # [B, T-1, V] slice of [B, T, V] is read in place (one stride: n_inner = N).
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row - outer * n_inner
    s_row = S + outer * stride_s_outer + inner * stride_s
    t_row = T + outer * stride_t_outer + inner * stride_t
    g_row = GRAD + row * stride_g
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    ONLINE: tl.constexpr = (DIV == C_ZERO) or (DIV == C_FWD) or (DIV == C_TAID)
    NEED_B: tl.constexpr = (DIV != C_ZERO) and (DIV != C_TAID)
    SEPARATE_CE: tl.constexpr = HARD and TEMPERED

    y = 0
    valid = True
    if HAS_LABELS:
        y = tl.load(LABELS + row).to(tl.int64)
        valid = y != ignore_index

    if valid:
        # ---- pass 1: online max/sum statistics (and the online loss of FWD/TAID)
        m_a = float("-inf")
        zp = 0.0
        piv = 0
        m_b = float("-inf")
        z_b = 0.0
        m_x = float("-inf")
        z_x = 0.0
        acc = 0.0
        n_bad = 0  # NaN / +inf entries: the row has no softmax (the policy: a NaN loss)
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            msk = cols < V
            x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            n_bad += nonfinite_count(x)
            a = x * inv_temp
            t_max = tl.max(a, 0)
            t_arg = tl.argmax(a, 0)
            new = t_max > m_a
            ma_new = tl.where(new, t_max, m_a)
            ma_s = safe_max(ma_new)
            ea = tl.exp(a - ma_s)
            ra = tl.exp(m_a - ma_s)
            old_piv = tl.where(m_a == NEG_INF, 0.0, 1.0)
            tile = tl.sum(tl.where(lanes == t_arg, tl.where(new, 0.0, ea), ea), 0)
            zp = tl.where(new, (zp + old_piv) * ra, zp) + tile
            piv = tl.where(new, off + t_arg, piv)
            if NEED_B:
                b = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32) * inv_temp_t
                n_bad += nonfinite_count(b)
                mb_new, eb, rb = online_step(m_b, b)
                if DIV == C_FWD:  # Σ e^{b−M_b} (b − a)
                    acc = acc * rb + tl.sum(tl.where(eb > 0, eb * (b - a), 0.0), 0)
                z_b = z_b * rb + tl.sum(eb, 0)
                m_b = mb_new
            if DIV == C_TAID:  # c = (1−λ) a + λ b; Σ e^{c−M_c} (c − a)
                b = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32) * inv_temp_t
                n_bad += nonfinite_count(b)
                c = (1.0 - w) * a + w * b
                mc_new, ec, rc = online_step(m_b, c)
                acc = acc * rc + tl.sum(tl.where(ec > 0, ec * (c - a), 0.0), 0)
                z_b = z_b * rc + tl.sum(ec, 0)
                m_b = mc_new
            if SEPARATE_CE:
                mx_new, ex, rx = online_step(m_x, x)
                z_x = z_x * rx + tl.sum(ex, 0)
                m_x = mx_new
            m_a = ma_new
        # no softmax: a NaN or +inf entry, or every entry -inf (student, teacher or mix)
        bad = (n_bad > 0) | (m_a == NEG_INF)
        if DIV != C_ZERO:
            bad = bad | (m_b == NEG_INF)
        m_a = safe_max(m_a)
        m_b = safe_max(m_b)
        c_a = log1p(zp)  # lse_a = M_a + c_a
        c_b = tl.log(z_b)  # lse_b = M_b + c_b (TAID: of the mix c)
        if SEPARATE_CE:
            m_x = safe_max(m_x)
            c_x = tl.log(z_x)
        else:
            m_x = m_a
            c_x = c_a

        d_row = 0.0
        if DIV == C_FWD:  # Σp(b−a) − lse_b + lse_a
            d_row = (acc / z_b - m_b + m_a) - c_b + c_a
        if DIV == C_TAID:
            d_row = (acc / z_b - m_b + m_a) - c_b + c_a
        q_piv = 1.0 / (1.0 + zp)
        # Reverse KL's g = log q − log p is taken relative to the pivot, from the logits
        # themselves: (a − a_{j*}) − (b − b_{j*}), free of the normalisers' rounding.
        b_ref = m_b
        if DIV == C_REV:
            b_ref = tl.load(t_row + piv).to(tl.float32) * inv_temp_t
        g_bar = 0.0
        # ---- pass 2: divergences that need normalised distributions
        if not ONLINE:
            d_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            qg_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            gp_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
            pr_acc = tl.zeros([BLOCK_V], dtype=tl.float32)  # tvd: Σ_{v≠j*} p_v
            for off in range(0, V, BLOCK_V):
                cols = off + lanes
                msk = cols < V
                la = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32) * inv_temp - m_a
                b = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32) * inv_temp_t
                logq = la - c_a
                d, g = _pair_terms(logq, (b - m_b) - c_b, la - (b - b_ref), c_a - c_b, w, log_w,
                                   log_1mw, DIV)
                is_piv = cols == piv
                qg_acc += tl.where(msk, tl.where(is_piv, 0.0, tl.exp(logq) * g), 0.0)
                gp_acc += tl.where(is_piv, g, 0.0)
                if DIV == C_TVD:
                    rest = msk & (cols != piv)
                    d_acc += tl.where(rest, d, 0.0)
                    pr_acc += tl.where(rest, tl.exp((b - m_b) - c_b), 0.0)
                else:
                    d_acc += tl.where(msk, d, 0.0)
            d_row = tl.sum(d_acc, 0)
            g_rest = tl.sum(qg_acc, 0)  # G' = Σ_{v≠j*} q_v g_v
            g_piv = tl.sum(gp_acc, 0)
            if DIV == C_TVD:
                # the pivot's p − q as Σ_{v≠j*} q − Σ_{v≠j*} p (both peak at j*: 1 − 1)
                diff_piv = zp * q_piv - tl.sum(pr_acc, 0)
                d_row += 0.5 * tl.abs(diff_piv)
                g_piv = tl.where(diff_piv > 0, -1.0, tl.where(diff_piv < 0, 0.0, -0.5))
            g_bar = q_piv * g_piv + g_rest

        # every divergence is >= 0: rounding may not make it negative (NaN stays NaN)
        loss = soft_w * tl.where(d_row < 0.0, 0.0, d_row)
        soft_part = loss
        hard_part = 0.0
        if HARD:
            y_ok = (y >= 0) & (y < V)
            # An out-of-range label on the GPU (labels are range-checked on the CPU only)
            # reads nothing and makes this row's loss NaN rather than a wrong number.
            x_y = tl.load(s_row + y, mask=y_ok, other=float("nan")).to(tl.float32)
            hard_part = hard_w * (c_x - (x_y - m_x))
            loss += hard_part
        tl.store(LOSS + row, tl.where(bad, float("nan"), loss))
        if WRITE_PARTS:
            tl.store(PARTS + 2 * row, tl.where(bad, float("nan"), soft_part))
            tl.store(PARTS + 2 * row + 1, tl.where(bad, float("nan"), hard_part))

        # ---- pass 3: gradient w.r.t. the student logits
        if COMPUTE_GRAD:
            sc = tl.load(SCALE).to(tl.float32)
            c_soft = soft_w * inv_temp * sc
            c_hard = hard_w * sc
            # Every term of the gradient sums to 0 over the row (softmax Jacobians), so the
            # pivot's entry, where q (and p, softmax(s)) may round to 1 and q − p or
            # softmax_y − 1 to 1 − 1, is written last as minus the sum of the others.
            rest = tl.zeros([BLOCK_V], dtype=tl.float32)
            for off in range(0, V, BLOCK_V):
                cols = off + lanes
                msk = cols < V
                x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
                la = x * inv_temp - m_a
                logq = la - c_a
                q = tl.exp(logq)
                if DIV == C_ZERO:
                    g = tl.zeros([BLOCK_V], dtype=tl.float32)
                else:
                    b = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32) * inv_temp_t
                    if DIV == C_FWD:
                        g = q - tl.exp((b - m_b) - c_b)
                    elif DIV == C_TAID:
                        g = q - tl.exp(((1.0 - w) * x * inv_temp + w * b - m_b) - c_b)
                    else:
                        d, gq = _pair_terms(logq, (b - m_b) - c_b, la - (b - b_ref), c_a - c_b,
                                            w, log_w, log_1mw, DIV)
                        g = q * (gq - g_bar)
                g = g * c_soft
                if HARD:
                    sm = tl.exp((x - m_x) - c_x)
                    g += c_hard * (sm - tl.where(cols == y, 1.0, 0.0))
                others = msk & (cols != piv)
                rest += tl.where(others, g, 0.0)
                g = tl.where(bad, float("nan"), g)
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=others)
            g_p = tl.where(bad, float("nan"), -tl.sum(rest, 0))
            tl.store(g_row + piv, g_p.to(GRAD.dtype.element_ty))
            if ZERO_TAIL:
                store_zeros(g_row, V, V_G, BLOCK_V)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_PARTS:
            tl.store(PARTS + 2 * row, 0.0)
            tl.store(PARTS + 2 * row + 1, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, 0, V_G, BLOCK_V)


def _row_strides(x, n_inner: int) -> tuple[int, int]:
    """(outer, inner) row strides of a [N, V] tensor or a [N1, N2, V] view (N2 = n_inner)."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1)
    return n_inner * x.stride(0), x.stride(0)


def kd_fwd_triton(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int,
                  parts=None) -> None:
    """Same contract as pytorch.kd_fwd_torch (see there); s/t: [N, V] or [N1, N2, V] row
    views (rowgrad.row_views) with unit column stride, read in place; grad rows
    [N, Vg] with unit column stride; parts: None or [N, 2] float32 contiguous."""
    n = s.shape[0] * s.shape[1] if s.dim() == 3 else s.shape[0]
    if n == 0:
        return
    compute_grad = grad_out.numel() > 0
    block, warps = row_tile(v, s.device.type == "cpu")
    v_g = grad_out.shape[-1] if compute_grad else v
    n_inner = s.shape[1] if s.dim() == 3 else t.shape[1] if t.dim() == 3 else n
    s_outer, s_inner = _row_strides(s, n_inner)
    t_outer, t_inner = _row_strides(t, n_inner)
    if prm.div in (DKD, NKD, COSINE):  # their own kernels (a label's column; row norms)
        from .cosine_triton import launch_cosine
        from .decoupled_triton import launch_decoupled

        launch = launch_cosine if prm.div == COSINE else launch_decoupled
        return launch(s, t, labels, scale, loss_out, grad_out, prm, v, n, n_inner,
                      (s_outer, s_inner, t_outer, t_inner), parts)
    _kd_fwd_kernel[(n,)](
        s, t, labels if labels is not None else loss_out, scale, loss_out,
        grad_out if compute_grad else s, parts if parts is not None else loss_out,
        n_inner, s_outer, s_inner, t_outer, t_inner,
        grad_out.stride(0) if compute_grad else 0, v, v_g,
        prm.inv_temp, prm.teacher_inv_temp, prm.w, prm.log_w, prm.log_1mw, prm.soft_w,
        prm.hard_w, prm.ignore_index,
        DIV=prm.div, HAS_LABELS=labels is not None, HARD=prm.hard_w != 0.0,
        TEMPERED=prm.inv_temp != 1.0, COMPUTE_GRAD=compute_grad, ZERO_TAIL=v_g > v,
        WRITE_PARTS=parts is not None, BLOCK_V=block, num_warps=warps,
    )
