"""Helpers of the float64 oracles (each op's reference.py) that every oracle shares."""

from __future__ import annotations

import torch


def reduce_ref(rows, lead, reduction, normalizer, n_valid):
    """the spec's reductions of per-row losses `rows` [N] (0 at invalid rows): 'none' shapes
    them like `lead`, 'sum' sums, 'mean' divides by `normalizer` or max(1, n_valid)."""
    if reduction == "none":
        return rows.reshape(lead)
    total = rows.sum()
    if reduction == "sum":
        return total
    if normalizer is None:
        normalizer = torch.as_tensor(n_valid).clamp_min(1)
    return total / torch.as_tensor(normalizer, device=total.device).to(total.dtype)
