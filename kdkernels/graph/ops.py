"""The dispatch tables of the graph-on-logits ops. Their torch paths are autograd
compositions that `torch.compile` traces, so the tables hold the functions themselves."""

from __future__ import annotations

from .._core.backend import Dispatch, Impl
from .pytorch import graph_on_logits_loss_torch, topk_logit_graph_torch

LOGIT_GRAPH = Dispatch("topk_logit_graph", {"torch": Impl(topk_logit_graph_torch)})
GRAPH_LOSS = Dispatch("graph_on_logits_loss", {"torch": Impl(graph_on_logits_loss_torch)})
