"""Log-domain Sinkhorn solver and SinKD's batch-wise OT loss (docs/spec.md §4)."""

from .function import sinkhorn, sinkhorn_loss

__all__ = ["sinkhorn", "sinkhorn_loss"]
