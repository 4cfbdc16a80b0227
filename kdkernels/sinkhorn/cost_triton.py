"""The `triton` backend of `sinkhorn_loss` (docs/spec.md §4; the math: pytorch.py).

The pairwise cost between tempered softmaxes and its backward are Triton kernels; the
Sinkhorn solver between them is the `sinkhorn` dispatch table's (`solver_backend`: its
`triton` entry when the table has one that can run here, else `torch`; the call goes
through the table, so `recording()` shows which one ran), and the loss ⟨P, C⟩ with
C̄ = ∂L/∂C (unrolled: through the solver's backward; envelope: P) are assembled exactly
as in the torch path.

Rows x_i = softmax(s_i/τ) (student), y_j = softmax(t_j/τ) (teacher); M problems of B
rows each (rows m·B .. m·B + B − 1 of s and t, both [N, V], N = M·B). Arithmetic in
float32 (float64 for a float64 student); int64 row offsets. The probabilities are never
stored: every tile rebuilds them from the logits as exp((z/τ − μ) − log ζ), with the
row's maximum μ of z/τ and log ζ = log Σ_v exp(z_v/τ − μ) kept apart (no rounding of a
large log-sum-exp μ + log ζ into every probability).

  _skcost_stats_kernel   grid (N, 2): one program per row of s (axis 1 = 0) or t (= 1),
                         one online pass over V: μ, log ζ and, for s, the mode r_i
                         (argmax of the logits, lowest index on ties, as torch's).
  _skcost_pair_kernel    one program per (problem, i-tile, j-tile) of C, the j-tiles of
                         one i-tile adjacent in the launch order: loops over vocabulary
                         tiles, rebuilds x [BI, BV] and y [BJ, BV] and reduces a
                         [BI, BJ, BV] broadcast of c(x_iv, y_jv) over v in registers.
                         Both costs by direct differences, |x − y| and ½(x − y)², never
                         |x|² + |y|² − 2x·y (which cancels where student and teacher
                         rows agree, the regime training converges to); C in the
                         compute dtype.
  _skcost_mode_kernel    G_ir = Σ_j C̄_ij φ(x_ir, y_{j r_i}) at each student row's mode
                         (a gather of B teacher entries per row).
  _skcost_grad_kernel    one program per (problem, i-tile, vocabulary chunk): for each
                         vocabulary tile, G_iv = Σ_j C̄_ij φ(x_iv, y_jv) from a
                         [BI, BJ, BV] broadcast reduced over j (φ = sign(x − y), 0 at
                         ties, for l1; x − y for sqeuclidean), then D_iv = G_iv − G_ir
                         (exactly 0 at v = r_i) and the chunk's partial
                         δ_i = Σ_v x_iv D_iv (a [chunks, N] scratch: deterministic, no
                         atomics). D goes to a buffer (STORE) or, in the recompute pass
                         (PHASE 1), straight into the gradient as below.
  _skcost_finish_kernel  grid (N, V tiles): ∂L/∂s_iv = x_iv (D_iv − δ_i)/τ, δ_i the sum of
                         the partials (the mode-relative softmax Jacobian of pytorch.py:
                         δ has no large terms, the r term is exactly zero), written into
                         the student gradient in its dtype.

The buffer for D: the gradient itself when it is float32/float64 (the finish kernel
rewrites it in place); for a float16/bfloat16 gradient, which cannot hold D exactly, a
float32 [N, V] scratch when it fits SCRATCH_BYTES, else no buffer: the gradient kernel
runs a second time (PHASE 1) and recomputes D, writing each gradient entry once.

Traffic (logit reads, tiles of `pair_tiles`): the row statistics read s and t once; the
cost reads each student logit ⌈B/BJ⌉ times and each teacher logit ⌈B/BI⌉ times (8 each
at B = 256 in float32; the j-tiles of an i-tile run adjacently, so most re-reads hit
L2); the backward reads s once and t ⌈B/BI⌉ times (16 at B = 256) and writes D once;
the finish pass reads s and D and writes the gradient once (the recompute pass instead
reads s once and t ⌈B/BI⌉ times more). In all, s is read 3 + ⌈B/BJ⌉ times and t
1 + ⌈B/BI⌉ + ⌈B/BI'⌉ times, where the floor reads each logit once and writes the
gradient once; the re-reads are the price of never storing a [N, V] probability tensor
or a B × B × V slab. Arithmetic: about 3·B²·V operations for the cost (sub, abs or
square, add) and 4·B²·V for the backward, against the nominal 2·B²·V each: for B ≳ 32
the kernels are compute-bound, and the exps recomputed per tile add a 2/T fraction
(T = BI = BJ) of that.

Memory besides the inputs and the gradient: C and C̄ ([M, B, B] each) and the solver's
own state, the row statistics (5·N numbers), the [chunks, N] partials and, for 16-bit
gradients, at most SCRATCH_BYTES of float32 D.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._core.customop import custom_op
from .._core.rowgrad import refuse_double_backward
from .._core.validate import compute_dtype
from .._triton.math import online_step
from .._triton.tiles import row_tile
from .ops import SINKHORN
from .pytorch import plan_from_potentials

# a float32 D buffer for 16-bit gradients up to this size; larger: the recompute pass
SCRATCH_BYTES = 256 << 20
# programs the backward aims for on a GPU (its vocabulary chunks fill the machine)
GPU_TARGET_PROGRAMS = 1024

_CDT = {torch.float64: tl.float64, torch.float32: tl.float32}


# ------------------------------------------------------------------------------ kernels


@triton.jit
def _inv_temp(hi, lo, CDT: tl.constexpr):
    """1/τ in CDT from a float32 pair hi + lo (float64 runs keep ~48 bits of it)."""
    return tl.cast(hi, CDT) + tl.cast(lo, CDT)


@triton.jit
def _row_stats(Z_ROW, V, inv_temp, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    """(μ, log ζ, mode) of one row z: μ = max z/τ, log ζ = log Σ exp(z/τ − μ), mode =
    the lowest index of max z (0 when no entry compares greater than −inf, e.g. NaN)."""
    lanes = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    m = tl.full([], NEG_INF, CDT)
    zs = tl.zeros([], CDT)
    best = tl.full([], NEG_INF, CDT)
    mode = tl.zeros([], tl.int32)
    for off in range(0, V, BLOCK_V):
        cols = off + lanes
        raw = tl.load(Z_ROW + cols, mask=cols < V, other=NEG_INF).to(CDT)
        m, e, r = online_step(m, raw * inv_temp)
        zs = zs * r + tl.sum(e, 0)
        tmax = tl.max(raw, 0)
        tidx = tl.min(tl.where(raw == tmax, cols, V), 0)
        take = tmax > best  # strict: an earlier tile keeps a tie
        mode = tl.where(take, tidx, mode)
        best = tl.where(take, tmax, best)
    return m, tl.log(zs), mode


@triton.jit
def _skcost_stats_kernel(S, T, STATS, MODE, stride_s, stride_t, N, V, inv_temp_hi, inv_temp_lo,
                      CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    """STATS [4, N]: (μ_s, log ζ_s, μ_t, log ζ_t); MODE [N] int32: the student's modes."""
    row = tl.program_id(0).to(tl.int64)
    inv_temp = _inv_temp(inv_temp_hi, inv_temp_lo, CDT)
    if tl.program_id(1) == 0:
        m, lz, mode = _row_stats(S + row * stride_s, V, inv_temp, CDT, BLOCK_V)
        tl.store(STATS + row, m)
        tl.store(STATS + N + row, lz)
        tl.store(MODE + row, mode)
    else:
        m, lz, _unused = _row_stats(T + row * stride_t, V, inv_temp, CDT, BLOCK_V)
        tl.store(STATS + 2 * N + row, m)
        tl.store(STATS + 3 * N + row, lz)


@triton.jit
def _probs(Z, rows, row_ok, mu, lz, cols, V, stride, inv_temp, CDT: tl.constexpr):
    """softmax(z/τ) at [rows, cols] as exp((z/τ − μ) − log ζ); 0 outside the rows / V
    (padding rows carry μ = log ζ = 0)."""
    ptr = Z + rows[:, None] * stride + cols[None, :]
    msk = row_ok[:, None] & (cols[None, :] < V)
    z = tl.load(ptr, mask=msk, other=float("-inf")).to(CDT)
    return tl.exp((z * inv_temp - mu[:, None]) - lz[:, None])


@triton.jit
def _phi(d, L1: tl.constexpr, CDT: tl.constexpr):
    """∂c/∂x at d = x − y: sign(d) (0 at ties) for l1, d for sqeuclidean."""
    if L1:
        return (d > 0).to(CDT) - (d < 0).to(CDT)
    else:
        return d


@triton.jit
def _side_stats(STATS, N, rows, ok, OFF: tl.constexpr):
    mu = tl.load(STATS + OFF * N + rows, mask=ok, other=0.0)
    lz = tl.load(STATS + (OFF + 1) * N + rows, mask=ok, other=0.0)
    return mu, lz


@triton.jit
def _skcost_pair_kernel(S, T, STATS, C, stride_s, stride_t, N, B, V, inv_temp_hi, inv_temp_lo,
                 L1: tl.constexpr, CDT: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr,
                 BV: tl.constexpr):
    """C [M, B, B] (CDT): C_ij = Σ_v c(x_iv, y_jv)."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(B, BI)
    n_j = tl.cdiv(B, BJ)
    tj = pid % n_j
    ti = (pid // n_j) % n_i
    pm = (pid // (n_j * n_i)).to(tl.int64)
    ii = ti * BI + tl.arange(0, BI)
    jj = tj * BJ + tl.arange(0, BJ)
    i_ok = ii < B
    j_ok = jj < B
    rows_i = pm * B + ii
    rows_j = pm * B + jj
    inv_temp = _inv_temp(inv_temp_hi, inv_temp_lo, CDT)
    mu_s, lz_s = _side_stats(STATS, N, rows_i, i_ok, 0)
    mu_t, lz_t = _side_stats(STATS, N, rows_j, j_ok, 2)
    lanes = tl.arange(0, BV)
    acc = tl.zeros([BI, BJ], CDT)
    for v0 in range(0, V, BV):
        cols = v0 + lanes
        x = _probs(S, rows_i, i_ok, mu_s, lz_s, cols, V, stride_s, inv_temp, CDT)
        y = _probs(T, rows_j, j_ok, mu_t, lz_t, cols, V, stride_t, inv_temp, CDT)
        d = x[:, None, :] - y[None, :, :]
        if L1:
            acc += tl.sum(tl.abs(d), 2)
        else:
            acc += tl.sum(d * d, 2)
    if not L1:
        acc = acc * 0.5
    ptr = C + pm * B * B + ii[:, None] * B + jj[None, :]
    tl.store(ptr, acc, mask=i_ok[:, None] & j_ok[None, :])


@triton.jit
def _skcost_mode_kernel(S, T, STATS, MODE, CBAR, GMODE, stride_s, stride_t, N, B, V,
                      inv_temp_hi, inv_temp_lo, L1: tl.constexpr, CDT: tl.constexpr,
                      BI: tl.constexpr, BJ: tl.constexpr):
    """GMODE [N] (CDT): G_ir = Σ_j C̄_ij φ(x_ir, y_{j r_i}) at each student row's mode."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(B, BI)
    ti = pid % n_i
    pm = (pid // n_i).to(tl.int64)
    ii = ti * BI + tl.arange(0, BI)
    i_ok = ii < B
    rows_i = pm * B + ii
    inv_temp = _inv_temp(inv_temp_hi, inv_temp_lo, CDT)
    mu_s, lz_s = _side_stats(STATS, N, rows_i, i_ok, 0)
    mode = tl.load(MODE + rows_i, mask=i_ok, other=0).to(tl.int64)
    zr = tl.load(S + rows_i * stride_s + mode, mask=i_ok, other=float("-inf")).to(CDT)
    x_r = tl.exp((zr * inv_temp - mu_s) - lz_s)
    g = tl.zeros([BI], CDT)
    for j0 in range(0, B, BJ):
        jj = j0 + tl.arange(0, BJ)
        j_ok = jj < B
        rows_j = pm * B + jj
        mu_t, lz_t = _side_stats(STATS, N, rows_j, j_ok, 2)
        ok = i_ok[:, None] & j_ok[None, :]
        zt = tl.load(T + rows_j[None, :] * stride_t + mode[:, None], mask=ok,
                     other=float("-inf")).to(CDT)
        y_r = tl.exp((zt * inv_temp - mu_t[None, :]) - lz_t[None, :])
        cb = tl.load(CBAR + pm * B * B + ii[:, None] * B + jj[None, :], mask=ok,
                     other=0.0).to(CDT)
        g += tl.sum(cb * _phi(x_r[:, None] - y_r, L1, CDT), 1)
    tl.store(GMODE + rows_i, g, mask=i_ok)


@triton.jit
def _skcost_grad_kernel(S, T, STATS, MODE, CBAR, GMODE, DELTA, DBUF, GRAD,
                 stride_s, stride_t, stride_d, stride_g, N, B, V, CHUNK, NCHUNK,
                 inv_temp_hi, inv_temp_lo, L1: tl.constexpr, PHASE: tl.constexpr,
                 STORE: tl.constexpr, CDT: tl.constexpr, BI: tl.constexpr,
                 BJ: tl.constexpr, BV: tl.constexpr):
    """Per (problem, i-tile, vocabulary chunk of CHUNK columns), D_iv = G_iv − G_ir:
    PHASE 0: δ partials into DELTA [NCHUNK, N] (and D into DBUF when STORE);
    PHASE 1: ∂L/∂s_iv = x_iv (D_iv − δ_i)/τ into GRAD (δ summed from DELTA)."""
    pid = tl.program_id(0)
    n_i = tl.cdiv(B, BI)
    ch = pid % NCHUNK
    ti = (pid // NCHUNK) % n_i
    pm = (pid // (NCHUNK * n_i)).to(tl.int64)
    ii = ti * BI + tl.arange(0, BI)
    i_ok = ii < B
    rows_i = pm * B + ii
    inv_temp = _inv_temp(inv_temp_hi, inv_temp_lo, CDT)
    mu_s, lz_s = _side_stats(STATS, N, rows_i, i_ok, 0)
    mode = tl.load(MODE + rows_i, mask=i_ok, other=-1)
    g_r = tl.load(GMODE + rows_i, mask=i_ok, other=0.0)
    delta = tl.zeros([BI], CDT)
    if PHASE == 1:
        for k in range(0, NCHUNK):
            delta += tl.load(DELTA + k * N + rows_i, mask=i_ok, other=0.0)
    part = tl.zeros([BI], CDT)
    lanes = tl.arange(0, BV)
    lo = ch * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    for v0 in range(lo, hi, BV):
        cols = v0 + lanes
        x = _probs(S, rows_i, i_ok, mu_s, lz_s, cols, V, stride_s, inv_temp, CDT)
        g = tl.zeros([BI, BV], CDT)
        for j0 in range(0, B, BJ):
            jj = j0 + tl.arange(0, BJ)
            j_ok = jj < B
            rows_j = pm * B + jj
            mu_t, lz_t = _side_stats(STATS, N, rows_j, j_ok, 2)
            y = _probs(T, rows_j, j_ok, mu_t, lz_t, cols, V, stride_t, inv_temp, CDT)
            cb = tl.load(CBAR + pm * B * B + ii[:, None] * B + jj[None, :],
                         mask=i_ok[:, None] & j_ok[None, :], other=0.0).to(CDT)
            phi = _phi(x[:, None, :] - y[None, :, :], L1, CDT)
            g += tl.sum(cb[:, :, None] * phi, 1)
        # D = G − G_r, exactly 0 at the mode (its term of δ vanishes)
        d = tl.where(cols[None, :] == mode[:, None], 0.0, g - g_r[:, None])
        msk = i_ok[:, None] & (cols[None, :] < V)
        if PHASE == 0:
            part += tl.sum(tl.where(msk, x * d, 0.0), 1)
            if STORE:
                tl.store(DBUF + rows_i[:, None] * stride_d + cols[None, :],
                         d.to(DBUF.dtype.element_ty), mask=msk)
        else:
            out = x * (d - delta[:, None]) * inv_temp
            tl.store(GRAD + rows_i[:, None] * stride_g + cols[None, :],
                     out.to(GRAD.dtype.element_ty), mask=msk)
    if PHASE == 0:
        tl.store(DELTA + ch * N + rows_i, part, mask=i_ok)


@triton.jit
def _skcost_finish_kernel(S, STATS, DELTA, DBUF, GRAD, stride_s, stride_d, stride_g, N, V, NCHUNK,
                   inv_temp_hi, inv_temp_lo, CDT: tl.constexpr, BLOCK_V: tl.constexpr):
    """GRAD[row, cols] = x (D − δ)/τ; DBUF may be GRAD itself (read before written)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    msk = cols < V
    inv_temp = _inv_temp(inv_temp_hi, inv_temp_lo, CDT)
    delta = tl.zeros([], CDT)
    for k in range(0, NCHUNK):
        delta += tl.load(DELTA + k * N + row)
    mu = tl.load(STATS + row)
    lz = tl.load(STATS + N + row)
    z = tl.load(S + row * stride_s + cols, mask=msk, other=float("-inf")).to(CDT)
    x = tl.exp((z * inv_temp - mu) - lz)
    d = tl.load(DBUF + row * stride_d + cols, mask=msk, other=0.0).to(CDT)
    out = x * (d - delta) * inv_temp
    tl.store(GRAD + row * stride_g + cols, out.to(GRAD.dtype.element_ty), mask=msk)


# ----------------------------------------------------------------------------- launchers


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32 (Triton passes Python floats as float32)."""
    hi = torch.tensor(x, dtype=torch.float64).float().item()
    lo = torch.tensor(x - hi, dtype=torch.float64).float().item()
    return hi, lo


def pair_tiles(b: int, cdt: torch.dtype, on_cpu: bool, backward: bool = False
               ) -> tuple[int, int, int, int]:
    """(BI, BJ, BV, num_warps) of the [BI, BJ, BV] broadcasts of the cost (or backward).

    GPU: no spills on sm_80/sm_90 with Triton 3.6 and 3.9 (ptxas -v): float32 cost
    [32, 32, 8] at 8 warps (72-80 registers), backward [16, 16, 16] at 4 warps (~128;
    BI = 32 takes ~235 with Triton 3.6); float64 [16, 16, 8] at 4 warps for both.
    Chosen for registers and tile reuse, not yet benchmarked on a GPU. Interpreter: one
    tile covers a batch of up to 32 rows, and wide vocabulary tiles (numpy per program)."""
    if on_cpu:
        t = min(32, triton.next_power_of_2(b))
        return t, t, 64, 4
    if cdt == torch.float64:
        return 16, 16, 8, 4
    return (16, 16, 16, 4) if backward else (32, 32, 8, 8)


def chunking(n_row_tiles: int, v: int, bv: int, on_cpu: bool) -> tuple[int, int]:
    """(CHUNK, NCHUNK): vocabulary chunks of the backward, enough programs for a GPU."""
    tiles = triton.cdiv(v, bv)
    want = 1 if on_cpu else max(1, triton.cdiv(GPU_TARGET_PROGRAMS, max(1, n_row_tiles)))
    per = triton.cdiv(tiles, min(tiles, want))
    chunk = per * bv
    return chunk, triton.cdiv(v, chunk)


def _stats(s, t, inv_temp: float, cdt):
    n, v = s.shape
    stats = torch.empty(4, n, dtype=cdt, device=s.device)
    mode = torch.empty(n, dtype=torch.int32, device=s.device)
    block, warps = row_tile(v, s.device.type == "cpu")
    hi, lo = _split(inv_temp)
    _skcost_stats_kernel[(n, 2)](s, t, stats, mode, s.stride(0), t.stride(0), n, v, hi, lo,
                                 CDT=_CDT[cdt], BLOCK_V=block, num_warps=warps)
    return stats, mode


def cost_fwd(s, t, b: int, inv_temp: float, kind: str):
    """(C [M, B, B], stats [4, N], mode [N] int32) for logits s, t [N, V] (unit column
    stride), in the compute dtype of s."""
    n, v = s.shape
    m = n // b
    cdt = compute_dtype(s)
    stats, mode = _stats(s, t, inv_temp, cdt)
    cost = torch.empty(m, b, b, dtype=cdt, device=s.device)
    bi, bj, bv, warps = pair_tiles(b, cdt, s.device.type == "cpu")
    hi, lo = _split(inv_temp)
    grid = (m * triton.cdiv(b, bi) * triton.cdiv(b, bj),)
    _skcost_pair_kernel[grid](s, t, stats, cost, s.stride(0), t.stride(0), n, b, v, hi, lo,
                              L1=kind == "l1", CDT=_CDT[cdt], BI=bi, BJ=bj, BV=bv,
                              num_warps=warps)
    return cost, stats, mode


def cost_bwd(c_bar, s, t, stats, mode, inv_temp: float, kind: str):
    """∂L/∂s [N, V] in s's dtype from C̄ [M, B, B]."""
    n, v = s.shape
    m, b, _ = c_bar.shape
    cdt = compute_dtype(s)
    c_bar = c_bar.to(cdt).contiguous()
    on_cpu = s.device.type == "cpu"
    bi, bj, bv, warps = pair_tiles(b, cdt, on_cpu, backward=True)
    hi, lo = _split(inv_temp)
    l1 = kind == "l1"
    g_mode = torch.empty(n, dtype=cdt, device=s.device)
    n_it = triton.cdiv(b, bi)
    _skcost_mode_kernel[(m * n_it,)](s, t, stats, mode, c_bar, g_mode, s.stride(0),
                                     t.stride(0), n, b, v, hi, lo, L1=l1, CDT=_CDT[cdt],
                                     BI=bi, BJ=bj, num_warps=warps)
    grad = torch.empty_like(s)
    chunk, nchunk = chunking(m * n_it, v, bv, on_cpu)
    delta = torch.empty(nchunk, n, dtype=cdt, device=s.device)
    if grad.dtype in (torch.float32, torch.float64):
        dbuf = grad
    elif n * v * 4 <= SCRATCH_BYTES:
        dbuf = torch.empty(n, v, dtype=torch.float32, device=s.device)
    else:
        dbuf = None
    grid = (m * n_it * nchunk,)
    args = (s, t, stats, mode, c_bar, g_mode, delta, dbuf if dbuf is not None else grad, grad,
            s.stride(0), t.stride(0), dbuf.stride(0) if dbuf is not None else 0, grad.stride(0),
            n, b, v, chunk, nchunk, hi, lo)
    const = dict(L1=l1, CDT=_CDT[cdt], BI=bi, BJ=bj, BV=bv, num_warps=warps)
    _skcost_grad_kernel[grid](*args, PHASE=0, STORE=dbuf is not None, **const)
    if dbuf is None:
        _skcost_grad_kernel[grid](*args, PHASE=1, STORE=False, **const)
    else:
        block, fwarps = row_tile(v, on_cpu, gpu_cap=1024)
        _skcost_finish_kernel[(n, triton.cdiv(v, block))](
            s, stats, delta, dbuf, grad, s.stride(0), dbuf.stride(0), grad.stride(0), n, v,
            nchunk, hi, lo, CDT=_CDT[cdt], BLOCK_V=block, num_warps=fwarps)
    return grad


# --------------------------------------------------------------- custom ops and autograd


def _cost_fake(s, t, b, inv_temp, kind):
    n = s.shape[0]
    cdt = compute_dtype(s)
    return (s.new_empty(n // b, b, b, dtype=cdt), s.new_empty(4, n, dtype=cdt),
            s.new_empty(n, dtype=torch.int32))


@custom_op("sinkhorn_cost_triton_fwd", fake=_cost_fake)
def sinkhorn_cost_triton_fwd(s: Tensor, t: Tensor, b: int, inv_temp: float,
                             kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """(C [M, B, B], row statistics [4, N], student modes [N] int32) of logits s, t [N, V]."""
    return cost_fwd(s, t, b, inv_temp, kind)


@custom_op("sinkhorn_cost_triton_bwd", fake=lambda c_bar, s, *_: torch.empty_like(s))
def sinkhorn_cost_triton_bwd(c_bar: Tensor, s: Tensor, t: Tensor, stats: Tensor, mode: Tensor,
                             inv_temp: float, kind: str) -> Tensor:
    """∂L/∂s [N, V] (dtype of s) from C̄ [M, B, B] and the forward's statistics."""
    return cost_bwd(c_bar, s, t, stats, mode, inv_temp, kind)


class TritonCostFunction(torch.autograd.Function):
    """(s [N, V], t [N, V]) -> C [M, B, B]; gradient to s only (the teacher is constant)."""

    @staticmethod
    def forward(ctx, s, t, b: int, inv_temp: float, kind: str):
        cost, stats, mode = sinkhorn_cost_triton_fwd(s, t, b, inv_temp, kind)
        ctx.save_for_backward(s, t, stats, mode)
        ctx.args = (inv_temp, kind)
        return cost

    @staticmethod
    def backward(ctx, c_bar):
        refuse_double_backward("sinkhorn_loss")
        s, t, stats, mode = ctx.saved_tensors
        inv_temp, kind = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = sinkhorn_cost_triton_bwd(c_bar, s, t, stats, mode, inv_temp, kind)
        return grad, None, None, None, None


def solver_backend(device) -> str:
    """The `sinkhorn` backend this loss solves with: `triton` when the sinkhorn table has
    that entry and it can run on `device`, else `torch`."""
    if "triton" in SINKHORN.backends and SINKHORN.reason("triton", device, {}) is None:
        return "triton"
    return "torch"


def sinkhorn_loss_triton(s, t, bsz: int, inv_temp: float, cost: str, epsilon: float,
                         n_iters: int, grad: str, cdt):
    """Same contract as pytorch.sinkhorn_loss_torch: ⟨P, C⟩ averaged over the M = N/B
    batches of rows s, t [N, V] (unit column stride; t constant), float32."""
    m = s.shape[0] // bsz
    c = TritonCostFunction.apply(s, t, bsz, inv_temp, cost)  # [M, B, B] in cdt
    log_u = torch.full((m, bsz), -math.log(bsz), dtype=cdt, device=s.device)
    solver = solver_backend(s.device)
    if grad == "unrolled":
        f, g = SINKHORN(solver, c, log_u, log_u.clone(), epsilon, n_iters, None)
        plan = plan_from_potentials(f, g, c, epsilon)
    else:
        with torch.no_grad():
            cd = c.detach()
            f, g = SINKHORN(solver, cd, log_u, log_u.clone(), epsilon, n_iters, None)
            plan = plan_from_potentials(f, g, cd, epsilon)
    return (plan * c).sum(dim=(-2, -1)).mean().float()


# ------------------------------------------------------------------------ AOT variants


def aot_variants():
    """(name, jit function, signature, constexprs, num_warps) for tests/triton_aot_check.py:
    every kernel with both costs, bfloat16 logits with float32 compute and float64 logits
    with float64 compute; the backward's three ways (D stored, scratch-free PHASE 0 and
    the recompute PHASE 1)."""
    v_big = 151936
    for dt, cdt in (("bf16", torch.float32), ("fp32", torch.float32), ("fp64", torch.float64)):
        cd = "fp64" if cdt == torch.float64 else "fp32"
        const_cdt = _CDT[cdt]
        block, warps = row_tile(v_big, on_cpu=False)
        sig = {"S": f"*{dt}", "T": f"*{dt}", "STATS": f"*{cd}", "MODE": "*i32",
               "stride_s": "i64", "stride_t": "i64", "N": "i32", "V": "i32",
               "inv_temp_hi": "fp32", "inv_temp_lo": "fp32"}
        yield (f"sinkhorn row_stats {dt}", _skcost_stats_kernel, sig,
               dict(CDT=const_cdt, BLOCK_V=block), warps)
        if dt == "fp32":
            continue  # the pair kernels: bf16 (float32 compute) and fp64 cover both
        bi, bj, bv, pw = pair_tiles(256, cdt, on_cpu=False)
        gi, gj, gv, gw = pair_tiles(256, cdt, on_cpu=False, backward=True)
        for l1 in (True, False):
            name = "l1" if l1 else "sqeuclidean"
            sig = {"S": f"*{dt}", "T": f"*{dt}", "STATS": f"*{cd}", "C": f"*{cd}",
                   "stride_s": "i64", "stride_t": "i64", "N": "i32", "B": "i32", "V": "i32",
                   "inv_temp_hi": "fp32", "inv_temp_lo": "fp32"}
            yield (f"sinkhorn cost {name} {dt}", _skcost_pair_kernel, sig,
                   dict(L1=l1, CDT=const_cdt, BI=bi, BJ=bj, BV=bv), pw)
            sig = {"S": f"*{dt}", "T": f"*{dt}", "STATS": f"*{cd}", "MODE": "*i32",
                   "CBAR": f"*{cd}", "GMODE": f"*{cd}", "stride_s": "i64", "stride_t": "i64",
                   "N": "i32", "B": "i32", "V": "i32", "inv_temp_hi": "fp32",
                   "inv_temp_lo": "fp32"}
            yield (f"sinkhorn mode_grad {name} {dt}", _skcost_mode_kernel, sig,
                   dict(L1=l1, CDT=const_cdt, BI=gi, BJ=gj), gw)
            dbuf = "fp32" if dt == "bf16" else dt
            sig = {"S": f"*{dt}", "T": f"*{dt}", "STATS": f"*{cd}", "MODE": "*i32",
                   "CBAR": f"*{cd}", "GMODE": f"*{cd}", "DELTA": f"*{cd}", "DBUF": f"*{dbuf}",
                   "GRAD": f"*{dt}", "stride_s": "i64", "stride_t": "i64", "stride_d": "i64",
                   "stride_g": "i64", "N": "i32", "B": "i32", "V": "i32", "CHUNK": "i32",
                   "NCHUNK": "i32", "inv_temp_hi": "fp32", "inv_temp_lo": "fp32"}
            for phase, store in ((0, True), (0, False), (1, False)):
                if dt == "fp64" and (phase, store) != (0, True):
                    continue  # a float64 gradient always stores D
                yield (f"sinkhorn grad {name} {dt} phase={phase} store={store}",
                       _skcost_grad_kernel, sig,
                       dict(L1=l1, PHASE=phase, STORE=store, CDT=const_cdt, BI=gi, BJ=gj,
                            BV=gv), gw)
        block, warps = row_tile(v_big, on_cpu=False, gpu_cap=1024)
        sig = {"S": f"*{dt}", "STATS": f"*{cd}", "DELTA": f"*{cd}",
               "DBUF": f"*{'fp32' if dt == 'bf16' else dt}", "GRAD": f"*{dt}",
               "stride_s": "i64", "stride_d": "i64", "stride_g": "i64", "N": "i32", "V": "i32",
               "NCHUNK": "i32", "inv_temp_hi": "fp32", "inv_temp_lo": "fp32"}
        yield (f"sinkhorn finish {dt}", _skcost_finish_kernel, sig,
               dict(CDT=const_cdt, BLOCK_V=block), warps)
