"""The `triton` backend of `sinkhorn` (docs/spec.md §4; the math: pytorch.py).

Same iteration, same stopping rule and the same exact unrolled reverse pass as the torch
path, in scaled potentials φ = f/ε, ψ = g/ε and Ce = C/ε. What the kernels keep per
iteration k is not φᵏ, ψᵏ but the two log-sum-exps that made them,

    Rᵏ_i = LSE_j(ψᵏ⁻¹_j − Ce_ij)   (φᵏ = log a − Rᵏ)
    Lᵏ_j = LSE_i(φᵏ_i − Ce_ij)     (ψᵏ = log b − Lᵏ)

each as the pair (shift, log-sum): the max of its terms (0 where that is ±inf) and
log Σ exp(term − shift), LSE = shift + log-sum. φᵏ, ψᵏ are recomputed from them exactly
as the forward formed them, and the reverse pass needs no reduction to normalise its
weights: α^k_ij = exp(((ψᵏ⁻¹_j − Ce_ij) − shift) − log-sum) of Rᵏ_i, β^k likewise with
Lᵏ_j, elementwise, so a tile of rows or of columns is self-contained in either
orientation. Subtracting the shift (one of the terms itself) before the small log-sum
keeps the weights as accurate as torch.softmax's (a single rounded LSE of magnitude
|Ce| ~ 600 would cost 600 ulps of relative error in every weight). History: 2·K·(B1 + B2)
numbers per problem where the torch path keeps K·(B1 + B2).

Two launch structures, chosen by the problem size (`fused_blocks`):

  fused   (the padded B1 × B2 problem fits one register tile: 4096 float32 or 2048
          float64 entries on a GPU, 8 or 4 per thread, no register spills on sm_80/sm_90)
          one program per problem runs every iteration with Ce, φ, ψ in registers: one
          launch for the whole solve (and one for the whole reverse pass, which
          accumulates C̄ in registers and writes it once). Reads C once, writes f, g
          (and Rᵏ, Lᵏ per iteration when a gradient or `tol` needs them).
  tiled   (larger problems) one launch per half-iteration: the row update over a
          (problem, row tile) grid streams column tiles of C (online log-sum-exp) and
          writes Rᵏ for its rows; the column update over (problem, column tile) streams
          row tiles and writes Lᵏ: C is read twice per iteration. The reverse pass is
          two launches per iteration, the same two grids: the column step (rows:
          C̄ += β ⊙ ḡ, f̄ = −Σ_j β ḡ) and the row step (columns: C̄ += α ⊙ f̄,
          ḡ = −Σ_i α f̄), C̄ read-modified-written in place, no [K, B1, B2] storage.

`tol` is decided on the device, with no host synchronisation: the number of iterations
run lives in a device int32 (`iters`, initially n_iters). The error of iteration k,
Σ_i |exp(φᵏ_i + Rᵏ⁺¹_i) − a_i| (Rᵏ⁺¹ is the next row update's log-sum-exp, as in the torch
path), is written per problem (and row tile, no atomics); a one-program check launch
sums the tiles, takes the max over problems (NaN counts as +inf: torch's `max < tol` is
false on NaN) and sets `iters = k` at the first iteration below `tol`, the torch path's
global rule exactly. Every later launch reads `iters` and returns at once. The fused path
runs iterations in segments of SEGMENT per launch (a check launch after each; up to
SEGMENT − 1 iterations past the stop are computed and discarded), the tiled path checks
every iteration; a last launch writes f, g from the kept Rᵏ, Lᵏ of iteration `iters`.
Without a gradient, a ring of SEGMENT (fused) or 2 (tiled) iterations is kept instead of
the full history. The backward reads `iters` on the device too: its launches above it
return at once. The host issues the launches of all n_iters iterations either way.

Arithmetic is in the cost's dtype: float32, or float64 for a float64 cost (float64
kernels; ε and tol reach the kernels as a device tensor of that dtype, so nothing is
rounded to float32). C/ε is a correctly rounded division, as torch's. Log-sum-exps treat
±inf as torch.logsumexp does (an all −inf row gives −inf, a +inf entry gives +inf); NaN
propagates (tl.max may drop a NaN, the sum of exponentials does not). Cost offsets are
int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest padded B1·B2 of the fused (one program per problem) path on a GPU, per element
# size, and the elements per thread it runs at (up to 16 warps): measured with ptxas on
# sm_80/sm_90, these keep the fused backward (Ce and C̄ live, plus temporaries) free of
# register spills. Under the interpreter every program costs Python overhead, so larger.
GPU_FUSED_TILE = {4: 4096, 8: 2048}
GPU_PER_THREAD = {4: 8, 8: 4}
CPU_FUSED_TILE = 1 << 16
# iterations per fused launch when `tol` is given
SEGMENT = 16
# tiled path: rows (or columns) owned per program and the streamed tile's other side, per
# element size (4 warps, no spills); under the interpreter larger
GPU_TILE = {4: (16, 64), 8: (16, 32)}
CPU_TILE = (64, 256)


# ----------------------------------------------------------------------- device helpers

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _div(x, y):
    """x / y rounded correctly (Triton's float32 `/` is an approximation)."""
    if x.dtype == tl.float64:
        q = x / y
    else:
        q = tl.div_rn(x, y)
    return q


@triton.jit
def _safe(m):
    """The shift of a log-sum-exp: 0 where the max is ±inf (torch.logsumexp's rule)."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _lse(x, AXIS: tl.constexpr):
    """Log-sum-exp of a tile along AXIS (masked entries hold -inf) as (shift, log-sum):
    LSE = shift + log-sum, shift = the max (0 where it is ±inf)."""
    ms = _safe(tl.max(x, AXIS))
    if AXIS == 0:
        z = tl.sum(tl.exp(x - ms[None, :]), 0)
    else:
        z = tl.sum(tl.exp(x - ms[:, None]), 1)
    return ms, tl.log(z)


@triton.jit
def _online(mx, s, x, AXIS: tl.constexpr):
    """One tile of a streamed log-sum-exp: (running max, sum relative to _safe(max))."""
    m_new = tl.maximum(mx, tl.max(x, AXIS))
    ms = _safe(m_new)
    if AXIS == 0:
        e = tl.sum(tl.exp(x - ms[None, :]), 0)
    else:
        e = tl.sum(tl.exp(x - ms[:, None]), 1)
    # mx = -inf (nothing yet) gives a factor 0; the sum is then 0 as well
    return m_new, s * tl.exp(mx - ms) + e


@triton.jit
def _hist(H, slot, part, M, m, B):
    """Row `m` of part (0: shift, 1: log-sum) of slot `slot` in H [slots, 2, M, B]."""
    return H + ((slot * 2 + part) * M + m) * B


# ------------------------------------------------------------------------ fused kernels


@triton.jit
def _sk_fused_fwd_kernel(
    C, LA, LB, SCAL, RH, LH, F, G, PART, ITERS,
    M, B1, B2, k0, k1, n_slots,
    TOL: tl.constexpr, HIST: tl.constexpr, OUT: tl.constexpr,
    BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr,
):
    """Iterations k0..k1-1 of problem `program_id` with the whole problem in registers.

    HIST: store Rᵏ, Lᵏ in slot (k − 1) % n_slots of RH [n_slots, 2, M, B1] and LH
    [n_slots, 2, M, B2]; TOL: store the error of iteration k in PART[k − k0, m], and skip
    the launch when ITERS says the solve stopped before k0; OUT: write f, g at the end.
    """
    m = tl.program_id(0).to(tl.int64)
    go = True
    if TOL:
        go = tl.load(ITERS) >= k0
    if go:
        rows = tl.arange(0, BLOCK_1)
        cols = tl.arange(0, BLOCK_2)
        rm = rows < B1
        cm = cols < B2
        msk = rm[:, None] & cm[None, :]
        eps = tl.load(SCAL)
        c = tl.load(C + m * B1 * B2 + rows[:, None] * B2 + cols[None, :], mask=msk, other=0.0)
        ce = _div(c, eps)
        la = tl.load(LA + m * B1 + rows, mask=rm, other=0.0)
        lb = tl.load(LB + m * B2 + cols, mask=cm, other=0.0)
        # ψ^{k0-1}: 0 at the start, else log b − L^{k0-1} from the kept slot
        pslot = tl.maximum(k0 - 2, 0) % n_slots
        lms = tl.load(_hist(LH, pslot, 0, M, m, B2) + cols, mask=cm, other=0.0)
        llz = tl.load(_hist(LH, pslot, 1, M, m, B2) + cols, mask=cm, other=0.0)
        psi = tl.where(k0 > 1, lb - (lms + llz), tl.zeros_like(lb))
        phi = tl.zeros_like(la)
        rms, rlz = _lse(tl.where(msk, psi[None, :] - ce, NEG_INF), 1)
        for k in range(k0, k1):
            phi = la - (rms + rlz)
            lms, llz = _lse(tl.where(msk, phi[:, None] - ce, NEG_INF), 0)
            psi = lb - (lms + llz)
            if HIST:
                slot = (k - 1) % n_slots
                tl.store(_hist(RH, slot, 0, M, m, B1) + rows, rms, mask=rm)
                tl.store(_hist(RH, slot, 1, M, m, B1) + rows, rlz, mask=rm)
                tl.store(_hist(LH, slot, 0, M, m, B2) + cols, lms, mask=cm)
                tl.store(_hist(LH, slot, 1, M, m, B2) + cols, llz, mask=cm)
            rms, rlz = _lse(tl.where(msk, psi[None, :] - ce, NEG_INF), 1)
            if TOL:
                d = tl.abs(tl.exp(phi + (rms + rlz)) - tl.exp(la))
                tl.store(PART + (k - k0) * M + m, tl.sum(tl.where(rm, d, 0.0), 0))
        if OUT:
            tl.store(F + m * B1 + rows, phi * eps, mask=rm)
            tl.store(G + m * B2 + cols, psi * eps, mask=cm)


@triton.jit
def _sk_fused_bwd_kernel(
    C, LA, LB, SCAL, RH, LH, ITERS, GF, GG, CB, LAB, LBB,
    M, B1, B2,
    HAS_GF: tl.constexpr, HAS_GG: tl.constexpr,
    BLOCK_1: tl.constexpr, BLOCK_2: tl.constexpr,
):
    """The whole reverse pass of one problem (pytorch.py's SinkhornFunction.backward), C̄
    accumulated in registers; the history slot of iteration k is k − 1."""
    m = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_1)
    cols = tl.arange(0, BLOCK_2)
    rm = rows < B1
    cm = cols < B2
    msk = rm[:, None] & cm[None, :]
    eps = tl.load(SCAL)
    offs = m * B1 * B2 + rows[:, None] * B2 + cols[None, :]
    ce = _div(tl.load(C + offs, mask=msk, other=0.0), eps)
    la = tl.load(LA + m * B1 + rows, mask=rm, other=0.0)
    lb = tl.load(LB + m * B2 + cols, mask=cm, other=0.0)
    fb = tl.zeros_like(la)
    gb = tl.zeros_like(lb)
    if HAS_GF:
        fb = tl.load(GF + m * B1 + rows, mask=rm, other=0.0)
    if HAS_GG:
        gb = tl.load(GG + m * B2 + cols, mask=cm, other=0.0)
    cbar = tl.zeros_like(ce)
    labar = tl.zeros_like(la)
    lbbar = tl.zeros_like(lb)
    n = tl.load(ITERS)
    for t in range(0, n):
        k = n - t
        rms = tl.load(_hist(RH, k - 1, 0, M, m, B1) + rows, mask=rm, other=0.0)
        rlz = tl.load(_hist(RH, k - 1, 1, M, m, B1) + rows, mask=rm, other=0.0)
        lms = tl.load(_hist(LH, k - 1, 0, M, m, B2) + cols, mask=cm, other=0.0)
        llz = tl.load(_hist(LH, k - 1, 1, M, m, B2) + cols, mask=cm, other=0.0)
        # column update ψᵏ = log b − LSE_i(φᵏ − Ce): β_ij = exp(φᵏ_i − Ce_ij − Lᵏ_j)
        phi = la - (rms + rlz)
        beta = tl.exp(((phi[:, None] - ce) - lms[None, :]) - llz[None, :])
        w = tl.where(msk, beta, 0.0) * gb[None, :]
        cbar += w
        fb = fb - tl.sum(w, 1)
        lbbar += eps * gb
        # row update φᵏ = log a − LSE_j(ψᵏ⁻¹ − Ce): α_ij = exp(ψᵏ⁻¹_j − Ce_ij − Rᵏ_i)
        pslot = tl.maximum(k - 2, 0)
        pms = tl.load(_hist(LH, pslot, 0, M, m, B2) + cols, mask=cm, other=0.0)
        plz = tl.load(_hist(LH, pslot, 1, M, m, B2) + cols, mask=cm, other=0.0)
        psi = tl.where(k > 1, lb - (pms + plz), tl.zeros_like(lb))
        alpha = tl.exp(((psi[None, :] - ce) - rms[:, None]) - rlz[:, None])
        w = tl.where(msk, alpha, 0.0) * fb[:, None]
        cbar += w
        labar += eps * fb
        gb = -tl.sum(w, 0)
        fb = tl.zeros_like(fb)
    tl.store(CB + offs, cbar, mask=msk)
    tl.store(LAB + m * B1 + rows, labar, mask=rm)
    tl.store(LBB + m * B2 + cols, lbbar, mask=cm)


# ------------------------------------------------------------------------ tiled kernels


@triton.jit
def _sk_row_kernel(
    C, LA, LB, SCAL, RH, LH, F, PART, ITERS,
    M, B1, B2, k, n_slots,
    TOL: tl.constexpr, OUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Row update k for a tile of rows: Rᵏ = LSE_j(ψᵏ⁻¹_j − Ce_ij) into slot (k−1) % n_slots.

    TOL: also the error of iteration k − 1 over these rows into PART[m, tile]
    (Rᵏ is its log-sum-exp), and skip when ITERS < k. OUT: write f = ε(log a − Rᵏ).
    """
    m = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    go = True
    if TOL:
        go = tl.load(ITERS) >= k
    if go:
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < B1
        eps = tl.load(SCAL)
        la = tl.load(LA + m * B1 + rows, mask=rm, other=0.0)
        slot = (k - 1) % n_slots
        pslot = tl.maximum(k - 2, 0) % n_slots
        mx = tl.full([BLOCK_R], NEG_INF, la.dtype)
        s = tl.zeros_like(la)
        for c0 in range(0, B2, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cm = cols < B2
            msk = rm[:, None] & cm[None, :]
            lb = tl.load(LB + m * B2 + cols, mask=cm, other=0.0)
            pms = tl.load(_hist(LH, pslot, 0, M, m, B2) + cols, mask=cm, other=0.0)
            plz = tl.load(_hist(LH, pslot, 1, M, m, B2) + cols, mask=cm, other=0.0)
            psi = tl.where(k > 1, lb - (pms + plz), tl.zeros_like(lb))
            c = tl.load(C + m * B1 * B2 + rows[:, None].to(tl.int64) * B2 + cols[None, :],
                        mask=msk, other=0.0)
            x = tl.where(msk, psi[None, :] - _div(c, eps), NEG_INF)
            mx, s = _online(mx, s, x, 1)
        rms = _safe(mx)
        rlz = tl.log(s)
        tl.store(_hist(RH, slot, 0, M, m, B1) + rows, rms, mask=rm)
        tl.store(_hist(RH, slot, 1, M, m, B1) + rows, rlz, mask=rm)
        if OUT:
            tl.store(F + m * B1 + rows, (la - (rms + rlz)) * eps, mask=rm)
        if TOL:
            qms = tl.load(_hist(RH, pslot, 0, M, m, B1) + rows, mask=rm, other=0.0)
            qlz = tl.load(_hist(RH, pslot, 1, M, m, B1) + rows, mask=rm, other=0.0)
            d = tl.abs(tl.exp((la - (qms + qlz)) + (rms + rlz)) - tl.exp(la))
            tl.store(PART + m * tl.num_programs(1) + tile, tl.sum(tl.where(rm, d, 0.0), 0))


@triton.jit
def _sk_col_kernel(
    C, LA, LB, SCAL, RH, LH, G, ITERS,
    M, B1, B2, k, n_slots,
    TOL: tl.constexpr, OUT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Column update k for a tile of columns: Lᵏ = LSE_i(φᵏ_i − Ce_ij) into slot
    (k−1) % n_slots (φᵏ = log a − Rᵏ). OUT: write g = ε(log b − Lᵏ)."""
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    go = True
    if TOL:
        go = tl.load(ITERS) >= k
    if go:
        cm = cols < B2
        eps = tl.load(SCAL)
        lb = tl.load(LB + m * B2 + cols, mask=cm, other=0.0)
        slot = (k - 1) % n_slots
        mx = tl.full([BLOCK_C], NEG_INF, lb.dtype)
        s = tl.zeros_like(lb)
        for r0 in range(0, B1, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rm = rows < B1
            msk = rm[:, None] & cm[None, :]
            la = tl.load(LA + m * B1 + rows, mask=rm, other=0.0)
            rms = tl.load(_hist(RH, slot, 0, M, m, B1) + rows, mask=rm, other=0.0)
            rlz = tl.load(_hist(RH, slot, 1, M, m, B1) + rows, mask=rm, other=0.0)
            c = tl.load(C + m * B1 * B2 + rows[:, None].to(tl.int64) * B2 + cols[None, :],
                        mask=msk, other=0.0)
            x = tl.where(msk, (la - (rms + rlz))[:, None] - _div(c, eps), NEG_INF)
            mx, s = _online(mx, s, x, 0)
        lms = _safe(mx)
        llz = tl.log(s)
        tl.store(_hist(LH, slot, 0, M, m, B2) + cols, lms, mask=cm)
        tl.store(_hist(LH, slot, 1, M, m, B2) + cols, llz, mask=cm)
        if OUT:
            tl.store(G + m * B2 + cols, (lb - (lms + llz)) * eps, mask=cm)


@triton.jit
def _sk_check_kernel(PART, SCAL, ITERS, M, T, k_first, count,
                     BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """One program: for k = k_first .. k_first + count − 1, the error of iteration k is
    max_m Σ_t PART[k − k_first, m, t]; ITERS = the first k below tol, if before ITERS."""
    tol = tl.load(SCAL + 1)
    it = tl.load(ITERS)
    ts = tl.arange(0, BLOCK_T)
    for s in range(0, count):
        worst = tl.zeros([BLOCK_M], dtype=PART.dtype.element_ty)
        for m0 in range(0, M, BLOCK_M):
            ms = m0 + tl.arange(0, BLOCK_M)
            msk = (ms < M)[:, None] & (ts < T)[None, :]
            p = tl.load(PART + (s * M + ms[:, None].to(tl.int64)) * T + ts[None, :], mask=msk,
                        other=0.0)
            e = tl.sum(p, 1)
            worst = tl.maximum(worst, tl.where(e != e, float("inf"), e))
        k = k_first + s
        it = tl.where((tl.max(worst, 0) < tol) & (k < it), k, it)
    tl.store(ITERS, it)


@triton.jit
def _sk_final_kernel(LA, LB, SCAL, RH, LH, F, G, ITERS, M, B1, B2, n_slots,
                     BLOCK: tl.constexpr):
    """f = ε(log a − Rᵏ), g = ε(log b − Lᵏ) at k = ITERS (after a `tol` solve)."""
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    eps = tl.load(SCAL)
    slot = (tl.load(ITERS) - 1) % n_slots
    rm = offs < B1
    la = tl.load(LA + m * B1 + offs, mask=rm, other=0.0)
    rms = tl.load(_hist(RH, slot, 0, M, m, B1) + offs, mask=rm, other=0.0)
    rlz = tl.load(_hist(RH, slot, 1, M, m, B1) + offs, mask=rm, other=0.0)
    tl.store(F + m * B1 + offs, (la - (rms + rlz)) * eps, mask=rm)
    cm = offs < B2
    lb = tl.load(LB + m * B2 + offs, mask=cm, other=0.0)
    lms = tl.load(_hist(LH, slot, 0, M, m, B2) + offs, mask=cm, other=0.0)
    llz = tl.load(_hist(LH, slot, 1, M, m, B2) + offs, mask=cm, other=0.0)
    tl.store(G + m * B2 + offs, (lb - (lms + llz)) * eps, mask=cm)


@triton.jit
def _sk_bwd_col_kernel(
    C, LA, SCAL, RH, LH, ITERS, FB, GB, CB, LAB,
    M, B1, B2, k, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Reverse of the column update k over a tile of rows: C̄ += β ⊙ ḡ (these rows),
    f̄ = f̄_in − Σ_j β_ij ḡ_j with f̄_in the upstream f̄ at the top iteration (ITERS) and 0
    below it; log ā += ε f̄ (the row update's term, taken here where f̄ is final)."""
    m = tl.program_id(0).to(tl.int64)
    it = tl.load(ITERS)
    if k <= it:
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = rows < B1
        eps = tl.load(SCAL)
        la = tl.load(LA + m * B1 + rows, mask=rm, other=0.0)
        rms = tl.load(_hist(RH, k - 1, 0, M, m, B1) + rows, mask=rm, other=0.0)
        rlz = tl.load(_hist(RH, k - 1, 1, M, m, B1) + rows, mask=rm, other=0.0)
        phi = la - (rms + rlz)
        f_up = tl.load(FB + m * B1 + rows, mask=rm, other=0.0)
        f_in = tl.where(k == it, f_up, tl.zeros_like(f_up))
        acc = tl.zeros_like(la)
        for c0 in range(0, B2, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            cm = cols < B2
            msk = rm[:, None] & cm[None, :]
            lms = tl.load(_hist(LH, k - 1, 0, M, m, B2) + cols, mask=cm, other=0.0)
            llz = tl.load(_hist(LH, k - 1, 1, M, m, B2) + cols, mask=cm, other=0.0)
            gb = tl.load(GB + m * B2 + cols, mask=cm, other=0.0)
            offs = m * B1 * B2 + rows[:, None].to(tl.int64) * B2 + cols[None, :]
            ce = _div(tl.load(C + offs, mask=msk, other=0.0), eps)
            beta = tl.exp(((phi[:, None] - ce) - lms[None, :]) - llz[None, :])
            w = tl.where(msk, beta, 0.0) * gb[None, :]
            tl.store(CB + offs, tl.load(CB + offs, mask=msk, other=0.0) + w, mask=msk)
            acc += tl.sum(w, 1)
        fb = f_in - acc
        tl.store(FB + m * B1 + rows, fb, mask=rm)
        lab = tl.load(LAB + m * B1 + rows, mask=rm, other=0.0)
        tl.store(LAB + m * B1 + rows, lab + eps * fb, mask=rm)


@triton.jit
def _sk_bwd_row_kernel(
    C, LB, SCAL, RH, LH, ITERS, FB, GB, CB, LBB,
    M, B1, B2, k, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Reverse of the row update k over a tile of columns: C̄ += α ⊙ f̄ (these columns),
    log b̄ += ε ḡ (the column update's term), then ḡ = −Σ_i α_ij f̄_i."""
    m = tl.program_id(0).to(tl.int64)
    if k <= tl.load(ITERS):
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = cols < B2
        eps = tl.load(SCAL)
        lb = tl.load(LB + m * B2 + cols, mask=cm, other=0.0)
        pslot = tl.maximum(k - 2, 0)
        pms = tl.load(_hist(LH, pslot, 0, M, m, B2) + cols, mask=cm, other=0.0)
        plz = tl.load(_hist(LH, pslot, 1, M, m, B2) + cols, mask=cm, other=0.0)
        psi = tl.where(k > 1, lb - (pms + plz), tl.zeros_like(lb))
        acc = tl.zeros_like(lb)
        for r0 in range(0, B1, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            rm = rows < B1
            msk = rm[:, None] & cm[None, :]
            rms = tl.load(_hist(RH, k - 1, 0, M, m, B1) + rows, mask=rm, other=0.0)
            rlz = tl.load(_hist(RH, k - 1, 1, M, m, B1) + rows, mask=rm, other=0.0)
            fb = tl.load(FB + m * B1 + rows, mask=rm, other=0.0)
            offs = m * B1 * B2 + rows[:, None].to(tl.int64) * B2 + cols[None, :]
            ce = _div(tl.load(C + offs, mask=msk, other=0.0), eps)
            alpha = tl.exp(((psi[None, :] - ce) - rms[:, None]) - rlz[:, None])
            w = tl.where(msk, alpha, 0.0) * fb[:, None]
            tl.store(CB + offs, tl.load(CB + offs, mask=msk, other=0.0) + w, mask=msk)
            acc += tl.sum(w, 0)
        gb = tl.load(GB + m * B2 + cols, mask=cm, other=0.0)
        lbb = tl.load(LBB + m * B2 + cols, mask=cm, other=0.0)
        tl.store(LBB + m * B2 + cols, lbb + eps * gb, mask=cm)
        tl.store(GB + m * B2 + cols, -acc, mask=cm)


# ----------------------------------------------------------------------------- launchers


def fused_blocks(b1: int, b2: int, itemsize: int, on_cpu: bool) -> tuple[int, int, int] | None:
    """(BLOCK_1, BLOCK_2, num_warps) of the fused path, or None when the problem is too
    large for one register tile (the tiled path then runs)."""
    p1, p2 = triton.next_power_of_2(b1), triton.next_power_of_2(b2)
    if p1 * p2 > (CPU_FUSED_TILE if on_cpu else GPU_FUSED_TILE[itemsize]):
        return None
    return p1, p2, max(1, min(16, p1 * p2 // (32 * GPU_PER_THREAD[itemsize])))


def _tiles(itemsize: int, on_cpu: bool) -> tuple[int, int]:
    """(owned, streamed) tile sides of the tiled path."""
    return CPU_TILE if on_cpu else GPU_TILE[itemsize]


def _scalars(epsilon: float, tol, dtype, device):
    """[ε, tol] in the compute dtype on the device (fills: no host-to-device copy)."""
    scal = torch.full((2,), float(epsilon), dtype=dtype, device=device)
    if tol is not None:
        scal[1:].fill_(float(tol))
    return scal


def sinkhorn_fwd_triton(cost, log_a, log_b, epsilon: float, n_iters: int, tol,
                        history: bool):
    """(f [M, B1], g [M, B2], R [K, 2, M, B1], L [K, 2, M, B2], iters int32 [1]).

    cost [M, B1, B2], log_a [M, B1], log_b [M, B2] in one float dtype. R, L are the
    per-iteration log-sum-exps as (shift, log-sum) pairs (slot k − 1 for iteration k;
    K = n_iters when `history`, else 0: nothing kept); `iters` holds the number of
    iterations run (device-side).
    """
    m, b1, b2 = cost.shape
    dev, dt = cost.device, cost.dtype
    cost, log_a, log_b = cost.contiguous(), log_a.contiguous(), log_b.contiguous()
    f = torch.empty(m, b1, dtype=dt, device=dev)
    g = torch.empty(m, b2, dtype=dt, device=dev)
    iters = torch.full((1,), n_iters, dtype=torch.int32, device=dev)
    use_tol = tol is not None
    on_cpu = dev.type == "cpu"
    fused = fused_blocks(b1, b2, cost.element_size(), on_cpu)
    seg = min(n_iters, SEGMENT) if use_tol else n_iters
    if history:
        slots = n_iters
    elif use_tol:
        slots = seg if fused else 2
    else:
        slots = 0 if fused else 2
    # one slot at least: a fused launch from k0 = 1 reads its (unused) ψ⁰ slot
    rh = torch.empty(max(slots, 1), 2, m, b1, dtype=dt, device=dev)
    lh = torch.empty(max(slots, 1), 2, m, b2, dtype=dt, device=dev)
    if m == 0:
        k = n_iters if history else 0
        return f, g, rh[:k], lh[:k], iters
    scal = _scalars(epsilon, tol, dt, dev)
    n_slots = max(slots, 1)
    if fused is not None:
        bl1, bl2, warps = fused
        part = torch.empty(seg, m, dtype=dt, device=dev) if use_tol else f
        for k0 in range(1, n_iters + 1, seg):
            k1 = min(n_iters + 1, k0 + seg)
            _sk_fused_fwd_kernel[(m,)](
                cost, log_a, log_b, scal, rh, lh, f, g, part, iters, m, b1, b2, k0, k1,
                n_slots, TOL=use_tol, HIST=slots > 0, OUT=not use_tol, BLOCK_1=bl1,
                BLOCK_2=bl2, num_warps=warps)
            if use_tol:
                _check(part, scal, iters, m, 1, k0, k1 - k0)
    else:
        own, stream = _tiles(cost.element_size(), on_cpu)
        t1, t2 = triton.cdiv(b1, own), triton.cdiv(b2, own)
        part = torch.empty(m, t1, dtype=dt, device=dev) if use_tol else f
        for k in range(1, n_iters + 1):
            last = k == n_iters and not use_tol
            _sk_row_kernel[(m, t1)](
                cost, log_a, log_b, scal, rh, lh, f, part, iters, m, b1, b2, k, n_slots,
                TOL=use_tol, OUT=last, BLOCK_R=own, BLOCK_C=stream, num_warps=4)
            if use_tol and k > 1:
                _check(part, scal, iters, m, t1, k - 1, 1)
            _sk_col_kernel[(m, t2)](
                cost, log_a, log_b, scal, rh, lh, g, iters, m, b1, b2, k, n_slots,
                TOL=use_tol, OUT=last, BLOCK_R=stream, BLOCK_C=own, num_warps=4)
    if use_tol:
        block = min(1024, triton.next_power_of_2(max(b1, b2)))
        _sk_final_kernel[(m, triton.cdiv(max(b1, b2), block))](
            log_a, log_b, scal, rh, lh, f, g, iters, m, b1, b2, n_slots, BLOCK=block,
            num_warps=4)
    if not history:
        rh, lh = rh[:0], lh[:0]
    return f, g, rh, lh, iters


def _check(part, scal, iters, m: int, t: int, k_first: int, count: int) -> None:
    block_t = triton.next_power_of_2(t)
    block_m = max(1, min(triton.next_power_of_2(m), 4096 // block_t))
    _sk_check_kernel[(1,)](part, scal, iters, m, t, k_first, count, BLOCK_M=block_m,
                           BLOCK_T=block_t, num_warps=4)


def sinkhorn_bwd_triton(cost, log_a, log_b, rh, lh, iters, grad_f, grad_g, epsilon: float):
    """(C̄ [M, B1, B2], log ā [M, B1], log b̄ [M, B2]): the exact reverse pass of the
    iterations the forward ran (`iters`), from its kept log-sum-exps R, L."""
    m, b1, b2 = cost.shape
    dev, dt = cost.device, cost.dtype
    cost, log_a, log_b = cost.contiguous(), log_a.contiguous(), log_b.contiguous()
    c_bar = torch.zeros(m, b1, b2, dtype=dt, device=dev)
    la_bar = torch.zeros(m, b1, dtype=dt, device=dev)
    lb_bar = torch.zeros(m, b2, dtype=dt, device=dev)
    if m == 0:
        return c_bar, la_bar, lb_bar
    scal = _scalars(epsilon, None, dt, dev)
    on_cpu = dev.type == "cpu"
    fused = fused_blocks(b1, b2, cost.element_size(), on_cpu)
    if fused is not None:
        bl1, bl2, warps = fused
        gf = grad_f.to(dt).contiguous() if grad_f is not None else la_bar
        gg = grad_g.to(dt).contiguous() if grad_g is not None else lb_bar
        _sk_fused_bwd_kernel[(m,)](
            cost, log_a, log_b, scal, rh, lh, iters, gf, gg, c_bar, la_bar, lb_bar, m, b1, b2,
            HAS_GF=grad_f is not None, HAS_GG=grad_g is not None, BLOCK_1=bl1, BLOCK_2=bl2,
            num_warps=warps)
        return c_bar, la_bar, lb_bar
    own, stream = _tiles(cost.element_size(), on_cpu)
    t1, t2 = triton.cdiv(b1, own), triton.cdiv(b2, own)
    fb = grad_f.to(dt, copy=True).contiguous() if grad_f is not None else torch.zeros_like(la_bar)
    gb = grad_g.to(dt, copy=True).contiguous() if grad_g is not None else torch.zeros_like(lb_bar)
    for k in range(rh.shape[0], 0, -1):  # launches above `iters` return at once
        _sk_bwd_col_kernel[(m, t1)](
            cost, log_a, scal, rh, lh, iters, fb, gb, c_bar, la_bar, m, b1, b2, k,
            BLOCK_R=own, BLOCK_C=stream, num_warps=4)
        _sk_bwd_row_kernel[(m, t2)](
            cost, log_b, scal, rh, lh, iters, fb, gb, c_bar, lb_bar, m, b1, b2, k,
            BLOCK_R=stream, BLOCK_C=own, num_warps=4)
    return c_bar, la_bar, lb_bar


# --------------------------------------------------------------------- compile variants


def aot_variants():
    """Compile variants for tests/triton_aot_check.py (name, fn, signature, constexprs, warps):
    every kernel in float32 and float64, the fused ones at their largest GPU tiles (square
    and non-square)."""
    for dt, size in (("fp32", 4), ("fp64", 8)):
        p = f"*{dt}"
        big = GPU_FUSED_TILE[size]
        shapes = ((64, big // 64), (16, big // 16), (big // 32, 32))
        sig = {"C": p, "LA": p, "LB": p, "SCAL": p, "RH": p, "LH": p, "F": p, "G": p,
               "PART": p, "ITERS": "*i32", "M": "i32", "B1": "i32", "B2": "i32", "k0": "i32",
               "k1": "i32", "n_slots": "i32"}
        flags = ((False, False, True), (False, True, True), (True, True, False))
        for (tol, hist, out), (b1, b2) in zip(flags, shapes):
            warps = fused_blocks(b1, b2, size, False)[2]
            yield (f"sinkhorn fused_fwd {dt} tol={tol} hist={hist} {b1}x{b2}",
                   _sk_fused_fwd_kernel, sig,
                   dict(TOL=tol, HIST=hist, OUT=out, BLOCK_1=b1, BLOCK_2=b2), warps)
        sig = {"C": p, "LA": p, "LB": p, "SCAL": p, "RH": p, "LH": p, "ITERS": "*i32",
               "GF": p, "GG": p, "CB": p, "LAB": p, "LBB": p, "M": "i32", "B1": "i32",
               "B2": "i32"}
        for (gf, gg), (b1, b2) in zip(((True, True), (False, True)), shapes):
            warps = fused_blocks(b1, b2, size, False)[2]
            yield (f"sinkhorn fused_bwd {dt} gf={gf} gg={gg} {b1}x{b2}", _sk_fused_bwd_kernel,
                   sig, dict(HAS_GF=gf, HAS_GG=gg, BLOCK_1=b1, BLOCK_2=b2), warps)
        own, stream = GPU_TILE[size]
        sig = {"C": p, "LA": p, "LB": p, "SCAL": p, "RH": p, "LH": p, "F": p, "PART": p,
               "ITERS": "*i32", "M": "i32", "B1": "i32", "B2": "i32", "k": "i32",
               "n_slots": "i32"}
        for tol, out in ((True, False), (False, True)):
            yield (f"sinkhorn row {dt} tol={tol}", _sk_row_kernel, sig,
                   dict(TOL=tol, OUT=out, BLOCK_R=own, BLOCK_C=stream), 4)
        sig = {"C": p, "LA": p, "LB": p, "SCAL": p, "RH": p, "LH": p, "G": p,
               "ITERS": "*i32", "M": "i32", "B1": "i32", "B2": "i32", "k": "i32",
               "n_slots": "i32"}
        for tol, out in ((True, False), (False, True)):
            yield (f"sinkhorn col {dt} tol={tol}", _sk_col_kernel, sig,
                   dict(TOL=tol, OUT=out, BLOCK_R=stream, BLOCK_C=own), 4)
        sig = {"PART": p, "SCAL": p, "ITERS": "*i32", "M": "i32", "T": "i32",
               "k_first": "i32", "count": "i32"}
        yield f"sinkhorn check {dt}", _sk_check_kernel, sig, dict(BLOCK_M=64, BLOCK_T=64), 4
        sig = {"LA": p, "LB": p, "SCAL": p, "RH": p, "LH": p, "F": p, "G": p,
               "ITERS": "*i32", "M": "i32", "B1": "i32", "B2": "i32", "n_slots": "i32"}
        yield f"sinkhorn final {dt}", _sk_final_kernel, sig, dict(BLOCK=1024), 4
        sig = {"C": p, "LA": p, "SCAL": p, "RH": p, "LH": p, "ITERS": "*i32", "FB": p,
               "GB": p, "CB": p, "LAB": p, "M": "i32", "B1": "i32", "B2": "i32", "k": "i32"}
        yield (f"sinkhorn bwd_col {dt}", _sk_bwd_col_kernel, sig,
               dict(BLOCK_R=own, BLOCK_C=stream), 4)
        sig = {"C": p, "LB": p, "SCAL": p, "RH": p, "LH": p, "ITERS": "*i32", "FB": p,
               "GB": p, "CB": p, "LBB": p, "M": "i32", "B1": "i32", "B2": "i32", "k": "i32"}
        yield (f"sinkhorn bwd_row {dt}", _sk_bwd_row_kernel, sig,
               dict(BLOCK_R=stream, BLOCK_C=own), 4)
