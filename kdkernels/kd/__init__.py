"""Softmax-KL divergence family on logits (docs/spec.md §1)."""

from .function import kd_loss
from .params import DIVERGENCES
from .taid import TAIDSchedule

__all__ = ["kd_loss", "DIVERGENCES", "TAIDSchedule"]
