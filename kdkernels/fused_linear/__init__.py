"""Fused linear + KD loss: the divergence family on two linear heads' logits (docs/spec.md §2)."""

from .chunking import choose_chunk_size
from .function import fused_linear_kd_loss

__all__ = ["fused_linear_kd_loss", "choose_chunk_size"]
