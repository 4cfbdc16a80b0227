"""Triton element-wise kernels of the fused linear KD loss: the logit softcap and its chain rule.

With u = scale·z/c (z the raw logit, folded into the GEMM's alpha), the capped logit is
S = c·tanh(u) and dS/dz = scale·sech²(u). Both are computed in float32 and rounded once
into the buffer's dtype:
  tanh(u)  = sign(u)·(1 − e)/(1 + e),  e = exp(−2|u|)   for |u| >= 1/4,
             odd Taylor series to u⁹ below (1 − e would cancel; truncation < 2e-8 rel.);
  sech²(u) = 4e/(1 + e)²   (no 1 − tanh² cancellation when the cap saturates).
Only `tl.exp` and arithmetic are used, so the kernels run the same under the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    au = tl.abs(u)
    e = tl.exp(-2.0 * au)
    big = (1.0 - e) / (1.0 + e)
    u2 = u * u
    # tanh x = x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 − …
    small = au * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0
                                                                     + u2 * (62.0 / 2835.0)))))
    th = tl.where(au < 0.25, small, big)
    return tl.where(u < 0, -th, th)


@triton.jit
def _sech2(u):
    e = tl.exp(-2.0 * tl.abs(u))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _softcap_fwd_kernel(U, S, stride_u, stride_s, V, cap, BLOCK_V: tl.constexpr):
    """S[row, j] = cap·tanh(U[row, j])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    msk = cols < V
    u = tl.load(U + row * stride_u + cols, mask=msk, other=0.0).to(tl.float32)
    tl.store(S + row * stride_s + cols, (cap * _tanh(u)).to(S.dtype.element_ty), mask=msk)


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
        g = g * (k * _sech2(u))
    if HAS_RS:
        g = g * tl.load(RS + row).to(tl.float32)
    tl.store(ptr, g.to(G.dtype.element_ty), mask=msk)


def _block(v: int, on_cpu: bool) -> int:
    # The interpreter pays per program, so larger tiles on the CPU.
    return max(16, min(triton.next_power_of_2(max(v, 1)), 4096 if on_cpu else 1024))


def softcap_fwd_triton(u, out, cap: float) -> None:
    """out[M, V] = cap·tanh(u[M, V]); rows with unit column stride; out may be u."""
    m, v = u.shape
    if m == 0 or v == 0:
        return
    block = _block(v, u.device.type == "cpu")
    _softcap_fwd_kernel[(m, triton.cdiv(v, block))](
        u, out, u.stride(0), out.stride(0), v, cap, BLOCK_V=block, num_warps=4
    )


def softcap_bwd_triton(g, u, k: float, row_scale) -> None:
    """g[M, V] *= k·sech²(u[M, V]) (when u is not None) · row_scale[M] (when not None)."""
    m, v = g.shape
    if m == 0 or v == 0 or (u is None and row_scale is None):
        return
    block = _block(v, g.device.type == "cpu")
    _softcap_bwd_kernel[(m, triton.cdiv(v, block))](
        g, u if u is not None else g, row_scale if row_scale is not None else g,
        g.stride(0), u.stride(0) if u is not None else 0, v, k,
        HAS_CAP=u is not None, HAS_RS=row_scale is not None, BLOCK_V=block, num_warps=4,
    )
