"""Graph-on-logits distillation (after InfiGFusion's GLD; docs/spec.md §5)."""

from .function import graph_on_logits_loss, topk_logit_graph

__all__ = ["graph_on_logits_loss", "topk_logit_graph"]
