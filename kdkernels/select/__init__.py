"""Top-k selection over large vocabularies (the building block of every top-k loss)."""

from .function import topk_select
from .reference import topk_select_ref

__all__ = ["topk_select", "topk_select_ref"]
