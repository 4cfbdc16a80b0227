"""The `triton` backend of `sample_teacher`'s draws: one program per row, one pass over the
row plus the picked tiles.

Distribution: r = softmax(a), a = x·(1/τ_r). Split the row into T tiles of BLOCK_V
columns with tile masses w_j = Σ_{v∈j} e^{a_v − M} (M the row max). Drawing a tile with
probability w_j / W and then a class inside it with probability e^{a_v − M} / w_j draws
class v with probability e^{a_v − M} / W = r_v exactly, so:

  pass 1  stream the row once: per tile its max m_j and s_j = Σ e^{a − m_j} (float64
          sums) into a [N, T] scratch; the row max M and a NaN/+inf count.
  picks   per group of BLOCK_K draws, uniforms u1, u2 (53 random bits each, from the
          Philox counter (seed, row·k + draw): a draw depends on the seed alone): the
          tile of a draw is the first j of mass with C_j > u1·W, C_j = Σ_{i≤j} w_i, the
          tile masses read from the scratch BLOCK_T at a time (a [BLOCK_K, BLOCK_T]
          comparison), W summed by the same code so that C_T = W bit for bit.
  pass 2  the group's tiles re-read as one [BLOCK_K, BLOCK_V] block: per draw
          c = cumsum(e^{a − m_j}) along its tile, and the class is the first of mass
          with c > u2·c_last.
Zero-mass classes (−inf logits) and tiles are never taken (the mass test); a product that
rounds up to the total (probability ~2⁻⁵³) takes the last class / tile with mass.

Bytes per row: the row read once (pass 1) plus k tiles of BLOCK_V columns (pass 2: k·512
columns on a GPU, a quarter of a 131072-class row at k = 64), the T-entry scratch
written once and read 1 + k/BLOCK_K times, the k ids written. Arithmetic: a and every
sum in float64, the exponentials in float32 (2⁻²⁴ relative per class probability), so
the draws follow r to ~1e-7 relative per class.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton.math import nonfinite_count
from .._triton.tiles import MIN_BLOCK
from .pytorch import BAD, IGNORED

# columns per tile (pass 2 re-reads one per draw) and draws per group, per program on a
# GPU ([8, 512] float64 blocks) and under the interpreter; tiles per step of the pick
GPU_BLOCK_V, GPU_BLOCK_K, GPU_BLOCK_T = 512, 8, 128
CPU_BLOCK_V, CPU_BLOCK_K, CPU_BLOCK_T = 2048, 128, 128
_TWO_M53 = tl.constexpr(1.0 / 9007199254740992.0)
_NONE = tl.constexpr(2**30)  # above every tile and column index: "not found"
C_IGNORED = tl.constexpr(IGNORED)
C_BAD = tl.constexpr(BAD)


@triton.jit
def _uniform53(a, b):
    """A uniform float64 in [0, 1 − 2⁻⁵³] from two random 32-bit words."""
    hi = (a.to(tl.uint32, bitcast=True) >> 5).to(tl.int64)
    lo = (b.to(tl.uint32, bitcast=True) >> 6).to(tl.int64)
    return ((hi << 26) | lo).to(tl.float64) * _TWO_M53


@triton.jit
def _tile_masses(m_row, s_row, tj, n_tiles, m_all):
    """w_j = s_j e^{m_j − M} for the tiles tj (0 past the last and for a tile without mass,
    whose m_j is a placeholder)."""
    inb = tj < n_tiles
    s_j = tl.load(s_row + tj, mask=inb, other=0.0)
    e = tl.exp((tl.load(m_row + tj, mask=inb, other=0.0) - m_all).to(tl.float32))
    return tl.where(s_j > 0.0, s_j * e.to(tl.float64), 0.0)


@triton.jit
def _fill(o_row, lanes, K, code, BLOCK_K: tl.constexpr):
    for k0 in range(0, K, BLOCK_K):
        tl.store(o_row + k0 + lanes, tl.full([BLOCK_K], code, tl.int32), mask=k0 + lanes < K)


@triton.jit
def _sample_kernel(X, LABELS, OUT, TILE_M, TILE_S, stride_x, stride_l, stride_o, stride_t,
                   V, K, inv_temp_hi, inv_temp_lo, seed, ignore_index,
                   HAS_LABELS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    o_row = OUT + row * stride_o
    m_row = TILE_M + row * stride_t
    s_row = TILE_S + row * stride_t
    cols = tl.arange(0, BLOCK_V)
    lanes = tl.arange(0, BLOCK_K)
    tiles = tl.arange(0, BLOCK_T)
    n_tiles = tl.cdiv(V, BLOCK_V)
    inv_temp = tl.cast(inv_temp_hi, tl.float64) + tl.cast(inv_temp_lo, tl.float64)
    skip = False
    if HAS_LABELS:
        skip = tl.load(LABELS + row * stride_l) == ignore_index
    if skip:  # an ignored row is not read
        _fill(o_row, lanes, K, C_IGNORED, BLOCK_K)
    else:
        # pass 1: tile maxima and sums relative to them; the row max; NaN / +inf
        m_all = tl.full([], float("-inf"), tl.float64)
        n_bad = tl.zeros([], tl.int32)
        for j in range(0, n_tiles):
            c = j * BLOCK_V + cols
            a = tl.load(x_row + c, mask=c < V, other=float("-inf")).to(tl.float64) * inv_temp
            n_bad += nonfinite_count(a)
            m_j = tl.max(a, 0)
            m_js = tl.where(m_j == float("-inf"), 0.0, m_j)
            tl.store(m_row + j, m_js)
            tl.store(s_row + j, tl.sum(tl.exp((a - m_js).to(tl.float32)).to(tl.float64), 0))
            m_all = tl.maximum(m_all, m_j)
        if (n_bad > 0) | (m_all == float("-inf")):  # no distribution: the row is BAD
            _fill(o_row, lanes, K, C_BAD, BLOCK_K)
        else:
            # W: the running sum of the tile masses, as the picks below form it
            w_tot = tl.zeros([], tl.float64)
            for t0 in range(0, n_tiles, BLOCK_T):
                w_tot = tl.max(tl.cumsum(_tile_masses(m_row, s_row, t0 + tiles, n_tiles,
                                                      m_all), 0) + w_tot, 0)
            for k0 in range(0, K, BLOCK_K):
                live = k0 + lanes < K
                r1, r2, r3, r4 = tl.randint4x(seed, row * K + k0 + lanes)
                target = _uniform53(r1, r2) * w_tot
                u_in = _uniform53(r3, r4)
                pick = tl.full([BLOCK_K], _NONE, tl.int32)
                last = tl.zeros([], tl.int32)
                cum = tl.zeros([], tl.float64)
                for t0 in range(0, n_tiles, BLOCK_T):
                    tj = t0 + tiles
                    w = _tile_masses(m_row, s_row, tj, n_tiles, m_all)
                    cw = tl.cumsum(w, 0) + cum
                    hit = (cw[None, :] > target[:, None]) & (w[None, :] > 0.0)
                    pick = tl.minimum(pick, tl.min(tl.where(hit, tj[None, :], _NONE), 1))
                    last = tl.maximum(last, tl.max(tl.where(w > 0.0, tj, 0), 0))
                    cum = tl.max(cw, 0)
                pick = tl.where(pick == _NONE, last, pick)
                # pass 2: the group's tiles as one block; per draw the class in its tile
                c2 = pick[:, None] * BLOCK_V + cols[None, :]
                a2 = tl.load(x_row + c2, mask=(c2 < V) & live[:, None], other=float("-inf"))
                m2 = tl.load(m_row + pick, mask=live, other=0.0)
                e2 = tl.exp((a2.to(tl.float64) * inv_temp - m2[:, None]).to(tl.float32))
                e2 = e2.to(tl.float64)
                cs = tl.cumsum(e2, 1)
                hit2 = (cs > (u_in * tl.max(cs, 1))[:, None]) & (e2 > 0.0)
                pos = tl.min(tl.where(hit2, cols[None, :], _NONE), 1)
                pos = tl.where(pos == _NONE, tl.max(tl.where(e2 > 0.0, cols[None, :], 0), 1),
                               pos)
                tl.store(o_row + k0 + lanes, (pick * BLOCK_V + pos).to(tl.int32), mask=live)


def _split(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32 (Triton passes Python floats as float32)."""
    hi = torch.tensor(x, dtype=torch.float64).float().item()
    return hi, torch.tensor(x - hi, dtype=torch.float64).float().item()


def launch_config(v: int, k: int, on_cpu: bool) -> dict:
    """The constexprs and num_warps for rows of v classes and k draws."""
    cap_v, cap_k, cap_t = ((CPU_BLOCK_V, CPU_BLOCK_K, CPU_BLOCK_T) if on_cpu
                           else (GPU_BLOCK_V, GPU_BLOCK_K, GPU_BLOCK_T))
    block_v = max(MIN_BLOCK, min(triton.next_power_of_2(max(v, 1)), cap_v))
    n_tiles = triton.cdiv(max(v, 1), block_v)
    return dict(BLOCK_V=block_v,
                BLOCK_K=max(2, min(triton.next_power_of_2(max(k, 1)), cap_k)),
                BLOCK_T=max(2, min(triton.next_power_of_2(n_tiles), cap_t)),
                num_warps=4)


def draw_triton(x: torch.Tensor, k: int, inv_temp: float, labels, ignore_index: int,
                generator, out: torch.Tensor) -> None:
    """Same contract as pytorch.draw_torch. The Philox seed is one integer drawn from
    `generator` (or the default CPU generator), so a seeded generator reproduces the
    draws; they are not the torch backend's draws (a different random stream)."""
    n, v = x.shape
    if n == 0 or k == 0:
        return
    gen_dev = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=gen_dev))
    cfg = launch_config(v, k, x.device.type == "cpu")
    n_tiles = triton.cdiv(v, cfg["BLOCK_V"])
    tile_m = torch.empty(n, n_tiles, dtype=torch.float64, device=x.device)
    tile_s = torch.empty_like(tile_m)
    _sample_kernel[(n,)](
        x, labels if labels is not None else out, out, tile_m, tile_s,
        x.stride(0), labels.stride(0) if labels is not None else 0, out.stride(0),
        tile_m.stride(0), v, k, *_split(inv_temp), seed, ignore_index,
        HAS_LABELS=labels is not None, **cfg,
    )


def aot_variants():
    """(name, jit function, signature, constexprs, num_warps) for tests/triton_aot_check.py:
    bf16 and fp32 logits, with and without labels."""
    for dt, lab in (("bf16", True), ("fp32", False)):
        sig = {"X": f"*{dt}", "LABELS": "*i64", "OUT": "*i32", "TILE_M": "*fp64",
               "TILE_S": "*fp64", "stride_x": "i64", "stride_l": "i64", "stride_o": "i64",
               "stride_t": "i64", "V": "i32", "K": "i32", "inv_temp_hi": "fp32",
               "inv_temp_lo": "fp32", "seed": "i64", "ignore_index": "i32"}
        const = launch_config(151936, 64, on_cpu=False)
        warps = const.pop("num_warps")
        const["HAS_LABELS"] = lab
        yield f"sample_teacher {dt} labels={lab}", _sample_kernel, sig, const, warps
