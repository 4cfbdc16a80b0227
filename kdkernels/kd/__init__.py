"""Softmax-KL divergence family on logits (SPEC §1)."""

from .function import kd_loss
from .params import DIVERGENCES
from .taid import TAIDSchedule

__all__ = ["kd_loss", "DIVERGENCES", "TAIDSchedule"]
