"""Triton kernel of `kd_loss` for the divergences that split a row at its label: dkd and
nkd (the formulas and their derivation: kd/decoupled.py, the torch path).

One program per row, float32, int64 row offsets, rows at one or two strides (as
triton.py's kernel). Per row:

  pass 1  online statistics of the non-target classes N = {v ≠ y} (column y is read as
          −inf), in one read of both rows: a = s/τ with its pivot k* (the non-target
          argmax) and Z' = Σ_{N∖k*} e^{a − M_a}; b = t/τ's Σ e^{b − M_b} and the NCKD sum
          (dkd: Σ e^{b−M_b}(b − a); nkd: Σ e^{b−M_b}(M_a − a), rescaled as either max moves:
          every increment is ≥ 0, so −Σ p̂ log q̂ has no cancellation); where τ ≠ 1, the
          untempered s (the hard label; nkd's target term) and t (nkd). Then column y,
          read once, gives each distribution's binary logit z = (d_y − M) − L.
  pass 2  (only when the student needs a gradient) the gradient, in the input dtype; the
          pivot k*'s entry last, as minus the sum of the others.

Bytes per element (bf16): both rows read twice and the gradient written once, 10 B, as
the forward-KL kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.math import log1p, nonfinite_count, online_step, safe_max, sigmoid, softplus
from .._triton.rows import store_zeros
from .._triton.tiles import row_tile
from .params import DKD, NKD, KDParams

C_DKD = tl.constexpr(DKD)
C_NKD = tl.constexpr(NKD)


@triton.jit
def _lse_or_ninf(z):
    """log z, −inf for z = 0 (no mass)."""
    return tl.where(z > 0, tl.log(tl.where(z > 0, z, 1.0)), float("-inf"))


@triton.jit
def _binary_kl(zp, zq):
    """KL([σ(zp), σ(−zp)] ‖ [σ(zq), σ(−zq)]) from the binary logits, 0·log 0 = 0."""
    p1 = sigmoid(zp)
    p0 = sigmoid(-zp)
    t1 = tl.where(p1 > 0, p1 * (softplus(-zq) - softplus(-zp)), 0.0)
    t0 = tl.where(p0 > 0, p0 * (softplus(zq) - softplus(zp)), 0.0)
    return t1 + t0


@triton.jit
def _kd_fwd_kernel_decoupled(
    S, T, LABELS, SCALE, LOSS, GRAD, PARTS,
    n_inner, stride_s_outer, stride_s, stride_t_outer, stride_t, stride_g, V, V_G,
    inv_temp, inv_temp_t, w, soft_w, hard_w, ignore_index,
    DIV: tl.constexpr, HARD: tl.constexpr, SEP_X: tl.constexpr, SEP_U: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, ZERO_TAIL: tl.constexpr, WRITE_PARTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # a = s/τ, b = t/τ_t (inv_temp_t: the teacher's). SEP_X: the untempered student's
    # statistics are needed apart from a's (τ ≠ 1 with a hard label, or nkd); SEP_U: the
    # untempered teacher's (τ_t ≠ 1, nkd). WRITE_PARTS: PARTS[row] = (soft, hard) addends.
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row - outer * n_inner
    s_row = S + outer * stride_s_outer + inner * stride_s
    t_row = T + outer * stride_t_outer + inner * stride_t
    g_row = GRAD + row * stride_g
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    y = tl.load(LABELS + row).to(tl.int64)
    if y != ignore_index:
        # ---- pass 1: non-target statistics (column y reads as −inf)
        m_a = float("-inf")
        zp = 0.0
        piv = 0
        m_b = float("-inf")
        z_b = 0.0
        acc = 0.0
        m_x = float("-inf")
        z_x = 0.0
        m_u = float("-inf")
        z_u = 0.0
        n_bad = 0
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            msk = cols < V
            nt = msk & (cols != y)
            xs = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            xt = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            n_bad += nonfinite_count(xs) + nonfinite_count(xt)
            a = tl.where(nt, xs * inv_temp, NEG_INF)
            b = tl.where(nt, xt * inv_temp_t, NEG_INF)
            # student: running max at the pivot, Z' without it (triton.py's kernel)
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
            # teacher, and the NCKD sum relative to the running maxima
            mb_new, eb, rb = online_step(m_b, b)
            if DIV == C_DKD:  # Σ e^{b−M_b}(b − a)
                acc = acc * rb + tl.sum(tl.where(eb > 0, eb * (b - a), 0.0), 0)
            else:  # Σ e^{b−M_b}(M_a − a): the old terms gain (M_a' − M_a)·Z_b when M_a moves
                d_ma = tl.where(ma_new > m_a, ma_new - m_a, 0.0)
                shift = tl.where(z_b > 0, d_ma * z_b, 0.0)
                gap = tl.where(a == NEG_INF, float("inf"), ma_new - a)
                acc = (acc + shift) * rb + tl.sum(tl.where(eb > 0, eb * gap, 0.0), 0)
            z_b = z_b * rb + tl.sum(eb, 0)
            m_b = mb_new
            m_a = ma_new
            if SEP_X:
                x_nt = tl.where(nt, xs, NEG_INF)
                mx_new, ex, rx = online_step(m_x, x_nt)
                z_x = z_x * rx + tl.sum(ex, 0)
                m_x = mx_new
            if SEP_U:
                u_nt = tl.where(nt, xt, NEG_INF)
                mu_new, eu, ru = online_step(m_u, u_nt)
                z_u = z_u * ru + tl.sum(eu, 0)
                m_u = mu_new
        # ---- the target column and the binary logits z = (d_y − M) − L
        y_ok = (y >= 0) & (y < V)  # (only CPU labels are range-checked: else a NaN row)
        x_y = tl.load(s_row + y, mask=y_ok, other=float("nan")).to(tl.float32)
        t_y = tl.load(t_row + y, mask=y_ok, other=float("nan")).to(tl.float32)
        a_y = x_y * inv_temp
        b_y = t_y * inv_temp_t
        bad = (n_bad > 0) | (y_ok == 0)
        bad = bad | ((m_a == NEG_INF) & (a_y == NEG_INF)) | ((m_b == NEG_INF) & (b_y == NEG_INF))
        has_a = m_a > NEG_INF
        l_a = tl.where(has_a, log1p(zp), NEG_INF)
        l_b = _lse_or_ninf(z_b)
        ma_s = safe_max(m_a)
        mb_s = safe_max(m_b)
        za = (a_y - ma_s) - l_a
        zb = (b_y - mb_s) - l_b
        la_s = tl.where(has_a, l_a, 0.0)
        lb_s = tl.where(z_b > 0, l_b, 0.0)
        if SEP_X:
            mx_s = safe_max(m_x)
            l_x = _lse_or_ninf(z_x)
            lx_s = tl.where(z_x > 0, l_x, 0.0)
            zx = (x_y - mx_s) - l_x
        else:
            mx_s = ma_s
            lx_s = la_s
            zx = za
        if SEP_U:
            zu = (t_y - safe_max(m_u)) - _lse_or_ninf(z_u)
        else:
            zu = zb
        # the non-target sum (0 without teacher mass outside y; +inf where the teacher
        # has mass and the student none)
        nt_sum = 0.0
        if DIV == C_DKD:
            nt_sum = acc / tl.where(z_b > 0, z_b, 1.0) - mb_s - lb_s + ma_s + la_s
        else:
            nt_sum = acc / tl.where(z_b > 0, z_b, 1.0) + la_s
        nt_sum = tl.where(z_b > 0, tl.where(has_a, nt_sum, float("inf")), 0.0)
        p1_y = sigmoid(zu)
        d_row = 0.0
        if DIV == C_DKD:
            d_row = w * _binary_kl(zb, za) + (1.0 - w) * nt_sum
        else:
            d_row = tl.where(p1_y > 0, p1_y * softplus(-zx), 0.0) + w * nt_sum
        soft = soft_w * tl.where(d_row < 0.0, 0.0, d_row)
        hard = 0.0
        if HARD:
            hard = hard_w * softplus(-zx)  # −log softmax(s)_y
        tl.store(LOSS + row, tl.where(bad, float("nan"), soft + hard))
        if WRITE_PARTS:
            tl.store(PARTS + 2 * row, tl.where(bad, float("nan"), soft))
            tl.store(PARTS + 2 * row + 1, tl.where(bad, float("nan"), hard))

        # ---- pass 2: the gradient
        if COMPUTE_GRAD:
            sc = tl.load(SCALE).to(tl.float32)
            c_soft = soft_w * inv_temp * sc
            c_h = hard_w * sc
            at_y = 0.0
            if DIV == C_DKD:  # Δ = q_y − p_y, from the smaller tails where both near 1
                delta = tl.where(za + zb > 0, sigmoid(-zb) - sigmoid(-za),
                                 sigmoid(za) - sigmoid(zb))
                at_y = c_soft * w * delta
            else:
                c_h += soft_w * sc * p1_y  # the target term: p1_y·CE(s, y)
            rest_x = sigmoid(-zx)  # 1 − softmax(s)_y
            at_y -= c_h * rest_x
            piv = tl.where(has_a, piv, -1)  # no pivot without a finite non-target entry
            rest = tl.zeros([BLOCK_V], dtype=tl.float32)
            for off in range(0, V, BLOCK_V):
                cols = off + lanes
                msk = cols < V
                xs = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
                xt = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
                q = tl.exp((xs * inv_temp - ma_s) - la_s)
                p = tl.exp((xt * inv_temp_t - mb_s) - lb_s)
                if DIV == C_DKD:
                    g = c_soft * ((1.0 - w) * (q - p) - (w * delta) * q)
                else:
                    g = c_soft * w * (q - p)
                if SEP_X:
                    g += (c_h * rest_x) * tl.exp((xs - mx_s) - lx_s)
                else:
                    g += (c_h * rest_x) * q
                g = tl.where(cols == y, at_y, g)
                others = msk & (cols != piv)
                rest += tl.where(others, g, 0.0)
                g = tl.where(bad, float("nan"), g)
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=others)
            g_p = tl.where(bad, float("nan"), -tl.sum(rest, 0))
            tl.store(g_row + tl.maximum(piv, 0), g_p.to(GRAD.dtype.element_ty), mask=piv >= 0)
            if ZERO_TAIL:
                store_zeros(g_row, V, V_G, BLOCK_V)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_PARTS:
            tl.store(PARTS + 2 * row, 0.0)
            tl.store(PARTS + 2 * row + 1, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, 0, V_G, BLOCK_V)


def launch_decoupled(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int,
                     n: int, n_inner: int, strides: tuple[int, int, int, int],
                     parts=None) -> None:
    """The kernel over n rows (triton.kd_fwd_triton's contract and row strides)."""
    compute_grad = grad_out.numel() > 0
    block, warps = row_tile(v, s.device.type == "cpu")
    v_g = grad_out.shape[-1] if compute_grad else v
    nkd = prm.div == NKD
    it_t = prm.teacher_inv_temp
    _kd_fwd_kernel_decoupled[(n,)](
        s, t, labels, scale, loss_out, grad_out if compute_grad else s,
        parts if parts is not None else loss_out,
        n_inner, *strides, grad_out.stride(0) if compute_grad else 0, v, v_g,
        prm.inv_temp, it_t, prm.w, prm.soft_w, prm.hard_w, prm.ignore_index,
        DIV=prm.div, HARD=prm.hard_w != 0.0,
        SEP_X=prm.inv_temp != 1.0 and (nkd or prm.hard_w != 0.0), SEP_U=it_t != 1.0 and nkd,
        COMPUTE_GRAD=compute_grad, ZERO_TAIL=v_g > v, WRITE_PARTS=parts is not None,
        BLOCK_V=block, num_warps=warps,
    )


def aot_variants():
    """(name, kernel, signature, constexprs, num_warps) for tests/triton_aot_check.py."""
    sig = {"S": "*bf16", "T": "*bf16", "LABELS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32",
           "GRAD": "*bf16", "PARTS": "*fp32", "n_inner": "i64", "stride_s_outer": "i64",
           "stride_s": "i64", "stride_t_outer": "i64", "stride_t": "i64", "stride_g": "i64",
           "V": "i32", "V_G": "i32", "inv_temp": "fp32", "inv_temp_t": "fp32", "w": "fp32",
           "soft_w": "fp32", "hard_w": "fp32", "ignore_index": "i32"}
    for div, hard, sep_x, sep_u in ((DKD, True, True, False), (DKD, False, False, False),
                                    (NKD, True, True, True), (NKD, False, False, False)):
        const = dict(DIV=div, HARD=hard, SEP_X=sep_x, SEP_U=sep_u, COMPUTE_GRAD=True,
                     ZERO_TAIL=True, WRITE_PARTS=hard, BLOCK_V=4096)
        yield f"kd decoupled div={div} hard={hard} tempered={sep_x}", \
            _kd_fwd_kernel_decoupled, sig, const, 8
