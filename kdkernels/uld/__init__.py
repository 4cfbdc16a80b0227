"""Universal Logit Distillation (ULD): a cross-tokenizer loss on sorted probabilities
(docs/spec.md §7)."""

from .function import uld_loss

__all__ = ["uld_loss"]
