"""Triton device functions shared by the kernels: log-domain arithmetic without overflow or
cancellation, and the online-softmax step.

All of them work in float32 and use only `tl.exp`, `tl.log` and arithmetic, so they run
the same under the interpreter as on a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def safe_max(m):
    """A running max of -inf (every entry so far masked) must not produce inf − inf."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_step(m, x):
    """One tile x of an online log-sum-exp whose running max is m.

    Returns (m_new, e, r): the new running max, e = exp(x − m_new) and r = exp(m − m_new),
    the factor that rescales every sum kept relative to the old max (z ← z·r + Σe).
    Masked lanes hold -inf and give e = 0.
    """
    m_new = tl.maximum(m, tl.max(x, 0))
    m_s = safe_max(m_new)
    return m_new, tl.exp(x - m_s), tl.exp(m - m_s)


@triton.jit
def log1p(z):
    """log(1 + z), accurate for tiny z >= 0: the rounding of 1 + z cancels in the ratio."""
    u = 1.0 + z
    return tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))


@triton.jit
def expm1(x):
    """e^x − 1, accurate for tiny |x|: (u − 1)·x / log u with u = e^x, where the rounding
    of u cancels in the ratio (the same trick as log1p)."""
    u = tl.exp(x)
    small = (u - 1.0) * (x / tl.log(u))
    return tl.where(u == 1.0, x, tl.where(tl.abs(x) < 1.0, small, u - 1.0))


@triton.jit
def logaddexp(x, y):
    m = safe_max(tl.maximum(x, y))
    return m + tl.log(tl.exp(x - m) + tl.exp(y - m))


@triton.jit
def softplus(x):
    """log(1 + e^x) without overflow."""
    return tl.maximum(x, 0.0) + log1p(tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def sigmoid_minus_softplus(x):
    """sigmoid(x) − softplus(x) = w + log(1 − w), w = sigmoid(x). Below w = ¼ the two
    terms cancel (the value is ≈ −w²/2): there it is the series −Σ_{k≥2} wᵏ/k, to k = 14
    (truncation < 1e-8 relative)."""
    w = sigmoid(x)
    series = 1.0 / 14.0
    for i in tl.static_range(12):  # k = 13, 12, ..., 2
        series = series * w + 1.0 / (13 - i)
    return tl.where(w < 0.25, -series * w * w, w - softplus(x))


@triton.jit
def nonfinite_count(x):
    """How many entries of the tile x are NaN or +inf (-inf is a mask, not counted)."""
    return tl.sum(((x != x) | (x == float("inf"))).to(tl.int32), 0)


@triton.jit
def tanh(u):
    """tanh(u) = sign(u)(1 − e)/(1 + e), e = exp(−2|u|), for |u| >= 1/4; the odd Taylor
    series to u⁹ below, where 1 − e would cancel (truncation < 2e-8 relative)."""
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
def sech2(u):
    """sech²(u) = 4e/(1 + e)², e = exp(−2|u|): no 1 − tanh² cancellation when u saturates."""
    e = tl.exp(-2.0 * tl.abs(u))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))
