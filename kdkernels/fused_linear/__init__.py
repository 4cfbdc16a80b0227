"""Fused linear + KD loss: the divergence family on two linear heads' logits, or top-k KD
on one head's logits against a stored teacher top-k (docs/spec.md §2)."""

from .chunking import choose_chunk_size
from .function import fused_linear_kd_loss, fused_linear_topk_kd_loss

__all__ = ["fused_linear_kd_loss", "fused_linear_topk_kd_loss", "choose_chunk_size"]
