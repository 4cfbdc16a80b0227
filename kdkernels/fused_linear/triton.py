"""Triton element-wise kernels of the fused linear KD loss: the logit softcap and its chain rule.

With u = scale·z/c (z the raw logit, folded into the GEMM's alpha), the capped logit is
S = c·tanh(u) and dS/dz = scale·sech²(u). Both are computed in float32 (tanh and
sech² from the shared Triton math, free of cancellation) and rounded once into the
buffer's dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton.math import sech2, tanh
from .._triton.tiles import elementwise_tile


@triton.jit
def _softcap_fwd_kernel(U, S, stride_u, stride_s, V, cap, BLOCK_V: tl.constexpr):
    """S[row, j] = cap·tanh(U[row, j])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    msk = cols < V
    u = tl.load(U + row * stride_u + cols, mask=msk, other=0.0).to(tl.float32)
    tl.store(S + row * stride_s + cols, (cap * tanh(u)).to(S.dtype.element_ty), mask=msk)


@triton.jit
def _softcap_bwd_kernel(G, U, RS, stride_g, stride_u, V, k,
                        HAS_CAP: tl.constexpr, HAS_RS: tl.constexpr, BLOCK_V: tl.constexpr):
    """G[row, j] *= (k·sech²(U[row, j]) if HAS_CAP) · (RS[row] if HAS_RS), in place."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    msk = cols < V
    ptr = G + row * stride_g + cols
    g = tl.load(ptr, mask=msk, other=0.0).to(tl.float32)
    if HAS_CAP:
        u = tl.load(U + row * stride_u + cols, mask=msk, other=0.0).to(tl.float32)
        g = g * (k * sech2(u))
    if HAS_RS:
        g = g * tl.load(RS + row).to(tl.float32)
    tl.store(ptr, g.to(G.dtype.element_ty), mask=msk)


def softcap_fwd_triton(u, out, cap: float) -> None:
    """out[M, V] = cap·tanh(u[M, V]); rows with unit column stride; out may be u."""
    m, v = u.shape
    if m == 0 or v == 0:
        return
    block = elementwise_tile(v, u.device.type == "cpu")
    _softcap_fwd_kernel[(m, triton.cdiv(v, block))](
        u, out, u.stride(0), out.stride(0), v, cap, BLOCK_V=block, num_warps=4
    )


def softcap_bwd_triton(g, u, k: float, row_scale) -> None:
    """g[M, V] *= k·sech²(u[M, V]) (when u is not None) · row_scale[M] (when not None)."""
    m, v = g.shape
    if m == 0 or v == 0 or (u is None and row_scale is None):
        return
    block = elementwise_tile(v, g.device.type == "cpu")
    _softcap_bwd_kernel[(m, triton.cdiv(v, block))](
        g, u if u is not None else g, row_scale if row_scale is not None else g,
        g.stride(0), u.stride(0) if u is not None else 0, v, k,
        HAS_CAP=u is not None, HAS_RS=row_scale is not None, BLOCK_V=block, num_warps=4,
    )
