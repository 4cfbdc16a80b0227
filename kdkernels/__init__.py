"""kdkernels: exact, fused kernels for knowledge-distillation losses at LLM vocabulary sizes."""

from ._core.backend import BackendUnavailableError
from ._version import __version__
from .distributed import global_normalizer
from .fused_linear import fused_linear_kd_loss, fused_linear_topk_kd_loss
from .graph import graph_on_logits_loss, topk_logit_graph
from .kd import DIVERGENCES, TAIDSchedule, kd_loss
from .nn import (
    FusedLinearKDLoss,
    FusedLinearTopKKDLoss,
    GraphOnLogitsLoss,
    KDLoss,
    PlackettLuceLoss,
    SinkhornLoss,
    TopKKDLoss,
)
from .parallel import VocabParallel
from .pld import plackett_luce_loss
from .select import topk_select
from .sinkhorn import sinkhorn, sinkhorn_loss
from .topk import TeacherTopK, topk_kd_loss

__all__ = [
    "BackendUnavailableError",
    "DIVERGENCES",
    "FusedLinearKDLoss",
    "FusedLinearTopKKDLoss",
    "GraphOnLogitsLoss",
    "KDLoss",
    "PlackettLuceLoss",
    "SinkhornLoss",
    "TopKKDLoss",
    "TAIDSchedule",
    "TeacherTopK",
    "VocabParallel",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "global_normalizer",
    "graph_on_logits_loss",
    "kd_loss",
    "plackett_luce_loss",
    "sinkhorn",
    "sinkhorn_loss",
    "topk_logit_graph",
    "topk_kd_loss",
    "topk_select",
    "__version__",
]
