"""Shared input checks. Each raises ValueError/TypeError naming the argument.

All checks run on metadata only (shapes, dtypes, devices, Python numbers), except
`check_labels` and `check_normalizer`, which inspect values only when they live on the
CPU (a GPU check would force a host synchronisation) and not while torch.compile traces.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, get_args

import torch


def _compiling() -> bool:
    # Value checks read tensor data; under torch.compile that is a data-dependent branch,
    # so they are skipped while tracing (kernels still never read out of bounds).
    return torch.compiler.is_compiling()


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype arithmetic on `x` runs in: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
Reduction = Literal["none", "sum", "mean"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_float_tensor(name: str, x, *, min_dim: int = 1) -> torch.Tensor:
    """`x` must be a floating tensor (fp16/bf16/fp32/fp64) with at least `min_dim` dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimension(s), got shape {tuple(x.shape)}"
        )
    return x


def check_int_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int32/int64), got {x.dtype}")
    return x


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors on one device; returns it."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    dev = items[0][1].device
    for k, v in items[1:]:
        if v.device != dev:
            raise ValueError(
                f"{k} is on {v.device} but {items[0][0]} is on {dev}; put all tensors on one device"
            )
    return dev


def check_number(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """A finite real Python number (or 0-dim tensor on CPU) within [lo, hi] (open ends optional)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = lo is not None and (value <= lo if lo_open else value < lo)
    above = hi is not None and (value >= hi if hi_open else value > hi)
    if below or above:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise ValueError(f"{name} must be in {lb}{lo_s}, {hi_s}{rb}, got {value:g}")
    return value


def check_int(name: str, value, *, lo=None, hi=None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise ValueError(f"{name} must be an int in [{lo_s}, {hi_s}], got {value}")
    return value


def check_choice(name: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def check_normalizer(normalizer, device=None, *, labels=None, ignore_index=None,
                     n_rows=None):
    """None, a finite number >= 0, or a 0-dim (or 1-element) floating/integer tensor, kept
    on its device, which must be the CPU or `device` (the logits' device); a 1-element
    tensor comes back 0-dim.

    0 is the count of valid rows when there is none (Transformers passes
    num_items_in_batch=0 for an accumulation window without a valid token): the loss is
    then 0. With valid rows a 0 is refused, where that costs no host synchronisation:
    a number or a CPU tensor, against CPU labels (or `n_rows` without labels); elsewhere
    the loss and gradient come out NaN instead (rowgrad.loss_scale). Values are not read
    while torch.compile traces."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        where = normalizer.device
        if where.type == "meta" or (device is not None and where.type != "cpu"
                                    and where != device):
            raise ValueError(
                f"normalizer is a tensor on {where} but the logits are on {device}; pass a "
                "number, or a 0-dim tensor on the logits' device or the CPU"
            )
        if normalizer.numel() != 1 or normalizer.dim() > 1:
            raise ValueError(
                "normalizer must be a number or a 0-dim (or 1-element) tensor, "
                f"got shape {tuple(normalizer.shape)}"
            )
        if normalizer.dtype == torch.bool or normalizer.dtype.is_complex:
            raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
        normalizer = normalizer.reshape(())
        if normalizer.device.type == "cpu" and not _compiling():
            _check_zero_normalizer(check_number("normalizer", normalizer, lo=0.0), labels,
                                   ignore_index, n_rows)
        return normalizer
    value = check_number("normalizer", normalizer, lo=0.0)
    if not _compiling():
        _check_zero_normalizer(value, labels, ignore_index, n_rows)
    return value


def _check_zero_normalizer(value: float, labels, ignore_index, n_rows) -> None:
    """A normalizer of 0 with valid rows: ValueError, when checking needs no host sync."""
    if value != 0.0:
        return
    if labels is None:
        n_valid = n_rows or 0
    elif labels.device.type == "cpu":
        n_valid = int((labels != ignore_index).sum())
    else:
        return  # a GPU read would synchronise: the loss comes out NaN (loss_scale)
    if n_valid > 0:
        raise ValueError(
            f"normalizer is 0 but {n_valid} row(s) are valid (labels != ignore_index="
            f"{ignore_index}): their mean would divide by 0. A 0 normalizer is accepted "
            "only when no row counts (every label is ignore_index; the loss is then 0). "
            "Pass the number of valid rows (tokens), or None for this call's own count"
        )


def check_labels(labels, lead_shape, num_classes: int, ignore_index: int, device):
    """Labels shaped like the leading dims, integer, on `device`; values checked on CPU only.

    Valid values: `ignore_index` or `0 <= y < num_classes`.
    """
    if labels is None:
        return None
    check_int_tensor("labels", labels)
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead_shape)}, "
            f"got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but the logits are on {device}")
    if labels.device.type == "cpu" and labels.numel() > 0 and not _compiling():
        valid = labels != ignore_index
        bad = valid & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"labels must be in [0, {num_classes}) or equal ignore_index={ignore_index}; "
                f"found {first}"
            )
    return labels


def check_row_args(labels, lead_shape, num_classes: int, device, *, ignore_index, reduction,
                   normalizer):
    """The arguments every row loss shares: `ignore_index` (int), `reduction`, `labels`
    (see check_labels) and `normalizer`. Returns (ignore_index, normalizer)."""
    ignore_index = check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    if normalizer is not None and reduction != "mean":
        raise ValueError(
            f"normalizer is the denominator of reduction='mean'; with reduction="
            f"{reduction!r} it would be ignored. Pass reduction='mean' or drop normalizer"
        )
    check_labels(labels, lead_shape, num_classes, ignore_index, device)
    normalizer = check_normalizer(normalizer, device, labels=labels, ignore_index=ignore_index,
                                  n_rows=math.prod(lead_shape))
    return ignore_index, normalizer
