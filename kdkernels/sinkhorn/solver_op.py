"""The Triton and CUDA solvers of `sinkhorn` as autograd over custom ops (importable without
Triton or the CUDA extension).

`sinkhorn_triton` and `sinkhorn_cuda` are the `triton` and `cuda` entries of the SINKHORN
table (ops.py). They are functions, not import paths, because `torch.compile` traces
through the table: an import inside the traced call would break the graph. The kernels
themselves (triton.py, which imports Triton; cuda.py, which loads the extension) load
inside the custom ops' bodies, which the compiler sees as opaque calls with the shapes
their fakes give, so `torch.compile(fullgraph=True)` of a `sinkhorn(..., backend=
"triton" or "cuda")` call traces without graph breaks. Both backends share the fakes,
the history format and the autograd Function.
"""

from __future__ import annotations

import torch

from .._core.customop import custom_op
from .._core.rowgrad import refuse_double_backward


def _fwd_fake(cost, log_a, log_b, epsilon, n_iters, tol, history):
    m, b1, b2 = cost.shape
    k = n_iters if history else 0
    return (cost.new_empty(m, b1), cost.new_empty(m, b2), cost.new_empty(k, 2, m, b1),
            cost.new_empty(k, 2, m, b2), cost.new_empty(1, dtype=torch.int32))


@custom_op("sinkhorn_triton_fwd", fake=_fwd_fake)
def sinkhorn_triton_fwd(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                        epsilon: float, n_iters: int, tol: float | None,
                        history: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    """(f, g, R, L, iters): triton.sinkhorn_fwd_triton as one opaque op."""
    from .triton import sinkhorn_fwd_triton

    return sinkhorn_fwd_triton(cost, log_a, log_b, epsilon, n_iters, tol, history)


def _bwd_fake(cost, log_a, log_b, rh, lh, iters, grad_f, grad_g, epsilon):
    # contiguous, as the real op's outputs (cost may be a strided view)
    return cost.new_empty(cost.shape), log_a.new_empty(log_a.shape), log_b.new_empty(log_b.shape)


@custom_op("sinkhorn_triton_bwd", fake=_bwd_fake)
def sinkhorn_triton_bwd(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                        rh: torch.Tensor, lh: torch.Tensor, iters: torch.Tensor,
                        grad_f: torch.Tensor | None, grad_g: torch.Tensor | None,
                        epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C̄, log ā, log b̄): triton.sinkhorn_bwd_triton as one opaque op."""
    from .triton import sinkhorn_bwd_triton

    return sinkhorn_bwd_triton(cost, log_a, log_b, rh, lh, iters, grad_f, grad_g, epsilon)


@custom_op("sinkhorn_cuda_fwd", fake=_fwd_fake)
def sinkhorn_cuda_fwd(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                      epsilon: float, n_iters: int, tol: float | None,
                      history: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor]:
    """(f, g, R, L, iters): cuda.sinkhorn_fwd_cuda as one opaque op."""
    from .cuda import sinkhorn_fwd_cuda

    return sinkhorn_fwd_cuda(cost, log_a, log_b, epsilon, n_iters, tol, history)


@custom_op("sinkhorn_cuda_bwd", fake=_bwd_fake)
def sinkhorn_cuda_bwd(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                      rh: torch.Tensor, lh: torch.Tensor, iters: torch.Tensor,
                      grad_f: torch.Tensor | None, grad_g: torch.Tensor | None,
                      epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C̄, log ā, log b̄): cuda.sinkhorn_bwd_cuda as one opaque op."""
    from .cuda import sinkhorn_bwd_cuda

    return sinkhorn_bwd_cuda(cost, log_a, log_b, rh, lh, iters, grad_f, grad_g, epsilon)


# backend -> (forward op, backward op)
_OPS = {
    "triton": (sinkhorn_triton_fwd, sinkhorn_triton_bwd),
    "cuda": (sinkhorn_cuda_fwd, sinkhorn_cuda_bwd),
}


class SinkhornKernelFunction(torch.autograd.Function):
    """(C, log a, log b) -> (f, g), both passes in the kernels of `backend` (triton or
    cuda): the contract of pytorch.py's SinkhornFunction. The forward keeps the
    per-iteration log-sum-exps (O(K·B)) and the device-side iteration count when a
    gradient is needed."""

    @staticmethod
    def forward(ctx, cost, log_a, log_b, epsilon: float, n_iters: int, tol, backend: str):
        need = any(ctx.needs_input_grad[:3])
        fwd, _ = _OPS[backend]
        f, g, rh, lh, iters = fwd(cost, log_a, log_b, epsilon, n_iters, tol, need)
        ctx.epsilon = epsilon
        ctx.backend = backend
        if need:
            ctx.save_for_backward(cost, log_a, log_b, rh, lh, iters)
        return f, g

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        refuse_double_backward("sinkhorn")
        cost, log_a, log_b, rh, lh, iters = ctx.saved_tensors
        _, bwd = _OPS[ctx.backend]
        c_bar, la_bar, lb_bar = bwd(cost, log_a, log_b, rh, lh, iters, grad_f, grad_g,
                                    ctx.epsilon)
        return (
            c_bar if ctx.needs_input_grad[0] else None,
            la_bar if ctx.needs_input_grad[1] else None,
            lb_bar if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
        )


def sinkhorn_triton(cost, log_a, log_b, epsilon: float, n_iters: int, tol):
    """(f [M, B1], g [M, B2]) from cost [M, B1, B2] and log marginals (one float dtype)."""
    return SinkhornKernelFunction.apply(cost, log_a, log_b, epsilon, n_iters, tol, "triton")


def sinkhorn_cuda(cost, log_a, log_b, epsilon: float, n_iters: int, tol):
    """(f [M, B1], g [M, B2]) from cost [M, B1, B2] and log marginals (float32 or
    float64), on the CUDA solver."""
    return SinkhornKernelFunction.apply(cost, log_a, log_b, epsilon, n_iters, tol, "cuda")
