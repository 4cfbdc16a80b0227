"""Input builders and comparisons for the property-based fuzzer (tests/test_fuzz.py).

Inputs come from one drawn seed plus drawn shapes and options, so Hypothesis shrinks
over a handful of integers and choices, not over tensors. Logits have a drawn spread (up
to std 30), optional -inf masks shared by both models, and optionally one injected
non-finite value or all -inf row in a drawn row of the student or the teacher.
"""

from __future__ import annotations

import math

import torch
from _helpers import ATOL

INJECTIONS = ("none", "nan_s", "inf_s", "nan_t", "inf_t", "row_s", "row_t")
SPREADS = (0.1, 1.0, 5.0, 30.0)
LOWP = (torch.float16, torch.bfloat16)


def logits(gen, n, v, std, dtype=torch.float64):
    """[n, v] logits with row spreads around `std` (rows cycle through std, std/3, ...)."""
    rows = std / torch.tensor([1.0, 3.0, 10.0], dtype=torch.float64).repeat(n + 1)[:n, None]
    return (torch.randn(n, v, generator=gen, dtype=torch.float64) * rows).to(dtype)


def mask_both(gen, s, t, p):
    """-inf at a random fraction p of the entries of both models (column 0 kept)."""
    if p == 0 or s.shape[-1] < 3:
        return s, t
    m = torch.rand(s.shape, generator=gen) < p
    m[..., 0] = False
    s, t = s.clone(), t.clone()
    s[m] = -math.inf
    t[..., : s.shape[-1]][m] = -math.inf
    return s, t


def labels_for(gen, s, ignore_frac):
    """Labels at entries the student does not mask; a fraction ignored (-100)."""
    n, v = s.shape
    y = torch.randint(0, v, (n,), generator=gen)
    y = torch.where(torch.isinf(s.gather(1, y[:, None]))[:, 0], 0, y)
    y[torch.rand(n, generator=gen) < ignore_frac] = -100
    return y


def inject(s, t, kind, row, col):
    """(s, t, which side got a non-finite value at [row, col] or an all -inf row, or None)."""
    if kind == "none" or s.shape[0] == 0:
        return s, t, None
    s, t = s.clone(), t.clone()
    x = s if kind.endswith("_s") else t
    if kind.startswith("row"):
        x[row] = -math.inf
    else:
        x[row, col] = math.nan if kind.startswith("nan") else math.inf
    return s, t, kind


def assert_close_rows(got, ref, dtype, scale, low=None):
    """Finite-input agreement with the float64 oracle.

    float32/float64: |got − ref| <= 1e-5·max|ref| + atol(scale) element-wise (scale: the
    logits' magnitude, which bounds float32 cancellation in a loss). float16/bfloat16:
    the low-precision rule against PyTorch's own result `low` in that dtype.
    """
    got, ref = got.double(), ref.double()
    assert got.shape == ref.shape
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), got
    err = (got - ref).abs().max().item()
    big = ref.abs().max().item()
    if dtype in LOWP:
        low_err = (low.double() - ref).nan_to_num(nan=math.inf).abs().max().item()
        bound = 2 * low_err + ATOL[dtype] + torch.finfo(dtype).eps * big
    else:
        bound = 1e-5 * big + 2e-6 * (1 + scale)
    assert err <= bound, f"max error {err:.3g} > {bound:.3g} (max |ref| {big:.3g})"


def assert_policy(loss_rows, grad, clean_rows, clean_grad, *, ignored, read, bad_row):
    """The injected row: 0 and a zero gradient when it is ignored; else NaN loss and a
    NaN gradient row when the loss reads the injected value (`read`), else unchanged.
    Every other row exactly as in the run without the injection."""
    rest = torch.ones(loss_rows.shape[0], dtype=torch.bool)
    if ignored:
        assert loss_rows[bad_row] == 0 and (grad[bad_row] == 0).all()
    elif read:
        assert math.isnan(loss_rows[bad_row]), loss_rows[bad_row]
        assert torch.isnan(grad[bad_row]).all()
    rest[bad_row] = not (ignored or read)  # an unread injection changes nothing
    assert torch.equal(loss_rows[rest], clean_rows[rest])
    assert torch.equal(grad[rest], clean_grad[rest])
