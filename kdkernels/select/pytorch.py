"""The `torch` backend of `topk_select`: exact, chunked over rows, without a full sort
when k is small.

Order: values descending, equal values by increasing index, NaN above every number and
-0.0 tied with +0.0 (the order of a stable descending sort, reference.py).

Values of at most 32 bits (float32; float16 and bfloat16 embed exactly) are packed with
their class index into one unique int64 key: the float32 bit pattern made monotone in
the high 32 bits (every NaN made the largest, −0.0 folded into +0.0 first), 2³² − 1 − index
in the low 32 bits. Unique keys make any selection deterministic, so `torch.topk` over
the keys (O(V + k log k), or a sort when k is a sizeable fraction of V) yields the
tie-broken order directly. float64 values use a stable sort.
"""

from __future__ import annotations

import torch

from .._core.chunking import row_blocks

# Sort all keys when k is at least this fraction of V (topk is no cheaper there).
FULL_SORT_FRACTION = 0.25


def order_key(x: torch.Tensor) -> torch.Tensor:
    """int64 keys of x [R, V] (at most 32-bit floats), larger = ranked earlier, unique."""
    f = torch.where(torch.isnan(x), float("nan"), x.float() + 0.0)  # one NaN; −0 → +0
    bits = f.view(torch.int32)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: reverse their order
    low = 0xFFFFFFFF - torch.arange(x.shape[1], device=x.device)
    return (mono.long() << 32) | low


def top_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [R, k] of the k first entries of each row of x [R, V] in the order above."""
    if x.dtype == torch.float64:
        return torch.sort(x, dim=1, descending=True, stable=True).indices[:, :k]
    key = order_key(x)
    if k >= FULL_SORT_FRACTION * x.shape[1]:
        return torch.sort(key, dim=1, descending=True).indices[:, :k]
    return torch.topk(key, k, dim=1, sorted=True).indices


def topk_select_torch(x: torch.Tensor, k: int, values: torch.Tensor,
                      indices: torch.Tensor) -> None:
    """x: [N, V] -> values [N, k] (x's dtype) and indices [N, k] (int64), preallocated."""
    n, v = x.shape
    for r0, r1 in row_blocks(n, v, itemsize=8):  # blocks of ~4 MiB of int64 keys
        idx = top_indices(x[r0:r1], k)
        indices[r0:r1] = idx
        values[r0:r1] = x[r0:r1].gather(1, idx)
