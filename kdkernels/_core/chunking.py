"""How many rows the PyTorch paths process at a time.

The PyTorch paths work on blocks of whole rows so that their temporaries stay near
CHUNK_BYTES each, whatever N is: memory stays bounded by the returned gradient plus a
few blocks, and each block is large enough for vectorised kernels.
"""

from __future__ import annotations

CHUNK_BYTES = 4 << 20  # bytes of one row block's temporary (e.g. 1M float32 elements)


def chunk_rows(width: int, itemsize: int = 4, budget: int | None = None) -> int:
    """Rows per block so that a [rows, width] temporary of `itemsize`-byte elements fits
    `budget` bytes (default CHUNK_BYTES; at least one row)."""
    budget = CHUNK_BYTES if budget is None else budget
    return max(1, budget // max(1, width * itemsize))


def row_blocks(n: int, width: int, itemsize: int = 4, budget: int | None = None):
    """(r0, r1) row ranges of blocks of `chunk_rows(width, itemsize, budget)` rows."""
    step = chunk_rows(width, itemsize, budget)
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)
