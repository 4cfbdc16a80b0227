"""Random-sampling KD: a sparse, unbiased estimate of the teacher drawn from its
distribution, and the student loss against it (docs/sampled_kd.md, docs/spec.md §8)."""

from .function import fused_linear_sampled_kd_loss, sample_teacher, sampled_kd_loss
from .storage import TeacherSamples

__all__ = ["TeacherSamples", "fused_linear_sampled_kd_loss", "sample_teacher",
           "sampled_kd_loss"]
