"""Tile sizes of the row kernels.

One program streams one row in BLOCK_V-column tiles. On a GPU the tile is capped where
the registers of one program still hold it; under the interpreter (CPU), every program
costs Python overhead, so tiles are larger and elementwise grids coarser.
"""

from __future__ import annotations

import triton

MIN_BLOCK = 16


def row_tile(v: int, on_cpu: bool, *, gpu_cap: int = 4096, cpu_cap: int = 2048) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for streaming rows of v columns."""
    block = max(MIN_BLOCK, min(triton.next_power_of_2(max(v, 1)), cpu_cap if on_cpu else gpu_cap))
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    return block, num_warps


def elementwise_tile(v: int, on_cpu: bool) -> int:
    """BLOCK_V of a (row, column-tile) grid of elementwise kernels."""
    return max(MIN_BLOCK, min(triton.next_power_of_2(max(v, 1)), 4096 if on_cpu else 1024))
