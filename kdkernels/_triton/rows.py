"""Row helpers of the Triton row losses: zeroing a gradient row, and the per-row gradient
rescale of their backward."""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import row_tile


@triton.jit
def store_zeros(ptr, start, stop, BLOCK: tl.constexpr):
    """ptr[start:stop] = 0 in ptr's element type (one program, BLOCK-wide stores): the
    gradient row of an ignored row, or the columns past the loss's own vocabulary."""
    lanes = tl.arange(0, BLOCK)
    for off in range(start, stop, BLOCK):
        cols = off + lanes
        tl.store(ptr + cols, tl.zeros([BLOCK], dtype=ptr.dtype.element_ty), mask=cols < stop)


@triton.jit
def _scale_rows_kernel(G, SCALE, stride_g, V, PER_ROW: tl.constexpr, BLOCK_V: tl.constexpr):
    """G[row, :] *= scale (per row or one scalar), skipped on the device when scale == 1."""
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        sc = tl.load(SCALE + row).to(tl.float32)
    else:
        sc = tl.load(SCALE).to(tl.float32)
    if sc != 1.0:
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        msk = cols < V
        ptr = G + row * stride_g + cols
        g = tl.load(ptr, mask=msk, other=0.0).to(tl.float32)
        tl.store(ptr, (g * sc).to(G.dtype.element_ty), mask=msk)


def scale_rows_triton(grad, scale) -> None:
    """grad[N, V] *= scale ([N] or 0-dim float32), in place; rows with unit column stride."""
    n, v = grad.shape
    if n == 0 or v == 0:
        return
    block, warps = row_tile(v, grad.device.type == "cpu")
    grid = (n, triton.cdiv(v, block))
    _scale_rows_kernel[grid](grad, scale, grad.stride(0), v, PER_ROW=scale.dim() > 0,
                             BLOCK_V=block, num_warps=warps)
