"""Token-chunk size of the fused linear KD loss.

Per chunk of `C` tokens the loss holds these `C x v` blocks (v = vocabulary columns used):
the student logits (which become the logit gradient in place), the teacher logits, and,
with a student softcap, the pre-cap student logits (needed for the softcap's derivative):

    bytes(C) = C · [v · (e_s · (1 + [student softcap]) + e_t · [teacher needed])
                    + 4 · (H_s + H_t)]

(e_s, e_t: element sizes of the student and teacher weights; the 4·(H_s + H_t) term
covers the float32 copies of a chunk's hidden rows that low-precision CPU matmuls make).
`C` is the largest power of two with bytes(C) <= budget, clamped to [MIN_ROWS, MAX_ROWS].
It depends on the vocabulary, hidden sizes, dtypes and the budget, never on the number
of tokens, so a shape change in N alone never changes it (and `torch.compile` sees an
opaque custom op whose chunk size is a constant).
"""

from __future__ import annotations

import os

import torch

BUDGET_ENV = "KDKERNELS_FUSED_CHUNK_BUDGET_MB"
DEFAULT_BUDGET_MB = 256.0
MIN_ROWS = 16
MAX_ROWS = 16384


def budget_bytes() -> int:
    """The chunk memory budget: KDKERNELS_FUSED_CHUNK_BUDGET_MB (MiB) or 256 MiB."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if not raw:
        return int(DEFAULT_BUDGET_MB * 2**20)
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not (mb > 0 and mb != float("inf")):
        raise ValueError(f"{BUDGET_ENV} must be a positive number of MiB, got {raw!r}")
    return int(mb * 2**20)


def chunk_bytes_per_row(
    v: int, h_s: int, h_t: int, s_dtype: torch.dtype, t_dtype: torch.dtype, *,
    student_softcap: bool, need_teacher: bool = True,
) -> int:
    """Bytes one token row of a chunk holds (see the module docstring)."""
    e_s = torch.empty((), dtype=s_dtype).element_size()
    e_t = torch.empty((), dtype=t_dtype).element_size() if need_teacher else 0
    return v * (e_s * (2 if student_softcap else 1) + e_t) + 4 * (h_s + h_t)


def choose_chunk_size(
    v: int, h_s: int, h_t: int, s_dtype: torch.dtype, t_dtype: torch.dtype, *,
    student_softcap: bool = False, need_teacher: bool = True, budget: int | None = None,
) -> int:
    """Tokens per chunk: a power of two in [MIN_ROWS, MAX_ROWS] fitting `budget` bytes."""
    budget = budget_bytes() if budget is None else int(budget)
    per_row = chunk_bytes_per_row(
        v, h_s, h_t, s_dtype, t_dtype, student_softcap=student_softcap,
        need_teacher=need_teacher,
    )
    rows = max(1, budget // max(per_row, 1))
    rows = 1 << (rows.bit_length() - 1)  # round down to a power of two
    return max(MIN_ROWS, min(MAX_ROWS, rows))
