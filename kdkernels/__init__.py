"""kdkernels: exact, fused kernels for knowledge-distillation losses at LLM vocabulary sizes."""

from ._core.backend import BackendUnavailableError
from ._version import __version__
from .distributed import global_normalizer
from .fused_linear import fused_linear_kd_loss, fused_linear_topk_kd_loss
from .graph import graph_on_logits_loss, topk_logit_graph
from .kd import DIVERGENCES, TAIDSchedule, kd_loss
from .nn import (
    FusedLinearKDLoss,
    FusedLinearSampledKDLoss,
    FusedLinearTopKKDLoss,
    GraphOnLogitsLoss,
    KDLoss,
    PlackettLuceLoss,
    SampledKDLoss,
    SinkhornLoss,
    TopKKDLoss,
    ULDLoss,
)
from .parallel import VocabParallel
from .pld import plackett_luce_loss
from .sampled import (
    TeacherSamples,
    fused_linear_sampled_kd_loss,
    sample_teacher,
    sampled_kd_loss,
)
from .select import topk_select
from .sinkhorn import sinkhorn, sinkhorn_loss
from .topk import TeacherTopK, topk_kd_loss
from .uld import uld_loss

__all__ = [
    "BackendUnavailableError",
    "DIVERGENCES",
    "FusedLinearKDLoss",
    "FusedLinearTopKKDLoss",
    "GraphOnLogitsLoss",
    "KDLoss",
    "PlackettLuceLoss",
    "SampledKDLoss",
    "FusedLinearSampledKDLoss",
    "SinkhornLoss",
    "TopKKDLoss",
    "ULDLoss",
    "TAIDSchedule",
    "TeacherTopK",
    "TeacherSamples",
    "VocabParallel",
    "fused_linear_kd_loss",
    "fused_linear_topk_kd_loss",
    "global_normalizer",
    "graph_on_logits_loss",
    "kd_loss",
    "plackett_luce_loss",
    "sample_teacher",
    "sampled_kd_loss",
    "fused_linear_sampled_kd_loss",
    "sinkhorn",
    "sinkhorn_loss",
    "topk_logit_graph",
    "topk_kd_loss",
    "topk_select",
    "uld_loss",
    "__version__",
]
