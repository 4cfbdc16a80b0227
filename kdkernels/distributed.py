"""Data-parallel helpers (docs/distributed.md).

`global_normalizer` gives the denominator of `reduction="mean"` that makes per-rank losses
add up to the mean over every valid token of the global batch: pass it as `normalizer=`
to any loss. It is not an op (no kernel, no backend): a count and one all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ._core.validate import check_int

__all__ = ["global_normalizer"]


def _count(labels, ignore_index: int) -> torch.Tensor:
    """Valid labels in one tensor or a sequence of them (int64, on their device)."""
    parts = [labels] if isinstance(labels, torch.Tensor) else list(labels)
    if not parts:
        raise ValueError("labels must be a tensor or a non-empty sequence of tensors")
    count = None
    for i, y in enumerate(parts):
        name = "labels" if isinstance(labels, torch.Tensor) else f"labels[{i}]"
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {y.dtype}")
        c = (y != ignore_index).sum(dtype=torch.int64)
        if count is None:
            count = c
        elif c.device != count.device:
            raise ValueError(
                f"{name} is on {y.device} but labels[0] is on {count.device}; "
                "all micro-batches must be on one device"
            )
        else:
            count = count + c
    return count


def global_normalizer(
    labels: torch.Tensor | Sequence[torch.Tensor],
    ignore_index: int = -100,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The number of valid tokens of the global batch, as a `normalizer` for the losses.

    Counts `labels != ignore_index` (in one tensor, or summed over a sequence of tensors:
    the micro-batches of one gradient-accumulation step) and, when torch.distributed is
    initialised, all-reduces the count (SUM) over `group` (default: the world). Otherwise
    the local count is returned. This is Hugging Face's `num_items_in_batch` (with
    `average_tokens_across_devices=True`), except that it is clamped at 1: a global batch
    without a valid token gives loss 0 and zero gradients instead of 0/0 (the same
    `max(1, ·)` as the losses' own mean, docs/spec.md).

    No host synchronisation (the count stays on the device). Every rank of `group` must
    call it (it is a collective); with the NCCL backend the labels must be CUDA tensors.

    Args:
        labels: an integer tensor, or a non-empty sequence of them on one device.
        ignore_index: the label value that marks ignored tokens.
        group: the process group of the data-parallel ranks (None: the default group).

    Returns:
        a float32 0-dim tensor on the labels' device, >= 1. Pass it as `normalizer=` with
        `reduction="mean"`: the per-rank losses then sum to the global mean.
    """
    ignore_index = check_int("ignore_index", ignore_index)
    count = _count(labels, ignore_index)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count.clamp_min(1).to(torch.float32)
