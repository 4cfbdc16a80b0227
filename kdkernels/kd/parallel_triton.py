"""Triton kernels of vocabulary-parallel `kd_loss` (docs/vocab_parallel.md).

The same three phases as the torch launcher (kdkernels/kd/parallel.py), with the local
work of each phase done by one kernel that streams this rank's [N, W] shard once, one
program per row, and the O(N) glue between them (the all-reduces, through
kdkernels.parallel.all_reduce, and a few [N, ·] tensor operations) in PyTorch, shared
with the CUDA launcher (kd/parallel_glue.py: the buffers' layout and the collectives):

  stats     per distribution d ∈ {a = s/τ, b = t/τ or TAID's mix, x = s}: the local row
            max m over the finite-or-−inf entries, Z'_loc = Σ e^{d − m} without the local
            argmax (kept lane by lane: each lane tracks its own max and leaves it out, and
            the lanes merge exactly at the end), the NaN/+inf flag, a's local argmax (the
            pivot candidate) and, for reverse KL, b there.  → STATS [N, 8], PIV [N]
  glue      all-reduce MAX of the maxima and the flag; each rank rescales its Z'_loc to
            the global max M (a rank whose max is M "claims" the row and keeps its argmax
            out; the others add it back: (1 + Z'_loc)·e^{m − M}); all-reduce SUM of those
            sums, the claim counts (and b at the pivot); the normalisers M + log1p(Z').
  partials  with the global normalisers: Σ d, G' = Σ_{v≠j*} q g and P = q_{j*} g_{j*}
            (j* the global pivot, on the rank that owns it), and x_y at an owned label.
            → PART [N, 4], all-reduced (SUM)
  gradient  the local gradient, written once in the input dtype: q − p, or q(g − ḡ) with
            ḡ = G' + P, plus the hard label's softmax(x) − onehot(y); ignored rows 0, rows
            without a softmax NaN; the pivot's entry from the closed forms of parallel.py.

Every kernel computes in float32, or in float64 for float64 students (the compute dtype is
that of the small per-row buffers, CDT); the scalars (1/τ, the mixture weight, the loss
weights) are read from a [6] tensor of that dtype, so float64 runs keep all their digits.
Collectives carry float64, as in the torch path (the same tensors, the same bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton.math import expm1, safe_max
from .._triton.tiles import row_tile
from ..parallel import Shards
from .parallel_glue import N_PART, N_STATS, dists, global_normalisers, reduce_partials
from .params import FWD_KL, JSD, REV_KL, SKEW_FWD, SKEW_REV, TAID, TVD, ZERO, KDParams
from .triton import _pair_terms

C_ZERO = tl.constexpr(ZERO)
C_FWD = tl.constexpr(FWD_KL)
C_REV = tl.constexpr(REV_KL)
C_TVD = tl.constexpr(TVD)
C_TAID = tl.constexpr(TAID)

# --- device functions ----------------------------------------------------------------

@triton.jit
def _lane_step(m, z, d):
    """One tile of a lane-wise online Σ e^{d − m} that leaves each lane's max out.

    Returns (m, z, took): took marks the lanes where d became the new max (the old max
    then joins the sum, rescaled). One exp per element: e^{−|d − m|}."""
    NEG_INF: tl.constexpr = float("-inf")
    took = d > m
    e = tl.exp(-tl.abs(d - m))
    old = tl.where(m == NEG_INF, 0.0, 1.0)
    z = tl.where(took, (z + old) * e, tl.where(d == NEG_INF, z, z + e))
    return tl.where(took, d, m), z, took


@triton.jit
def _lane_total(m, z, star, lanes):
    """Merge the lanes: (max, Σ e^{d − max} over every entry but the max of lane `star`)."""
    NEG_INF: tl.constexpr = float("-inf")
    big = tl.max(m, 0)
    r = tl.exp(m - safe_max(big))
    extra = tl.where((lanes == star) | (m == NEG_INF), 0.0, r)
    return big, tl.sum(z * r + extra, 0)


@triton.jit
def _load_dists(s_row, t_row, cols, msk, inv_temp, inv_temp_t, w, DIV: tl.constexpr):
    """(x, a, b): the raw student logits x, a = x/τ and b = t/τ_t (TAID: the mix
    (1−λ)a + λb), in the compute dtype (that of inv_temp); masked columns −inf."""
    NEG_INF: tl.constexpr = float("-inf")
    x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(inv_temp.dtype)
    a = x * inv_temp
    b = a
    if DIV != C_ZERO:
        b = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(inv_temp.dtype) * inv_temp_t
        if DIV == C_TAID:
            b = (1.0 - w) * a + w * b
    return x, a, b


@triton.jit
def _tvd_g(diff):
    """tvd's g = −½(sign(p − q) + 1) from diff = p − q."""
    return tl.where(diff > 0, -1.0, tl.where(diff < 0, 0.0, -0.5))


# --- kernels -------------------------------------------------------------------------

@triton.jit
def _vp_stats_kernel(
    S, T, LABELS, PRM, STATS, PIV, stride_s, stride_t, W, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, USE_X: tl.constexpr, CDT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    inv_temp = tl.load(PRM + 0).to(CDT)
    inv_temp_t = tl.load(PRM + 6).to(CDT)  # the teacher's 1/τ_t
    w = tl.load(PRM + 1).to(CDT)
    m_a = tl.full([BLOCK_V], NEG_INF, CDT)
    z_a = tl.zeros([BLOCK_V], CDT)
    i_a = tl.zeros([BLOCK_V], tl.int32)
    m_b = tl.full([BLOCK_V], NEG_INF, CDT)
    z_b = tl.zeros([BLOCK_V], CDT)
    b_at = tl.zeros([BLOCK_V], CDT)
    m_x = tl.full([BLOCK_V], NEG_INF, CDT)
    z_x = tl.zeros([BLOCK_V], CDT)
    n_bad = tl.zeros([BLOCK_V], tl.int32)
    valid = True
    if HAS_LABELS:
        valid = tl.load(LABELS + row) != ignore_index
    if valid:  # ignored rows: M = −inf, Z' = 0 (every rank skips them alike)
        for off in range(0, W, BLOCK_V):
            cols = off + lanes
            msk = cols < W
            x = tl.load(s_row + cols, mask=msk, other=NEG_INF).to(CDT)
            bx = (x != x) | (x == float("inf"))
            n_bad += bx.to(tl.int32)
            a = tl.where(bx, NEG_INF, x * inv_temp)
            m_a, z_a, took = _lane_step(m_a, z_a, a)
            i_a = tl.where(took, cols, i_a)
            if DIV != C_ZERO:
                b = tl.load(t_row + cols, mask=msk, other=NEG_INF).to(CDT) * inv_temp_t
                if DIV == C_TAID:  # from the raw s: a NaN or +inf there reaches the mix
                    b = (1.0 - w) * (x * inv_temp) + w * b
                bb = (b != b) | (b == float("inf"))
                n_bad += bb.to(tl.int32)
                b = tl.where(bb, NEG_INF, b)
                if DIV == C_REV:
                    b_at = tl.where(took, b, b_at)
                m_b, z_b, _ = _lane_step(m_b, z_b, b)
            if USE_X:
                m_x, z_x, _ = _lane_step(m_x, z_x, tl.where(bx, NEG_INF, x))
    # the pivot candidate: the first column holding the row max (as torch's argmax)
    piv = tl.min(tl.where(m_a == tl.max(m_a, 0), i_a, 2147483647), 0)
    star = piv % BLOCK_V
    big_a, zr_a = _lane_total(m_a, z_a, star, lanes)
    st = STATS + row * 8
    tl.store(st + 0, big_a)
    tl.store(st + 4, zr_a)
    tl.store(st + 3, (tl.sum(n_bad, 0) > 0).to(CDT))
    if DIV != C_ZERO:
        star_b = tl.min(tl.where(m_b == tl.max(m_b, 0), lanes, BLOCK_V), 0)
        big_b, zr_b = _lane_total(m_b, z_b, star_b, lanes)
        tl.store(st + 1, big_b)
        tl.store(st + 5, zr_b)
        tl.store(st + 7, tl.sum(tl.where(lanes == star, b_at, 0.0), 0))
    if USE_X:
        star_x = tl.min(tl.where(m_x == tl.max(m_x, 0), lanes, BLOCK_V), 0)
        big_x, zr_x = _lane_total(m_x, z_x, star_x, lanes)
        tl.store(st + 2, big_x)
        tl.store(st + 6, zr_x)
    tl.store(PIV + row, piv)


@triton.jit
def _vp_partials_kernel(
    S, T, LABELS, PRM, NORM, FLAGS, PIV, PART, stride_s, stride_t, W, start, ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, CDT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    lanes = tl.arange(0, BLOCK_V)
    inv_temp = tl.load(PRM + 0).to(CDT)
    inv_temp_t = tl.load(PRM + 6).to(CDT)  # the teacher's 1/τ_t
    w = tl.load(PRM + 1).to(CDT)
    log_w = tl.load(PRM + 2).to(CDT)
    log_1mw = tl.load(PRM + 3).to(CDT)
    flags = tl.load(FLAGS + row)
    ok = (flags & 1) == 0  # not a bad row (NaN/+inf somewhere, or no finite entry)
    own = (flags & 2) != 0  # this rank holds the global pivot j*
    y = 0
    if HAS_LABELS:
        y = tl.load(LABELS + row).to(tl.int64)
        ok = ok & (y != ignore_index)
    piv = tl.load(PIV + row)
    nr = NORM + row * 9
    m_a = tl.load(nr + 0)
    c_a = tl.load(nr + 1)
    m_b = tl.load(nr + 2)
    c_b = tl.load(nr + 3)
    b_ref = tl.load(nr + 6)
    d_acc = tl.zeros([BLOCK_V], CDT)
    qg_acc = tl.zeros([BLOCK_V], CDT)
    p_acc = tl.zeros([BLOCK_V], CDT)
    if ok:
        if DIV != C_ZERO:
            diff_piv = 0.0
            if DIV == C_TVD:  # the pivot's p − q as Σ'q − Σ'p (both peak there: 1 − 1)
                x_j, a_j, b_j = _load_dists(s_row, t_row, piv, piv < W, inv_temp, inv_temp_t,
                                            w, DIV)
                diff_piv = expm1((b_j - m_b) - c_b) - expm1((a_j - m_a) - c_a)
            for off in range(0, W, BLOCK_V):
                cols = off + lanes
                msk = cols < W
                _, a, b = _load_dists(s_row, t_row, cols, msk, inv_temp, inv_temp_t, w, DIV)
                la = a - m_a
                logq = la - c_a
                logp = (b - m_b) - c_b
                if (DIV == C_FWD) or (DIV == C_TAID):
                    p = tl.exp(logp)
                    d_acc += tl.where(msk & (p > 0), p * (logp - logq), 0.0)
                else:
                    is_p = (cols == piv) & own
                    if DIV == C_TVD:
                        diff = tl.where(is_p, diff_piv, tl.exp(logp) - tl.exp(logq))
                        d = 0.5 * tl.abs(diff)
                        g = _tvd_g(diff)
                    else:
                        d, g = _pair_terms(logq, logp, la - (b - b_ref), c_a - c_b, w, log_w,
                                           log_1mw, DIV)
                    d_acc += tl.where(msk, d, 0.0)
                    qg = tl.exp(logq) * g
                    qg_acc += tl.where(msk & (is_p == 0), qg, 0.0)
                    p_acc += tl.where(is_p, qg, 0.0)
    pt = PART + row * 4
    tl.store(pt + 0, tl.sum(d_acc, 0))
    tl.store(pt + 1, tl.sum(qg_acc, 0))
    tl.store(pt + 2, tl.sum(p_acc, 0))
    if HARD:  # x_y on the rank that owns the label
        y_loc = y - start
        mine = ok & (y_loc >= 0) & (y_loc < W)
        x_y = tl.load(s_row + y_loc, mask=mine, other=0.0).to(CDT)
        tl.store(pt + 3, x_y)
    else:
        tl.store(pt + 3, tl.sum(p_acc * 0.0, 0))


@triton.jit
def _vp_grad_kernel(
    S, T, LABELS, PRM, SCALE, NORM, FLAGS, PIV, GRAD, stride_s, stride_t, stride_g, W, start,
    ignore_index,
    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, USE_X: tl.constexpr,
    CDT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    g_row = GRAD + row * stride_g
    lanes = tl.arange(0, BLOCK_V)
    inv_temp = tl.load(PRM + 0).to(CDT)
    inv_temp_t = tl.load(PRM + 6).to(CDT)  # the teacher's 1/τ_t
    w = tl.load(PRM + 1).to(CDT)
    log_w = tl.load(PRM + 2).to(CDT)
    log_1mw = tl.load(PRM + 3).to(CDT)
    soft_w = tl.load(PRM + 4).to(CDT)
    hard_w = tl.load(PRM + 5).to(CDT)
    flags = tl.load(FLAGS + row)
    bad = (flags & 1) != 0
    own = (flags & 2) != 0
    y = 0
    ok = bad == 0
    fill = float("nan")
    if HAS_LABELS:
        y = tl.load(LABELS + row).to(tl.int64)
        ok = ok & (y != ignore_index)
        fill = tl.where(y != ignore_index, float("nan"), 0.0)
    if ok:
        piv = tl.load(PIV + row)
        nr = NORM + row * 9
        m_a = tl.load(nr + 0)
        c_a = tl.load(nr + 1)
        m_b = tl.load(nr + 2)
        c_b = tl.load(nr + 3)
        m_x = tl.load(nr + 4)
        c_x = tl.load(nr + 5)
        b_ref = tl.load(nr + 6)
        g_rest = tl.load(nr + 7)
        g_bar = g_rest + tl.load(nr + 8)
        sc = tl.load(SCALE).to(CDT)
        c_soft = soft_w * inv_temp * sc
        c_hard = hard_w * sc
        y_loc = y - start
        x_j, a_j, b_j = _load_dists(s_row, t_row, piv, piv < W, inv_temp, inv_temp_t, w,
                                    DIV)
        logq_j = (a_j - m_a) - c_a
        logp_j = (b_j - m_b) - c_b
        diff_piv = expm1(logp_j) - expm1(logq_j)
        # the pivot's logit is read before any gradient is written: GRAD may be S
        tl.debug_barrier()
        for off in range(0, W, BLOCK_V):
            cols = off + lanes
            msk = cols < W
            x, a, b = _load_dists(s_row, t_row, cols, msk, inv_temp, inv_temp_t, w, DIV)
            la = a - m_a
            logq = la - c_a
            q = tl.exp(logq)
            logp = (b - m_b) - c_b
            is_p = (cols == piv) & own
            if DIV == C_ZERO:
                out = tl.zeros([BLOCK_V], CDT)
            elif (DIV == C_FWD) or (DIV == C_TAID):
                out = q - tl.exp(logp)
            elif DIV == C_TVD:
                g = _tvd_g(tl.where(is_p, diff_piv, tl.exp(logp) - q))
                out = q * (g - g_bar)
            else:
                _, g = _pair_terms(logq, logp, la - (b - b_ref), c_a - c_b, w, log_w, log_1mw,
                                   DIV)
                out = q * (g - g_bar)
            out = out * c_soft
            if HARD:
                if USE_X:
                    ls = (x - m_x) - c_x
                else:
                    ls = logq
                out += c_hard * (tl.exp(ls) - tl.where(cols == y_loc, 1.0, 0.0))
            tl.store(g_row + cols, out.to(GRAD.dtype.element_ty), mask=msk & (is_p == 0))
        if own:  # the pivot, from closed forms that keep their digits where q_{j*} ≈ 1
            if DIV == C_ZERO:
                pv = logq_j * 0.0
            elif (DIV == C_FWD) or (DIV == C_TAID):
                pv = expm1(logq_j) - expm1(logp_j)
            else:
                if DIV == C_TVD:
                    g_j = _tvd_g(diff_piv)
                else:
                    _, g_j = _pair_terms(logq_j, logp_j, (a_j - m_a) - (b_j - b_ref), c_a - c_b,
                                         w, log_w, log_1mw, DIV)
                pv = (-expm1(logq_j) * g_j - g_rest) * tl.exp(logq_j)
            pv = pv * c_soft
            if HARD:
                if USE_X:
                    ls_j = (x_j - m_x) - c_x
                else:
                    ls_j = logq_j
                pv += c_hard * tl.where(piv == y_loc, expm1(ls_j), tl.exp(ls_j))
            tl.store(g_row + piv, pv.to(GRAD.dtype.element_ty))
    else:  # ignored rows 0, rows without a softmax NaN
        for off in range(0, W, BLOCK_V):
            cols = off + lanes
            vals = tl.zeros([BLOCK_V], tl.float32) + fill
            tl.store(g_row + cols, vals.to(GRAD.dtype.element_ty), mask=cols < W)


# --- launcher ------------------------------------------------------------------------

def _tl_dtype(dt: torch.dtype):
    return tl.float64 if dt == torch.float64 else tl.float32


def kd_fwd_vocab_parallel_triton(s, scale, loss_out, grad_out, labels, t, prm: KDParams,
                                 sh: Shards, parts=None) -> None:
    """The contract of parallel.kd_fwd_vocab_parallel, with Triton kernels for the local
    work: loss_out[N] (float32, the same on every rank) and, when grad_out is non-empty,
    grad_out[N, W] = scale·∂L_n/∂s at this rank's columns (grad_out may be s itself: the
    fused losses' chunk buffer). s, t, grad_out: unit column stride. Three all-reduces
    per call (every rank must use this backend alike)."""
    n, width = s.shape
    dev = s.device
    cdt = torch.float64 if s.dtype == torch.float64 else torch.float32
    code = prm.div
    d = dists(prm)
    has_labels = labels is not None
    block, warps = row_tile(width, dev.type == "cpu")
    prm_t = torch.tensor([prm.inv_temp, prm.w, prm.log_w, prm.log_1mw, prm.soft_w,
                          prm.hard_w, prm.teacher_inv_temp], dtype=cdt, device=dev)
    lab = labels if has_labels else loss_out  # a placeholder pointer, never read
    common = dict(DIV=code, HAS_LABELS=has_labels, CDT=_tl_dtype(cdt), BLOCK_V=block,
                  num_warps=warps)

    # --- phase 1: local statistics, then the global normalisers
    stats = torch.zeros(n, N_STATS, dtype=cdt, device=dev)
    piv = torch.empty(n, dtype=torch.int32, device=dev)
    _vp_stats_kernel[(n,)](s, t, lab, prm_t, stats, piv, s.stride(0), t.stride(0), width,
                           prm.ignore_index, USE_X=d.use_x, **common)
    nz = global_normalisers(stats, code, d, sh.group)

    # --- phase 2: partial sums with the global normalisers
    part = torch.empty(n, N_PART, dtype=cdt, device=dev)
    _vp_partials_kernel[(n,)](s, t, lab, prm_t, nz.norm, nz.flags, piv, part, s.stride(0),
                              t.stride(0), width, sh.start, prm.ignore_index, HARD=d.hard,
                              **common)
    reduce_partials(part, prm, d, nz, labels, loss_out, sh.group, parts)
    if grad_out.numel() == 0:
        return

    # --- phase 3: the local gradient (no communication)
    _vp_grad_kernel[(n,)](s, t, lab, prm_t, scale, nz.norm, nz.flags, piv, grad_out,
                          s.stride(0), t.stride(0), grad_out.stride(0), width, sh.start,
                          prm.ignore_index, HARD=d.hard, USE_X=d.use_x, **common)


# --- ahead-of-time compile variants --------------------------------------------------

def aot_variants():
    """(name, jit function, signature, constexprs, num_warps) for tests/triton_aot_check.py:
    the three kernels for every divergence with labels, hard label and a temperature (bf16
    student, fp32 compute), without labels, and one float64 variant each."""
    def sig(kernel: str, dt: str, cdt: str):
        base = {"S": f"*{dt}", "T": f"*{dt}", "LABELS": "*i64", "PRM": f"*{cdt}"}
        if kernel == "stats":
            return {**base, "STATS": f"*{cdt}", "PIV": "*i32", "stride_s": "i64",
                    "stride_t": "i64", "W": "i32", "ignore_index": "i32"}
        if kernel == "partials":
            return {**base, "NORM": f"*{cdt}", "FLAGS": "*i32", "PIV": "*i32",
                    "PART": f"*{cdt}", "stride_s": "i64", "stride_t": "i64", "W": "i32",
                    "start": "i32", "ignore_index": "i32"}
        return {**base, "SCALE": "*fp32", "NORM": f"*{cdt}", "FLAGS": "*i32", "PIV": "*i32",
                "GRAD": f"*{dt}", "stride_s": "i64", "stride_t": "i64", "stride_g": "i64",
                "W": "i32", "start": "i32", "ignore_index": "i32"}

    block, warps = row_tile(128_000 // 8, on_cpu=False)
    kernels = {"stats": _vp_stats_kernel, "partials": _vp_partials_kernel,
               "grad": _vp_grad_kernel}
    cases = [(div, True, True, "bf16", "fp32") for div in
             (ZERO, FWD_KL, REV_KL, JSD, SKEW_FWD, SKEW_REV, TVD, TAID)]
    cases += [(REV_KL, False, False, "fp32", "fp32"), (JSD, True, True, "fp64", "fp64")]
    for div, lab, hard, dt, cdt in cases:
        for kname, fn in kernels.items():
            if kname == "stats" and div in (JSD, SKEW_FWD, SKEW_REV, TVD) and dt == "bf16":
                continue  # the stats kernel only tells ZERO / b / TAID / reverse KL apart
            const = dict(DIV=div, HAS_LABELS=lab,
                         CDT=tl.float64 if cdt == "fp64" else tl.float32, BLOCK_V=block)
            if kname != "stats":
                const["HARD"] = hard
            if kname != "partials":
                const["USE_X"] = hard
            yield (f"kd_vocab_parallel {kname} div={div} labels={lab} hard={hard} {dt}",
                   fn, sig(kname, dt, cdt), const, warps)
