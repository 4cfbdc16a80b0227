"""`topk_select`: the one top-k of the package (PLD's ranking, the graph loss's top-k
entries and the teacher top-k that top-k KD consumes all come from it)."""

from __future__ import annotations

import torch

from .._core.backend import Backend
from .._core.validate import check_float_tensor, check_int
from .ops import TOPK, topk_select_op


def topk_select(
    x: torch.Tensor, k: int, *, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row, sorted descending, ties by lower index.

    Args:
        x: [..., V] float tensor (fp16/bf16/fp32/fp64).
        k: 1 <= k <= V (the cuda and triton backends: k <= 256; not float64).
        backend: 'auto' | 'torch' | 'triton' | 'cuda'.

    Returns:
        (values [..., k] in x's dtype, indices [..., k] int64). NaN ranks above every
        number; -0.0 and +0.0 tie. `values` carries the gradient to x (a gather).
    """
    check_float_tensor("x", x)
    v = x.shape[-1]
    if v < 1:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    k = check_int("k", k, lo=1, hi=v)
    be = TOPK.resolve(backend, x.device, dtype=x.dtype, k=k)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, v)
    if v > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    values, indices = topk_select_op(x2.detach(), k, be)
    if x.requires_grad and torch.is_grad_enabled():
        values = x2.gather(1, indices)
    return values.reshape(*lead, k), indices.reshape(*lead, k)
