"""Plackett-Luce distillation (PLD) ranking loss (docs/spec.md §3)."""

from .function import plackett_luce_loss

__all__ = ["plackett_luce_loss"]
