"""Entropic optimal transport: `sinkhorn` and SinKD's `sinkhorn_loss` (SPEC §4)."""

from .function import sinkhorn, sinkhorn_loss
from .module import SinkhornLoss

__all__ = ["sinkhorn", "sinkhorn_loss", "SinkhornLoss"]
