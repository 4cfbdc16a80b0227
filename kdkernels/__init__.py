"""kdkernels: exact, fused kernels for knowledge-distillation losses at LLM vocabulary sizes."""

from ._backend import BackendUnavailableError
from .kd import DIVERGENCES, TAIDSchedule, kd_loss
from .nn import KDLoss

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "DIVERGENCES",
    "KDLoss",
    "TAIDSchedule",
    "kd_loss",
    "__version__",
]
