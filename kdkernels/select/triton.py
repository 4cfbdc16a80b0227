"""The `triton` backend of `topk_select`: one program per row, a streamed bitonic top-k.

Order (reference.py): values descending, equal values by increasing index, NaN above every
number, -0.0 tied with +0.0. Values are gathered from x by the selected index, so they are
bit-exact copies (NaN payloads and signs of zero included).

The sorting network is written here (compare-exchange stages as reshapes and size-2
max/min reductions) rather than taken from tl.sort: one network takes a per-row direction,
it is the same on every Triton version, and the interpreter runs it ~20x faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton.tiles import row_tile

MAX_K = 256
# Columns per tile (at least K_PAD): per program on a GPU, and under the interpreter.
GPU_TILE = 2048
CPU_TILE = 2048

_NO_KEY = tl.constexpr(-(2**63))  # below every real key: masked lanes, empty slots


def unsupported_reason(dtype: torch.dtype, k: int) -> str | None:
    """None when the Triton kernel takes this input, else why not (and what to do)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (
            f"the triton top-k kernel takes float32, float16 or bfloat16, got {dtype}; "
            "use backend='torch' (exact, any dtype) or cast the input"
        )
    if k > MAX_K:
        return f"the triton top-k kernel supports k <= {MAX_K}, got k={k}; use backend='torch'"
    return None


@triton.jit
def _order_keys(x_row, cols, V):
    """The int64 keys of x_row[cols] (see the kernel); _NO_KEY where cols >= V."""
    inb = cols < V
    f = tl.load(x_row + cols, mask=inb, other=0.0).to(tl.float32)
    bits = tl.where(f == 0.0, 0, f.to(tl.int32, bitcast=True))  # -0.0 -> +0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    mono = tl.where(f != f, 0x7FFFFFFF, mono)  # every NaN: the largest
    key = (mono.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))
    return tl.where(inb, key, _NO_KEY)


@triton.jit
def _compare_exchange(t, desc, B: tl.constexpr, D: tl.constexpr):
    """One bitonic stage on every row of t [R, K]: entries j and j + D of each block of 2D
    are put in order, descending inside the blocks of B (a multiple of 2D) whose index
    is odd xor desc [R, 1] (the row's direction), ascending inside the others."""
    g = tl.arange(0, t.shape[1] // (2 * D))[None, :, None, None]
    down = ((g // (B // (2 * D))) % 2 == 1) != desc[:, :, None, None]
    first = (tl.arange(0, 2) == 0)[None, None, :, None]
    y = tl.reshape(t, (t.shape[0], t.shape[1] // (2 * D), 2, D))
    hi = tl.max(y, axis=2)[:, :, None, :]
    lo = tl.min(y, axis=2)[:, :, None, :]
    return tl.reshape(tl.where(first == down, hi, lo), (t.shape[0], t.shape[1]))


@triton.jit
def _bitonic_sort(t, desc, LOG_K: tl.constexpr):
    """Sort every row of t [R, 2^LOG_K]: descending where desc [R, 1], else ascending."""
    for i in tl.static_range(1, LOG_K + 1):
        for s in tl.static_range(i):
            t = _compare_exchange(t, desc, 1 << i, 1 << (i - 1 - s))
    return t


@triton.jit
def _bitonic_merge(t, desc, LOG_K: tl.constexpr):
    """Sort every row of t [R, 2^LOG_K] that is a bitonic sequence (descending where
    desc [R, 1], else ascending): the last stage of _bitonic_sort."""
    for s in tl.static_range(LOG_K):
        t = _compare_exchange(t, desc, 1 << LOG_K, 1 << (LOG_K - 1 - s))
    return t


# Every entry j of a row gets one int64 key: its value as float32 (exact for every input
# dtype) made monotone in the high 32 bits (the IEEE pattern with the magnitude bits of
# negatives reversed, NaN raised to the largest pattern, -0.0 folded into +0.0 first),
# 2^32 - 1 - j in the low 32 bits. Key order is the required order (higher value first,
# then lower index), and keys are unique, so "the k largest keys" is well defined and no
# comparison ever ties. Masked lanes hold _NO_KEY, below every real key (the smallest
# pattern, -inf's, is above -2^31), and k <= V leaves them out of the first k.
#
# `best` [1, K_PAD] holds the K_PAD largest keys seen so far, descending; its first k are
# exact (an entry at or below the k-th best key already has k keys above it, so it is
# dropped from a tile before the merge, and a tile left empty is skipped). A tile of
# ROWS x K_PAD keys is reduced by a tournament: rows sorted alternately ascending and
# descending pair into bitonic sequences, whose elementwise max holds the K_PAD largest
# keys of the pair (the half-cleaner), sorted again by a bitonic merge, until one
# ascending row remains; its elementwise max with the descending `best`, merged, is the
# new `best`. The index is the complement of the low 32 bits.
@triton.jit
def _topk_select_kernel(X, VALUES, INDICES, stride_x, V, k,
                        K_PAD: tl.constexpr, LOG_K: tl.constexpr, ROWS: tl.constexpr,
                        LOG_ROWS: tl.constexpr):
    """VALUES[row, :k], INDICES[row, :k] = the k first entries of X[row, :V] in key order."""
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    slot = tl.arange(0, K_PAD)[None, :]
    lane = tl.arange(0, ROWS)[:, None] * K_PAD + slot
    odd = (tl.arange(0, ROWS) % 2 == 1)[:, None]  # the tile rows sorted descending
    best = tl.full((1, K_PAD), _NO_KEY, tl.int64)
    for start in range(0, V, ROWS * K_PAD):
        thr = tl.max(tl.max(tl.where(slot == k - 1, best, _NO_KEY), axis=1), axis=0)
        key = _order_keys(x_row, start + lane, V)
        key = tl.where(key > thr, key, _NO_KEY)
        if tl.max(tl.max(key, axis=1), axis=0) > thr:
            t = _bitonic_sort(key, odd, LOG_K)
            for lvl in tl.static_range(LOG_ROWS):
                t = tl.max(tl.reshape(t, (ROWS >> (lvl + 1), 2, K_PAD)), axis=1)
                t = _bitonic_merge(t, (tl.arange(0, ROWS >> (lvl + 1)) % 2 == 1)[:, None],
                                   LOG_K)
            best = _bitonic_merge(tl.maximum(best, t), tl.full((1, 1), 1, tl.int1), LOG_K)
    keep = slot < k
    idx = tl.where(keep, 0xFFFFFFFF - (best & 0xFFFFFFFF), 0)
    tl.store(INDICES + row * k + slot, idx, mask=keep)
    tl.store(VALUES + row * k + slot, tl.load(x_row + idx, mask=keep), mask=keep)


def launch_config(v: int, k: int, on_cpu: bool) -> dict:
    """The constexprs and num_warps of a launch on rows of v columns (tiles of at least
    GPU_TILE / CPU_TILE columns when v allows, and at least K_PAD)."""
    k_pad = max(2, triton.next_power_of_2(k))
    block, warps = row_tile(v, on_cpu, gpu_cap=GPU_TILE, cpu_cap=CPU_TILE)
    rows = max(block, k_pad) // k_pad
    return dict(K_PAD=k_pad, LOG_K=k_pad.bit_length() - 1, ROWS=rows,
                LOG_ROWS=rows.bit_length() - 1, num_warps=warps)


def topk_select_triton(x: torch.Tensor, k: int, values: torch.Tensor,
                       indices: torch.Tensor) -> None:
    """x: [N, V] (unit column stride) -> values [N, k] (x's dtype), indices [N, k] (int64),
    both contiguous and preallocated."""
    n, v = x.shape
    if n == 0:
        return
    _topk_select_kernel[(n,)](x, values, indices, x.stride(0), v, k,
                              **launch_config(v, k, x.device.type == "cpu"))
