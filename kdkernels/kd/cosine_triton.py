"""Triton kernel of `kd_loss` for divergence='cosine' (the formulas: kd/cosine.py).

One program per row, float32, int64 row offsets, rows at one or two strides:

  pass 1  the norms of a = s/τ and b = t/τ online, each as (m, z) with m the running
          max |entry| and z = Σ (entry/m)², rescaled by (m/m')² when m grows (no overflow
          or underflow at any finite logit); the NaN/+inf count, the entries −inf in one
          row only (a NaN row), and for a hard label the untempered student's online
          log-sum-exp with its pivot (triton.py's kernel).
  pass 2  D = ½ Σ (b̂ − â)², â = a/‖a‖: no 1 − cos cancellation.
  pass 3  (only when the student needs a gradient) −(δ + D·â)/‖a‖ with δ = b̂ − â, plus
          the hard label's softmax(s) − onehot(y), whose −(1 − softmax_y) at the pivot is
          Z'/(1 + Z').

Bytes per element (bf16): both rows read three times, the gradient written once (14 B).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.math import log1p, nonfinite_count, safe_max
from .._triton.rows import store_zeros
from .._triton.tiles import row_tile
from .params import KDParams


@triton.jit
def _scaled_sq(m, z, x):
    """One tile of the online (m, z): m = max |x|, z = Σ (x/m)²."""
    m_new = tl.maximum(m, tl.max(tl.abs(x), 0))
    r = tl.where(m_new > 0, 1.0 / m_new, 0.0)
    xs = x * r
    k = m * r
    return m_new, z * (k * k) + tl.sum(xs * xs, 0)


@triton.jit
def _kd_fwd_kernel_cosine(
    S, T, LABELS, SCALE, LOSS, GRAD, PARTS,
    n_inner, stride_s_outer, stride_s, stride_t_outer, stride_t, stride_g, V, V_G,
    inv_temp, inv_temp_t, soft_w, hard_w, ignore_index,
    HAS_LABELS: tl.constexpr, HARD: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
    ZERO_TAIL: tl.constexpr, WRITE_PARTS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # a = s/τ, b = t/τ_t; WRITE_PARTS: PARTS[row] = (soft, hard) addends of the loss.
    row = tl.program_id(0).to(tl.int64)
    outer = row // n_inner
    inner = row - outer * n_inner
    s_row = S + outer * stride_s_outer + inner * stride_s
    t_row = T + outer * stride_t_outer + inner * stride_t
    g_row = GRAD + row * stride_g
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    y = 0
    valid = True
    if HAS_LABELS:
        y = tl.load(LABELS + row).to(tl.int64)
        valid = y != ignore_index
    if valid:
        # ---- pass 1: scaled norms, the row checks, the hard label's log-sum-exp
        m_a = 0.0
        z_a = 0.0
        m_b = 0.0
        z_b = 0.0
        m_x = float("-inf")
        zp = 0.0
        piv = 0
        n_bad = 0
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            msk = cols < V
            xs = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            xt = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            ninf_s = xs == NEG_INF
            ninf_t = xt == NEG_INF
            n_bad += nonfinite_count(xs) + nonfinite_count(xt)
            n_bad += tl.sum((ninf_s != ninf_t).to(tl.int32), 0)  # −inf in one row only
            m_a, z_a = _scaled_sq(m_a, z_a, tl.where(ninf_s, 0.0, xs * inv_temp))
            m_b, z_b = _scaled_sq(m_b, z_b, tl.where(ninf_t, 0.0, xt * inv_temp_t))
            if HARD:  # the untempered student's max at its pivot, Z' without it
                t_max = tl.max(xs, 0)
                t_arg = tl.argmax(xs, 0)
                new = t_max > m_x
                mx_new = tl.where(new, t_max, m_x)
                mx_s = safe_max(mx_new)
                ex = tl.exp(xs - mx_s)
                rx = tl.exp(m_x - mx_s)
                old_piv = tl.where(m_x == NEG_INF, 0.0, 1.0)
                tile = tl.sum(tl.where(lanes == t_arg, tl.where(new, 0.0, ex), ex), 0)
                zp = tl.where(new, (zp + old_piv) * rx, zp) + tile
                piv = tl.where(new, off + t_arg, piv)
                m_x = mx_new
            else:  # only whether the student has a finite entry
                m_x = tl.maximum(m_x, tl.max(xs, 0))
        bad = (n_bad > 0) | (m_x == NEG_INF)
        zero = (m_a == 0.0) | (m_b == 0.0)
        # â = (a·ra)·sa, b̂ = (b·rb)·sb: ‖a‖ = m_a·√z_a, 1/‖a‖ = ra·sa (0 for a zero row)
        ra = tl.where(m_a > 0, 1.0 / m_a, 0.0)
        sa = tl.where(z_a > 0, 1.0 / tl.sqrt(z_a), 0.0)
        rb = tl.where(m_b > 0, 1.0 / m_b, 0.0)
        sb = tl.where(z_b > 0, 1.0 / tl.sqrt(z_b), 0.0)
        # ---- pass 2: D = ½‖b̂ − â‖²
        sq = tl.zeros([BLOCK_V], dtype=tl.float32)
        for off in range(0, V, BLOCK_V):
            cols = off + lanes
            msk = cols < V
            xs = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            xt = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            ha = tl.where(xs == NEG_INF, 0.0, ((xs * inv_temp) * ra) * sa)
            hb = tl.where(xt == NEG_INF, 0.0, ((xt * inv_temp_t) * rb) * sb)
            dl = hb - ha
            sq += dl * dl
        d_row = tl.where(zero, 1.0, 0.5 * tl.sum(sq, 0))
        soft = soft_w * d_row
        hard = 0.0
        m_xs = safe_max(m_x)
        c_x = log1p(zp)
        if HARD:
            y_ok = (y >= 0) & (y < V)
            x_y = tl.load(s_row + y, mask=y_ok, other=float("nan")).to(tl.float32)
            hard = hard_w * (c_x - (x_y - m_xs))
        tl.store(LOSS + row, tl.where(bad, float("nan"), soft + hard))
        if WRITE_PARTS:
            tl.store(PARTS + 2 * row, tl.where(bad, float("nan"), soft))
            tl.store(PARTS + 2 * row + 1, tl.where(bad, float("nan"), hard))

        # ---- pass 3: the gradient
        if COMPUTE_GRAD:
            sc = tl.load(SCALE).to(tl.float32)
            c_soft = -soft_w * inv_temp * sc * (ra * sa)  # ∂D/∂a = −(δ + D·â)/‖a‖
            c_hard = hard_w * sc
            rest_piv = zp / (1.0 + zp)  # 1 − softmax(s)_{j*}
            for off in range(0, V, BLOCK_V):
                cols = off + lanes
                msk = cols < V
                xs = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
                xt = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
                ha = tl.where(xs == NEG_INF, 0.0, ((xs * inv_temp) * ra) * sa)
                hb = tl.where(xt == NEG_INF, 0.0, ((xt * inv_temp_t) * rb) * sb)
                g = c_soft * ((hb - ha) + d_row * ha)
                if HARD:
                    sm = tl.exp((xs - m_xs) - c_x)
                    at_y = tl.where(y == piv, -rest_piv, sm - 1.0)
                    g += c_hard * tl.where(cols == y, at_y, sm)
                g = tl.where(bad, float("nan"), g)
                tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=msk)
            if ZERO_TAIL:
                store_zeros(g_row, V, V_G, BLOCK_V)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_PARTS:
            tl.store(PARTS + 2 * row, 0.0)
            tl.store(PARTS + 2 * row + 1, 0.0)
        if COMPUTE_GRAD:
            store_zeros(g_row, 0, V_G, BLOCK_V)


def launch_cosine(s, t, labels, scale, loss_out, grad_out, prm: KDParams, v: int, n: int,
                  n_inner: int, strides: tuple[int, int, int, int], parts=None) -> None:
    """The kernel over n rows (triton.kd_fwd_triton's contract and row strides)."""
    compute_grad = grad_out.numel() > 0
    block, warps = row_tile(v, s.device.type == "cpu")
    v_g = grad_out.shape[-1] if compute_grad else v
    _kd_fwd_kernel_cosine[(n,)](
        s, t, labels if labels is not None else loss_out, scale, loss_out,
        grad_out if compute_grad else s, parts if parts is not None else loss_out,
        n_inner, *strides, grad_out.stride(0) if compute_grad else 0, v, v_g,
        prm.inv_temp, prm.teacher_inv_temp, prm.soft_w, prm.hard_w, prm.ignore_index,
        HAS_LABELS=labels is not None, HARD=prm.hard_w != 0.0, COMPUTE_GRAD=compute_grad,
        ZERO_TAIL=v_g > v, WRITE_PARTS=parts is not None, BLOCK_V=block, num_warps=warps,
    )


def aot_variants():
    """(name, kernel, signature, constexprs, num_warps) for tests/triton_aot_check.py."""
    sig = {"S": "*bf16", "T": "*bf16", "LABELS": "*i64", "SCALE": "*fp32", "LOSS": "*fp32",
           "GRAD": "*bf16", "PARTS": "*fp32", "n_inner": "i64", "stride_s_outer": "i64",
           "stride_s": "i64", "stride_t_outer": "i64", "stride_t": "i64", "stride_g": "i64",
           "V": "i32", "V_G": "i32", "inv_temp": "fp32", "inv_temp_t": "fp32",
           "soft_w": "fp32", "hard_w": "fp32", "ignore_index": "i32"}
    for lab, hard in ((True, True), (False, False)):
        const = dict(HAS_LABELS=lab, HARD=hard, COMPUTE_GRAD=True, ZERO_TAIL=True,
                     WRITE_PARTS=hard, BLOCK_V=4096)
        yield f"kd cosine labels={lab} hard={hard}", _kd_fwd_kernel_cosine, sig, const, 8
