"""Distillation from stored teacher top-k logits or log-probabilities (docs/spec.md §5)."""

from .function import TOPK_DIVERGENCES, topk_kd_loss

__all__ = ["topk_kd_loss", "TOPK_DIVERGENCES"]
