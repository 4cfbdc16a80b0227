"""Plackett-Luce distillation (PLD) ranking loss (SPEC §3)."""

from .function import plackett_luce_loss
from .module import PlackettLuceLoss

__all__ = ["plackett_luce_loss", "PlackettLuceLoss"]
