"""nn.Module form of `graph_on_logits_loss`."""

from __future__ import annotations

import torch

from .function import graph_on_logits_loss


class GraphOnLogitsLoss(torch.nn.Module):
    """Module form of `graph_on_logits_loss`: k and keywords fixed at construction.

    forward(student_logits [G, T, V_s], teacher_logits [G, T, V_t], mask [G, T] | None)
    -> float32 scalar. Keywords: temperature, backend.
    """

    def __init__(self, k, **kwargs):
        super().__init__()
        self.k = k
        self.kwargs = dict(kwargs)

    def forward(self, student_logits, teacher_logits, mask=None):
        return graph_on_logits_loss(student_logits, teacher_logits, self.k, mask=mask,
                                    **self.kwargs)

    def extra_repr(self) -> str:
        return ", ".join([f"k={self.k!r}"] + [f"{k}={v!r}" for k, v in self.kwargs.items()])
