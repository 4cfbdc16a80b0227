"""The `triton` backend of `topk_kd_loss` (docs/spec.md §5).

Same contract and formulas as pytorch.py (entries, divergences, r_e = h_e − q_e Σh, the
non-finite policy). One program per row; float32 arithmetic (float64 when the student is
float64); int64 row offsets. The k entries are read in BLOCK_K tiles (any k), the
student row, where needed, in BLOCK_V tiles. Per row:

  pass 1  (k tiles) gather the entries: online log-sum-exp of the teacher's u and of the
          selected student logits a = s/τ, each with its maximum kept apart (pivot).
  pass 2  (bucket, hard label; V tiles) stream the student row once: the log-sum-exp of
          the tail (the unselected classes, found in a per-row bitmap of the selected
          ones) accumulated directly, never as total − selected; for the hard label the
          untempered row's log-sum-exp with its maximum kept apart (as the entries');
          NaN/+inf anywhere counts.
  pass 3a (taid only; k tiles) the log-sum-exp l_r of the mix (1−λ) log q + λ log p over
          the entries (and the tail): log r = mix − l_r, compared with q as forward KL.
  pass 3  (k tiles, re-gathered) per entry log q, log p (log r), the divergence terms
          d, h: the loss soft_w·Σd + hard_w·CE and the sums the gradient needs.
  pass 4  (gradient only; V tiles) the unselected columns (all of them without a
          divergence term): 0 (renormalize) or r_tail · softmax within the tail (bucket,
          re-reading the row), plus hard_w·(softmax(s) − onehot(y)); bitmap-masked.
  pass 5  (gradient only; k tiles) the selected columns: r_i (+ the hard label's
          term), scattered. At the label, softmax_y − 1 is −Z'/(1 + Z') where the label
          is the row's maximum (no 1 − 1). soft_label_weight = 0 (Div.ZERO) runs pass 2
          and pass 4 only.
Every gradient address is written once, and a column is written only after its last
read, so the gradient may alias the student logits (fused-linear's buffer reuse).

Bytes per row (E = the student's element size; an entry = index + value + gathered
logit). Floor: the k entries once, the student row read once (bucket only: renormalize
never needs the rest of the row) and the gradient row written once.
  renormalize: entries ×2 (×3 with the gradient); with the gradient also the row
               written once and the V/8-byte class bitmap (built by the launcher, read
               once); nothing else of size V.
  bucket:      entries ×2 (×3); the row read once + the bitmap (pass 2); with the
               gradient the row read a second time + the bitmap again (pass 4) and
               written once: one row read above the floor, since the tail's softmax
               needs its final log-sum-exp before any gradient is written.
The bitmap is [N, ceil(V/32)] int32, built with torch before the launch (a zero fill
and one scatter_add over the k entries).

Precision (checked against a 50-digit evaluation at std-30 spreads, where each of the
three below was needed):
- The entry with the largest q (the pivot e*: the largest selected logit, or the
  tail) keeps Σ_{e≠e*} e^{x_e − x_e*} apart, so log q of every entry comes from log1p
  without rounding 1 + tiny away, and its r comes from the identity Σ_e r_e = 0:
      r_e* = Q'·h_e* − q_e*·H',   Q' = Σ_{e≠e*} q_e,  H' = Σ_{e≠e*} h_e
  (= h_e* − q_e* Σh exactly). Taken directly, h − q Σh cancels where q_e* rounds to 1
  and loses the pivot's gradient entirely (the float64 torch path does so too).
- jsd's h drops its multiple of q (see _div_terms): otherwise the whole gradient of a
  row whose teacher mass sits where the student has almost none cancels away.
- The bucket's teacher log-sum-exp is summed in float64: p_tail = 1 − Σ p_i cancels
  when the teacher's top-k holds nearly all its mass.
Losses are sums of signed per-entry terms: accurate to about one ulp of the largest.

Out-of-range indices (unchecked on GPUs) read nothing and make the row NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.codes import Div
from .._triton.math import log1p, logaddexp, nonfinite_count, safe_max, softplus
from .._triton.tiles import MIN_BLOCK, row_tile

C_FWD = tl.constexpr(int(Div.FWD_KL))
C_REV = tl.constexpr(int(Div.REV_KL))
C_JSD = tl.constexpr(int(Div.JSD))
C_TAID = tl.constexpr(int(Div.TAID))
C_ZERO = tl.constexpr(int(Div.ZERO))

# entries per tile: per program on a GPU, and under the interpreter
GPU_BLOCK_K = 1024
CPU_BLOCK_K = 2048


@triton.jit
def _neg_expm1(x):
    """1 − e^x for x <= 0, accurate near 0 (the rounding of e^x cancels in the ratio)."""
    u = tl.exp(x)
    um1 = u - 1.0
    em1 = tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * (x / tl.log(u))))
    return -em1


@triton.jit
def _pivot_step(m, zp, piv, x, cols, lanes):
    """One tile x of an online log-sum-exp that keeps its maximum apart: m is the running
    max (at column piv), zp = Σ e^{x − m} over every entry so far but that one, so that
    LSE = m + log1p(zp). Masked lanes hold -inf; cols are the lanes' column ids."""
    t_max = tl.max(x, 0)
    t_arg = tl.argmax(x, 0)
    new = t_max > m
    m_new = tl.where(new, t_max, m)
    ms = safe_max(m_new)
    e = tl.exp(x - ms)
    rs = tl.exp(m - ms)
    old = tl.where(m == float("-inf"), 0.0, 1.0)
    at = lanes == t_arg
    tile = tl.sum(tl.where(at, tl.where(new, 0.0, e), e), 0)
    zp = tl.where(new, (zp + old) * rs, zp) + tile
    piv = tl.where(new, tl.sum(tl.where(at, cols, 0), 0), piv)
    return m_new, zp, piv


@triton.jit
def _entries(IDX_ROW, VALS_ROW, S_ROW, stride_ik, stride_vk, k0, lanes, K, V, inv_temp,
             LOGPROBS: tl.constexpr, CDT: tl.constexpr):
    """Entries k0 + lanes: (column (int32, -1: none), entry mask, out-of-range mask,
    the student's raw logit x, the teacher's u (values/τ or log-probs) and the student's
    a = x/τ; -inf off entries)."""
    slot = k0 + lanes
    in_k = slot < K
    raw = tl.load(IDX_ROW + slot * stride_ik, mask=in_k, other=-1)
    oob = in_k & ((raw < -1) | (raw >= V))
    ent = in_k & (raw >= 0) & (raw < V)
    col = tl.where(ent, raw, -1).to(tl.int32)
    u = tl.load(VALS_ROW + slot * stride_vk, mask=ent, other=float("-inf")).to(CDT)
    if not LOGPROBS:
        u = u * inv_temp
    x = tl.load(S_ROW + col, mask=ent, other=float("-inf")).to(CDT)
    return col, ent, oob, x, u, x * inv_temp


@triton.jit
def _div_terms(lp, lq, beta, log_b, log_1mb, DIV: tl.constexpr):
    """Per-entry (d, h): d sums to D, h = q ∂D/∂q up to a multiple of q (pytorch.py; r is
    blind to h + c·q). jsd drops the multiple −(1−β) log(1−β) q: its h vanishes where
    p/q → 0 instead of cancelling against q Σh (the whole gradient where the teacher's
    mass sits far from the student's). TAID: forward KL, lp being log r (_target)."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIV == C_FWD or DIV == C_TAID:
        d = tl.where(p > 0, p * (lp - lq), 0.0)
        h = -p
    elif DIV == C_REV:
        d = tl.where(q > 0, q * (lq - lp), 0.0)
        h = d
    else:  # jsd, m = βp + (1−β)q: h = −(1−β) q log1p(βp / ((1−β)q))
        logm = logaddexp(lp + log_b, lq + log_1mb)
        d = tl.where(p > 0, beta * p * (lp - logm), 0.0) + tl.where(
            q > 0, (1.0 - beta) * q * (lq - logm), 0.0)
        h = tl.where(q > 0, -(1.0 - beta) * q * softplus(log_b - log_1mb + lp - lq), 0.0)
    return d, h


@triton.jit
def _target(lp, lq, lam, l_r, DIV: tl.constexpr):
    """The entry log-probabilities the divergence compares q with: the teacher's log p,
    or for TAID log r = (1−λ) log q + λ log p − LSE_e(…) (l_r: that LSE)."""
    if DIV == C_TAID:
        return (1.0 - lam) * lq + lam * lp - l_r
    return lp


@triton.jit
def _hard_grad(x, cols, y, piv_x, mx_s, c_x, z_x):
    """softmax(x) − onehot(y) at columns cols, from the row's LSE m_x + log1p(z_x) with its
    max (column piv_x) kept apart: at y = piv_x, −z_x/(1 + z_x) (no 1 − 1). mx_s: m_x made
    finite; c_x = log1p(z_x)."""
    sm = tl.exp((x - mx_s) - c_x)
    g_y = tl.where(y == piv_x, -z_x / (1.0 + z_x), sm - 1.0)
    return tl.where(cols == y, g_y, sm)


@triton.jit
def _unselected(BITS_ROW, cols, msk):
    """Columns cols < V whose bit is clear in the row's class bitmap."""
    word = tl.load(BITS_ROW + cols // 32, mask=msk, other=0)
    return msk & (((word >> (cols % 32)) & 1) == 0)


@triton.jit
def _fill_row(G_ROW, V, value, BLOCK_V: tl.constexpr):
    lanes = tl.arange(0, BLOCK_V)
    for off in range(0, V, BLOCK_V):
        cols = off + lanes
        tl.store(G_ROW + cols, tl.full([BLOCK_V], value, G_ROW.dtype.element_ty), mask=cols < V)


@triton.jit
def _topk_kd_fwd_kernel(
    S, IDX, VALS, LABELS, BITS, SCALE, LOSS, GRAD,
    stride_s, stride_i, stride_ik, stride_v, stride_vk, stride_l, stride_b, stride_g,
    V, K, w_hi, w_lo, inv_temp_hi, inv_temp_lo, ignore_index, sw_hi, sw_lo, hw_hi, hw_lo,
    DIV: tl.constexpr, LOGPROBS: tl.constexpr, BUCKET: tl.constexpr, HARD: tl.constexpr,
    HAS_LABELS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, CDT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    i_row = IDX + row * stride_i
    v_row = VALS + row * stride_v
    b_row = BITS + row * stride_b
    g_row = GRAD + row * stride_g
    lk = tl.arange(0, BLOCK_K)
    lv = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    SOFT: tl.constexpr = DIV != C_ZERO
    # scalars arrive as float32 pairs hi + lo (float64 runs keep ~48 bits of them)
    inv_temp = tl.cast(inv_temp_hi, CDT) + tl.cast(inv_temp_lo, CDT)
    beta = tl.cast(w_hi, CDT) + tl.cast(w_lo, CDT)  # the mixture weight: β (jsd), λ (taid)
    soft_w = tl.cast(sw_hi, CDT) + tl.cast(sw_lo, CDT)
    hard_w = tl.cast(hw_hi, CDT) + tl.cast(hw_lo, CDT)
    log_b = tl.log(beta)
    log_1mb = tl.log(1.0 - beta)

    valid = True
    y = tl.zeros([], tl.int64)
    if HAS_LABELS:
        y = tl.load(LABELS + row * stride_l).to(tl.int64)
        valid = y != ignore_index
    if valid:
        n_bad = tl.zeros([], tl.int32)  # NaN / +inf the loss reads, out-of-range indices
        # ---- pass 1: the entries (online LSE of the teacher's u and the selected a)
        # the teacher's LSE: in float64 for the bucket, whose p_tail = 1 − Σ p_i cancels
        TDT: tl.constexpr = tl.float64 if BUCKET else CDT
        m_u = tl.full([], NEG_INF, TDT)
        z_u = tl.zeros([], TDT)
        m_s = tl.full([], NEG_INF, CDT)
        z_s = tl.zeros([], CDT)
        piv = tl.full([], -1, tl.int32)  # the column of the largest selected logit
        n_ent = tl.zeros([], tl.int32)
        if SOFT:
            for k0 in range(0, K, BLOCK_K):
                col, ent, oob, x, u, a = _entries(i_row, v_row, s_row, stride_ik, stride_vk,
                                                  k0, lk, K, V, inv_temp, LOGPROBS, CDT)
                n_bad += nonfinite_count(u) + tl.sum(oob.to(tl.int32), 0)
                if not BUCKET:  # (bucket: the whole row is checked in pass 2)
                    n_bad += nonfinite_count(a)
                n_ent += tl.sum(ent.to(tl.int32), 0)
                m_u, z_u, _unused = _pivot_step(m_u, z_u, 0, u.to(TDT), col, lk)
                m_s, z_s, piv = _pivot_step(m_s, z_s, piv, a, col, lk)
        has = n_ent > 0
        l_u = m_u + log1p(z_u)  # LSE of the teacher's u (-inf without entries)
        mu_s = safe_max(m_u).to(CDT)
        c_u = log1p(z_u).to(CDT)

        # ---- pass 2 (bucket, hard label): the tail's LSE over the unselected columns;
        # the LSE of the untempered row x with its max (column piv_x) kept apart
        m_t = tl.full([], NEG_INF, CDT)
        z_t = tl.zeros([], CDT)
        m_x = tl.full([], NEG_INF, CDT)
        z_x = tl.zeros([], CDT)
        piv_x = tl.full([], -1, tl.int32)
        if BUCKET or HARD:
            for off in range(0, V, BLOCK_V):
                cols = off + lv
                msk = cols < V
                x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(CDT)
                # (a NaN, counted in n_bad, enters the LSEs as -inf: an all-NaN tile has
                # no argmax under the interpreter)
                if BUCKET:
                    a = x * inv_temp
                    n_bad += nonfinite_count(a)
                    a = tl.where(_unselected(b_row, cols, msk) & (a == a), a, NEG_INF)
                    m_t, z_t, _unused = _pivot_step(m_t, z_t, 0, a, cols, lv)
                if HARD:
                    n_bad += nonfinite_count(x)
                    x = tl.where(x == x, x, NEG_INF)
                    m_x, z_x, piv_x = _pivot_step(m_x, z_x, piv_x, x, cols, lv)
        l_t = m_t + log1p(z_t)  # LSE of the tail (-inf: empty or all masked)
        mt_s = safe_max(m_t)
        c_t = log1p(z_t)
        mx_s = safe_max(m_x)
        c_x = log1p(z_x)
        ce = tl.zeros([], CDT)
        if HARD:
            # CE = LSE(x) − x_y = (m_x − x_y) + log1p(z_x); a label out of [0, V) (unchecked
            # on a GPU) reads nothing and makes the row NaN
            y_ok = (y >= 0) & (y < V)
            x_y = tl.load(s_row + tl.where(y_ok, y, 0)).to(CDT)
            ce = (m_x - x_y) + c_x
            n_bad += tl.where(y_ok & (m_x != NEG_INF), 0, 1)

        # no softmax: NaN / +inf read, or a side without any finite entry
        bad = n_bad > 0
        if SOFT:
            if BUCKET:
                bad = bad | ((m_s == NEG_INF) & (m_t == NEG_INF))
            else:
                bad = bad | (has & ((m_s == NEG_INF) | (m_u == NEG_INF)))

        # the pivot entry e*: the tail (bucket) or the largest selected logit (ties: the
        # selected one); log q_e = (x_e − P) − log1p(zq), zq = Σ_{e≠e*} e^{x_e − P}.
        # Renormalize has l_t = -inf: never the tail.
        tail_piv = l_t > m_s
        z_sel = tl.where(m_s == NEG_INF, 0.0, 1.0 + z_s)  # Σ_sel e^{a − m_s}
        p_log = tl.where(tail_piv, l_t, m_s)
        zq = tl.where(tail_piv, z_sel * tl.exp(m_s - safe_max(l_t)),
                      z_s + tl.exp(l_t - safe_max(m_s)))
        p_s = safe_max(p_log)
        c = log1p(zq)
        q_piv = 1.0 / (1.0 + zq)
        # the tail entry (bucket): log q_tail from the streamed LSE; log p_tail =
        # log(1 − Σ p_i), -inf when every class is selected (whatever rounding left in Σ p)
        lq_t = (l_t - p_s) - c
        lp_t = tl.log(_neg_expm1(tl.minimum(l_u, 0.0))).to(CDT)
        lp_t = tl.where(n_ent >= V, NEG_INF, lp_t)

        # ---- pass 3a (taid): l_r, the LSE over the entries of (1−λ) log q + λ log p
        l_r = tl.zeros([], CDT)
        if DIV == C_TAID:
            m_r = tl.full([], NEG_INF, CDT)
            z_r = tl.zeros([], CDT)
            for k0 in range(0, K, BLOCK_K):
                col, ent, oob, x, u, a = _entries(i_row, v_row, s_row, stride_ik, stride_vk,
                                                  k0, lk, K, V, inv_temp, LOGPROBS, CDT)
                lq = (a - p_s) - c
                if BUCKET:
                    lp = u
                else:
                    lp = (u - mu_s) - c_u
                mix = (1.0 - beta) * lq + beta * lp
                mix = tl.where(ent & (mix == mix), mix, NEG_INF)  # (NaN: a bad row)
                m_r, z_r, _unused = _pivot_step(m_r, z_r, 0, mix, col, lk)
            l_r = m_r + log1p(z_r)
            if BUCKET:
                mix_t = (1.0 - beta) * lq_t + beta * lp_t
                l_r = logaddexp(l_r, mix_t)
                bad = bad | (l_r == NEG_INF)  # disjoint supports: no target
            else:
                bad = bad | (has & (l_r == NEG_INF))

        # ---- pass 3: divergence terms; Σd, and for the gradient H' = Σ_{e≠e*} h_e,
        # Q' = Σ_{e≠e*} q_e and h_e*
        d_row = tl.zeros([], CDT)
        h_rest = tl.zeros([], CDT)
        q_rest = tl.zeros([], CDT)
        h_piv = tl.zeros([], CDT)
        q_t = tl.zeros([], CDT)
        h_t = tl.zeros([], CDT)
        if SOFT:
            d_acc = tl.zeros([BLOCK_K], CDT)
            h_acc = tl.zeros([BLOCK_K], CDT)
            q_acc = tl.zeros([BLOCK_K], CDT)
            hp_acc = tl.zeros([BLOCK_K], CDT)
            for k0 in range(0, K, BLOCK_K):
                col, ent, oob, x, u, a = _entries(i_row, v_row, s_row, stride_ik, stride_vk,
                                                  k0, lk, K, V, inv_temp, LOGPROBS, CDT)
                lq = (a - p_s) - c
                if BUCKET:
                    lp = u
                else:
                    lp = (u - mu_s) - c_u
                d, h = _div_terms(_target(lp, lq, beta, l_r, DIV), lq, beta, log_b, log_1mb,
                                  DIV)
                # (scalar booleans enter through tl.where: the interpreter cannot broadcast
                # them)
                is_p = tl.where(tail_piv, False, ent & (col == piv))
                rest = tl.where(tail_piv, ent, ent & (col != piv))
                d_acc += tl.where(ent, d, 0.0)
                h_acc += tl.where(rest, h, 0.0)
                q_acc += tl.where(rest, tl.exp(lq), 0.0)
                hp_acc += tl.where(is_p, h, 0.0)
            d_row = tl.sum(d_acc, 0)
            h_rest = tl.sum(h_acc, 0)
            q_rest = tl.sum(q_acc, 0)
            h_piv = tl.sum(hp_acc, 0)
            if BUCKET:
                d_t, h_t = _div_terms(_target(lp_t, lq_t, beta, l_r, DIV), lq_t, beta, log_b,
                                      log_1mb, DIV)
                q_t = tl.exp(lq_t)
                d_row += d_t
                h_piv = tl.where(tail_piv, h_t, h_piv)
                h_rest += tl.where(tail_piv, 0.0, h_t)
                q_rest += tl.where(tail_piv, 0.0, q_t)

        # every divergence is >= 0: rounding may not make it negative (NaN stays NaN)
        loss = soft_w * tl.where(d_row < 0.0, 0.0, d_row) + hard_w * ce
        tl.store(LOSS + row, tl.where(bad, float("nan"), loss).to(tl.float32))

        if COMPUTE_GRAD:
            if bad:  # the whole row, not only its entries
                _fill_row(g_row, V, float("nan"), BLOCK_V)
            else:
                h_sum = h_rest + h_piv
                r_piv = q_rest * h_piv - q_piv * h_rest  # = h* − q* Σh, without cancelling
                scale = tl.load(SCALE).to(CDT)
                cg = scale * inv_temp * soft_w
                ch = scale * hard_w
                r_t = tl.where(tail_piv, r_piv, h_t - q_t * h_sum) * cg
                # ---- pass 4: unselected columns (every column without a divergence):
                # the tail's softmax share (bucket) plus the hard label's term, else 0
                for off in range(0, V, BLOCK_V):
                    cols = off + lv
                    msk = cols < V
                    x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(CDT)
                    g = tl.zeros([BLOCK_V], CDT)
                    if BUCKET:  # r_tail · softmax within the tail
                        g += r_t * tl.exp((x * inv_temp - mt_s) - c_t)
                    if HARD:
                        g += ch * _hard_grad(x, cols, y, piv_x, mx_s, c_x, z_x)
                    if SOFT:
                        msk = _unselected(b_row, cols, msk)
                    tl.store(g_row + cols, g.to(GRAD.dtype.element_ty), mask=msk)
                # ---- pass 5: the selected columns (their logits are still intact)
                if SOFT:
                    for k0 in range(0, K, BLOCK_K):
                        col, ent, oob, x, u, a = _entries(i_row, v_row, s_row, stride_ik,
                                                          stride_vk, k0, lk, K, V, inv_temp,
                                                          LOGPROBS, CDT)
                        lq = (a - p_s) - c
                        if BUCKET:
                            lp = u
                        else:
                            lp = (u - mu_s) - c_u
                        d, h = _div_terms(_target(lp, lq, beta, l_r, DIV), lq, beta, log_b,
                                          log_1mb, DIV)
                        r = h - tl.exp(lq) * h_sum
                        r = tl.where(tail_piv, r, tl.where(col == piv, r_piv, r)) * cg
                        if HARD:
                            r += ch * _hard_grad(x, col, y, piv_x, mx_s, c_x, z_x)
                        tl.store(g_row + col, r.to(GRAD.dtype.element_ty), mask=ent)
    else:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            _fill_row(g_row, V, 0.0, BLOCK_V)


def class_bitmap(idx: torch.Tensor, v: int) -> torch.Tensor:
    """[N, ceil(V/32)] int32: bit c % 32 of word c // 32 set where class c is among the row's
    entries (padding and out-of-range indices set nothing). Indices are unique per row, so
    adding distinct powers of two is a bitwise OR; bit 31 is -2³¹ (int32), and no partial
    sum leaves the int32 range."""
    n, _ = idx.shape
    ix = idx.long()
    ok = (ix >= 0) & (ix < v)
    ix = torch.where(ok, ix, 0)
    bit = torch.bitwise_left_shift(torch.ones_like(ix), ix & 31)
    bit = torch.where(bit >= 2**31, bit - 2**32, bit).masked_fill_(~ok, 0).to(torch.int32)
    words = torch.zeros(n, (v + 31) // 32, dtype=torch.int32, device=idx.device)
    return words.scatter_add_(1, ix >> 5, bit)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32 (Triton passes Python floats as float32)."""
    hi = torch.tensor(x, dtype=torch.float64).float().item()
    lo = torch.tensor(x - hi, dtype=torch.float64).float().item()
    return hi, lo


def launch_config(v: int, k: int, on_cpu: bool) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_V, num_warps)."""
    block_v, warps = row_tile(v, on_cpu)
    cap = CPU_BLOCK_K if on_cpu else GPU_BLOCK_K
    block_k = max(MIN_BLOCK, min(triton.next_power_of_2(max(k, 1)), cap))
    return block_k, block_v, warps


_CDT = {torch.float64: tl.float64}


def topk_kd_fwd_triton(s, scale, loss_out, grad_out, labels, idx, vals, code: int, w: float,
                       inv_temp: float, logprobs: bool, bucket: bool, ignore_index: int,
                       soft_w: float = 1.0, hard_w: float = 0.0) -> None:
    """Same contract as pytorch.topk_kd_fwd_torch; s and grad_out rows have unit column
    stride, and grad_out may be s itself (every logit is read before it is overwritten)."""
    n, v = s.shape
    if n == 0:
        return
    k = idx.shape[1]
    compute_grad = grad_out.numel() > 0
    soft = int(code) != int(Div.ZERO)
    bucket = bool(bucket) and soft
    if idx.dtype not in (torch.int64, torch.int32):
        idx = idx.long()
    bits = class_bitmap(idx, v) if soft and (bucket or compute_grad) else loss_out
    block_k, block_v, warps = launch_config(v, k, s.device.type == "cpu")
    w_hi, w_lo = _split(w)
    t_hi, t_lo = _split(inv_temp)
    sw_hi, sw_lo = _split(soft_w)
    hw_hi, hw_lo = _split(hard_w)
    _topk_kd_fwd_kernel[(n,)](
        s, idx, vals, labels if labels is not None else loss_out, bits, scale, loss_out,
        grad_out if compute_grad else s,
        s.stride(0), idx.stride(0), idx.stride(1), vals.stride(0), vals.stride(1),
        labels.stride(0) if labels is not None else 0,
        bits.stride(0) if bits is not loss_out else 0,
        grad_out.stride(0) if compute_grad else 0,
        v, k, w_hi, w_lo, t_hi, t_lo, ignore_index, sw_hi, sw_lo, hw_hi, hw_lo,
        DIV=int(code), LOGPROBS=bool(logprobs), BUCKET=bucket, HARD=hard_w != 0.0,
        HAS_LABELS=labels is not None, COMPUTE_GRAD=compute_grad,
        CDT=_CDT.get(s.dtype, tl.float32), BLOCK_K=block_k, BLOCK_V=block_v, num_warps=warps,
    )


def aot_variants():
    """(name, jit function, signature, constexprs, num_warps) for tests/triton_aot_check.py:
    both tail modes with every divergence (taid included); gradient and labels on and off;
    the hard-label term with a divergence and alone (ZERO); bf16, fp32 and fp64 students
    (the int32-index and fp64-compute paths once each)."""
    def sig(dt, it="i64", vt="fp32"):
        return {"S": f"*{dt}", "IDX": f"*{it}", "VALS": f"*{vt}", "LABELS": "*i64",
                "BITS": "*i32", "SCALE": "*fp32", "LOSS": "*fp32", "GRAD": f"*{dt}",
                "stride_s": "i64", "stride_i": "i64", "stride_ik": "i64", "stride_v": "i64",
                "stride_vk": "i64", "stride_l": "i64", "stride_b": "i64", "stride_g": "i64",
                "V": "i32", "K": "i32", "w_hi": "fp32", "w_lo": "fp32",
                "inv_temp_hi": "fp32", "inv_temp_lo": "fp32", "ignore_index": "i32",
                "sw_hi": "fp32", "sw_lo": "fp32", "hw_hi": "fp32", "hw_lo": "fp32"}

    block_k, block_v, warps = launch_config(151936, 100, on_cpu=False)
    divs = (int(Div.FWD_KL), int(Div.REV_KL), int(Div.JSD), int(Div.TAID))
    # (logprobs, bucket): renormalize over logits or log-probs, and the bucket tail
    modes = ((False, False), (True, False), (True, True))
    flags = ((True, True), (False, False))  # (labels, grad)
    for (logprobs, bucket), div, (lab, grad) in (
            (m, d, f) for m in modes for d in divs for f in flags):
        dt = "bf16" if grad else "fp32"
        const = dict(DIV=div, LOGPROBS=logprobs, BUCKET=bucket, HARD=False, HAS_LABELS=lab,
                     COMPUTE_GRAD=grad, CDT=tl.float32, BLOCK_K=block_k, BLOCK_V=block_v)
        yield (f"topk_kd {'bucket' if bucket else 'renorm'} logprobs={logprobs} div={div} "
               f"labels={lab} grad={grad} {dt}", _topk_kd_fwd_kernel, sig(dt), const, warps)
    for bucket, div in ((False, int(Div.FWD_KL)), (True, int(Div.TAID)),
                        (False, int(Div.ZERO))):
        const = dict(DIV=div, LOGPROBS=True, BUCKET=bucket, HARD=True, HAS_LABELS=True,
                     COMPUTE_GRAD=True, CDT=tl.float32, BLOCK_K=block_k, BLOCK_V=block_v)
        yield (f"topk_kd {'bucket' if bucket else 'renorm'} hard label div={div} bf16",
               _topk_kd_fwd_kernel, sig("bf16"), const, warps)
    for bucket in (False, True):
        const = dict(DIV=int(Div.JSD), LOGPROBS=True, BUCKET=bucket, HARD=False,
                     HAS_LABELS=True, COMPUTE_GRAD=True, CDT=tl.float64, BLOCK_K=block_k,
                     BLOCK_V=block_v)
        yield (f"topk_kd {'bucket' if bucket else 'renorm'} fp64 int32 idx",
               _topk_kd_fwd_kernel, sig("fp64", "i32", "bf16"), const, warps)
