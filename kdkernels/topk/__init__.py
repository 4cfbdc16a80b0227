"""Distillation from stored teacher top-k logits or log-probabilities (docs/spec.md §5)."""

from .function import TOPK_DIVERGENCES, topk_kd_loss
from .storage import TeacherTopK, load_teacher_topk, save_teacher_topk, teacher_topk_from_logits

__all__ = ["topk_kd_loss", "TOPK_DIVERGENCES", "TeacherTopK", "load_teacher_topk",
           "save_teacher_topk", "teacher_topk_from_logits"]
