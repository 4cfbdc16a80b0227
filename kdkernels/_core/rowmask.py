"""The row-masking keywords shared by the losses (docs/spec.md, "Masking rows"): `labels`
+ `ignore_index` on every loss over rows, and `mask=` (True = keep) on the losses whose
formula needs no label. Both given: a row counts where both keep it."""

from __future__ import annotations

import torch


def check_row_mask(mask, shape, device, name: str = "mask") -> torch.Tensor | None:
    """A bool mask of `shape` on `device` (bool, or integer 0/1: values checked on CPU
    tensors, not while tracing), as a bool tensor; None stays None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the logits are on {device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(
                f"an integer {name} must hold 0 (masked) or 1 (kept), found "
                f"{mask[bad].flatten()[0].item()}; pass a bool mask"
            )
    return mask != 0


def kept_rows(labels, ignore_index: int, mask) -> torch.Tensor | None:
    """The rows that count, bool like `labels` / `mask` (both already checked): labels !=
    ignore_index, AND mask; None when neither is given (every row counts)."""
    if labels is None:
        return mask
    kept = labels != ignore_index
    return kept if mask is None else kept & mask
