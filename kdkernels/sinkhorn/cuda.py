"""The `cuda` backend of `sinkhorn`: launchers of the compiled solver (csrc/sinkhorn.cu,
csrc/include/kdkernels/sinkhorn.cuh; docs/cuda.md).

Same contract, history format and launch structure as the Triton solver (triton.py):
the per-iteration log-sum-exps kept as (shift, log-sum) pairs R [K, 2, M, B1] and
L [K, 2, M, B2], a device-side iteration count `iters` (no host synchronisation, `tol`
decided on the device), and the exact unrolled reverse pass recomputing each α^k, β^k
from them. Two plans, chosen by the extension from the device's shared memory:

  fused  one block per problem holds C/ε, φ, ψ and the row log-sum-exps in shared memory
         and runs every iteration in one launch (segments of 16 iterations plus a check
         launch each with `tol`); the reverse pass is one launch too.
  tiled  two launches per iteration (rows, then columns), C streamed from global memory;
         the reverse pass likewise.

float32 and float64 (arithmetic in the cost's dtype; ε and tol are passed as doubles and
rounded once to that dtype on the device side, as torch rounds a Python scalar).
"""

from __future__ import annotations

import functools

import torch

from .._core.cuda import device_index, module, stream

DTYPES = (torch.float32, torch.float64)


def unsupported_reason(dtype: torch.dtype | None = None, **_facts) -> str | None:
    """None when the CUDA solver takes a cost of `dtype`, else why not (and what to do)."""
    if dtype is None or dtype in DTYPES:
        return None
    return (f"the cuda Sinkhorn solver takes float32 or float64 costs, got {dtype}; "
            "use backend='torch' (or cast the cost)")


@functools.cache
def _plan(b1: int, b2: int, is_double: bool, dev_index: int) -> dict:
    return dict(module().sinkhorn_plan(b1, b2, is_double, dev_index))


@functools.cache
def _segment() -> int:
    return int(module().build_info()["sinkhorn_segment"])


def _check(cost, log_a, log_b) -> None:
    reason = unsupported_reason(cost.dtype)
    if reason:
        raise TypeError(reason)
    m, b1, b2 = cost.shape
    if log_a.dtype != cost.dtype or log_b.dtype != cost.dtype:
        raise TypeError("cost, log_a and log_b must share one dtype")
    if tuple(log_a.shape) != (m, b1) or tuple(log_b.shape) != (m, b2):
        raise ValueError("log_a must be [M, B1] and log_b [M, B2] for a cost [M, B1, B2]")


def sinkhorn_fwd_cuda(cost, log_a, log_b, epsilon: float, n_iters: int, tol, history: bool):
    """(f [M, B1], g [M, B2], R [K, 2, M, B1], L [K, 2, M, B2], iters int32 [1]).

    cost [M, B1, B2], log_a [M, B1], log_b [M, B2] in one float dtype (CUDA tensors).
    R, L: the per-iteration log-sum-exps as (shift, log-sum) pairs (slot k − 1 for
    iteration k; K = n_iters when `history`, else 0); `iters`: the iterations run,
    device-side.
    """
    _check(cost, log_a, log_b)
    m, b1, b2 = cost.shape
    dev, dt = cost.device, cost.dtype
    cost, log_a, log_b = cost.contiguous(), log_a.contiguous(), log_b.contiguous()
    f = torch.empty(m, b1, dtype=dt, device=dev)
    g = torch.empty(m, b2, dtype=dt, device=dev)
    iters = torch.full((1,), n_iters, dtype=torch.int32, device=dev)
    use_tol = tol is not None
    idx = device_index(dev)
    mod = module()
    fused = bool(_plan(b1, b2, dt == torch.float64, idx)["fused"])
    slots = int(mod.sinkhorn_slots(n_iters, use_tol, history, fused))
    n_slots = max(slots, 1)
    rh = torch.empty(n_slots, 2, m, b1, dtype=dt, device=dev)
    lh = torch.empty(n_slots, 2, m, b2, dtype=dt, device=dev)
    k = n_iters if history else 0
    if m == 0:
        return f, g, rh[:k], lh[:k], iters
    part = None
    if use_tol:
        seg = min(n_iters, _segment())
        shape = (seg, m) if fused else (m, -(-b1 // 8))
        part = torch.empty(shape, dtype=dt, device=dev)
    mod.sinkhorn_fwd(
        cost.data_ptr(), log_a.data_ptr(), log_b.data_ptr(), rh.data_ptr(), lh.data_ptr(),
        f.data_ptr(), g.data_ptr(), part.data_ptr() if part is not None else 0,
        iters.data_ptr(), m, b1, b2, n_iters, n_slots, float(epsilon), use_tol,
        float(tol) if use_tol else 0.0, bool(history), dt == torch.float64, fused, idx,
        stream(dev))
    return f, g, rh[:k], lh[:k], iters


def sinkhorn_bwd_cuda(cost, log_a, log_b, rh, lh, iters, grad_f, grad_g, epsilon: float):
    """(C̄ [M, B1, B2], log ā [M, B1], log b̄ [M, B2]): the exact reverse pass of the
    iterations the forward ran (`iters`), from its kept log-sum-exps R, L."""
    _check(cost, log_a, log_b)
    m, b1, b2 = cost.shape
    dev, dt = cost.device, cost.dtype
    cost, log_a, log_b = cost.contiguous(), log_a.contiguous(), log_b.contiguous()
    c_bar = torch.zeros(m, b1, b2, dtype=dt, device=dev)
    la_bar = torch.zeros(m, b1, dtype=dt, device=dev)
    lb_bar = torch.zeros(m, b2, dtype=dt, device=dev)
    n_iters = rh.shape[0]
    if m == 0 or n_iters == 0:
        return c_bar, la_bar, lb_bar
    if tuple(rh.shape) != (n_iters, 2, m, b1) or tuple(lh.shape) != (n_iters, 2, m, b2):
        raise ValueError("the history must be R [K, 2, M, B1] and L [K, 2, M, B2]")
    rh, lh = rh.contiguous(), lh.contiguous()
    idx = device_index(dev)
    fused = bool(_plan(b1, b2, dt == torch.float64, idx)["fused"])
    gf = grad_f.to(dt).contiguous() if grad_f is not None else None
    gg = grad_g.to(dt).contiguous() if grad_g is not None else None
    fb = gb = None
    if not fused:  # the tiled pass keeps f̄, ḡ in global memory, seeded by the upstream
        fb = gf.clone() if gf is not None else torch.zeros_like(la_bar)
        gb = gg.clone() if gg is not None else torch.zeros_like(lb_bar)
    module().sinkhorn_bwd(
        cost.data_ptr(), log_a.data_ptr(), log_b.data_ptr(), rh.data_ptr(), lh.data_ptr(),
        iters.data_ptr(), gf.data_ptr() if gf is not None else 0,
        gg.data_ptr() if gg is not None else 0, fb.data_ptr() if fb is not None else 0,
        gb.data_ptr() if gb is not None else 0, c_bar.data_ptr(), la_bar.data_ptr(),
        lb_bar.data_ptr(), m, b1, b2, n_iters, float(epsilon), dt == torch.float64, fused,
        idx, stream(dev))
    return c_bar, la_bar, lb_bar
