"""kdkernels: exact, fused kernels for knowledge-distillation losses at LLM vocabulary sizes."""

from ._backend import BackendUnavailableError
from .fused_linear import fused_linear_kd_loss
from .kd import DIVERGENCES, TAIDSchedule, kd_loss
from .nn import FusedLinearKDLoss, KDLoss, PlackettLuceLoss, TopKKDLoss
from .pld import plackett_luce_loss
from .topk import topk_kd_loss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DIVERGENCES",
    "FusedLinearKDLoss",
    "KDLoss",
    "PlackettLuceLoss",
    "TopKKDLoss",
    "TAIDSchedule",
    "fused_linear_kd_loss",
    "kd_loss",
    "plackett_luce_loss",
    "topk_kd_loss",
    "__version__",
]
