"""`topk_select`: validation, backend dispatch and the custom op."""

from __future__ import annotations

import os

import torch

from .._backend import BackendUnavailableError, resolve_backend
from .._validate import check_float_tensor, check_int
from .reference import topk_select_ref


@torch.library.custom_op("kdkernels::topk_select", mutates_args=())
def _topk_op(x: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, V] -> (values [N, k], indices [N, k] int64)."""
    if backend == "cuda":
        from .cuda import topk_select_cuda

        values = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        indices = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
        topk_select_cuda(x, k, values, indices)
        return values, indices
    return topk_select_ref(x, k)


@_topk_op.register_fake
def _topk_fake(x, k, backend):
    shape = (x.shape[0], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _explicit(backend: str) -> bool:
    """Was a backend asked for, by argument or by KDKERNELS_BACKEND (not left to auto)?"""
    env = os.environ.get("KDKERNELS_BACKEND", "auto").strip().lower() or "auto"
    return backend != "auto" or env != "auto"


def topk_select(x, k, *, backend="auto"):
    """The k largest entries of each row, sorted descending, ties by lower index.

    Args:
        x: [..., V] float tensor (fp16/bf16/fp32/fp64).
        k: 1 <= k <= V (the cuda backend: k <= 256).
        backend: 'auto' | 'torch' | 'cuda'.

    Returns:
        (values [..., k] in x's dtype, indices [..., k] int64). NaN ranks above every
        number; -0.0 and +0.0 tie. `values` carries the gradient to x (a gather).
    """
    check_float_tensor("x", x)
    v = x.shape[-1]
    if v < 1:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    k = check_int("k", k, lo=1, hi=v)
    be = resolve_backend(backend, x.device, op="topk_select", supported=("cuda", "torch"))
    if be == "cuda":
        from .cuda import unsupported_reason

        reason = unsupported_reason(x, k)
        if reason and _explicit(backend):
            raise BackendUnavailableError(f"topk_select: backend='cuda' cannot run: {reason}")
        if reason:  # auto: silently the reference
            be = "torch"
    lead = x.shape[:-1]
    x2 = x.reshape(-1, v)
    if v > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    values, indices = _topk_op(x2.detach(), k, be)
    if x.requires_grad:
        values = x2.gather(1, indices)
    return values.reshape(*lead, k), indices.reshape(*lead, k)
