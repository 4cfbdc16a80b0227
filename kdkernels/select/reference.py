"""The oracle of `topk_select`: exact PyTorch with the tie rule.

Per row, the k largest entries sorted descending; entries of equal value come in
increasing index order. NaN ranks above every number (as in torch.sort / torch.topk),
and -0.0 equals +0.0 (so they tie and go by index). A stable descending sort gives
exactly this order.
"""

from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 22  # elements per sorted block of rows


def topk_select_ref(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, V] -> (values [N, k] in x's dtype, indices [N, k] int64)."""
    n, v = x.shape
    values = torch.empty(n, k, dtype=x.dtype, device=x.device)
    indices = torch.empty(n, k, dtype=torch.int64, device=x.device)
    rows = max(1, CHUNK_ELEMS // max(v, 1))
    for r0 in range(0, n, rows):
        blk = x[r0 : r0 + rows]
        vals, idx = torch.sort(blk, dim=-1, descending=True, stable=True)
        values[r0 : r0 + rows] = vals[:, :k]
        indices[r0 : r0 + rows] = idx[:, :k]
    return values, indices
