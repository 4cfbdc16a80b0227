"""The dispatch tables of `sinkhorn` and `sinkhorn_loss`. Their torch paths are autograd
compositions that `torch.compile` traces, so the tables hold the functions themselves."""

from __future__ import annotations

from .._core.backend import Dispatch, Impl
from .pytorch import sinkhorn_loss_torch, sinkhorn_torch
from .solver_op import sinkhorn_cuda, sinkhorn_triton

# cuda, triton (solver_op.py): explicit only until benchmarked. No verifier: the solver
# computes in float32 or float64, the only dtypes function.py hands it.
SINKHORN = Dispatch("sinkhorn", {
    "cuda": Impl(sinkhorn_cuda, auto=False),
    "triton": Impl(sinkhorn_triton, auto=False),
    "torch": Impl(sinkhorn_torch),
})


def sinkhorn_loss_triton(*args):
    """The triton backend (cost_triton.py), imported on first use: torch.compile traces
    this import, where it could not trace an Impl's import path."""
    from .cost_triton import sinkhorn_loss_triton as impl

    return impl(*args)


# triton: the cost and its backward are Triton kernels (cost_triton.py); explicit only
# until a GPU benchmark shows it faster than the torch path
SINKHORN_LOSS = Dispatch("sinkhorn_loss", {
    "triton": Impl(sinkhorn_loss_triton, auto=False),
    "torch": Impl(sinkhorn_loss_torch),
})
