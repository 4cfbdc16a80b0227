"""Distillation from stored teacher top-k logits or log-probabilities (SPEC §5)."""

from .function import TOPK_DIVERGENCES, topk_kd_loss
from .module import TopKKDLoss

__all__ = ["topk_kd_loss", "TopKKDLoss", "TOPK_DIVERGENCES"]
