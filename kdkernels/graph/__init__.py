"""Top-k logit graphs and InfiGFusion-style graph-on-logits distillation (SPEC §5)."""

from .function import graph_on_logits_loss, topk_logit_graph
from .module import GraphOnLogitsLoss

__all__ = ["topk_logit_graph", "graph_on_logits_loss", "GraphOnLogitsLoss"]
