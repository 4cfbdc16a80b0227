"""Fused linear + KD loss: the divergence family on two linear heads' logits (SPEC §2)."""

from .chunking import choose_chunk_size
from .function import fused_linear_kd_loss
from .module import FusedLinearKDLoss

__all__ = ["fused_linear_kd_loss", "FusedLinearKDLoss", "choose_chunk_size"]
