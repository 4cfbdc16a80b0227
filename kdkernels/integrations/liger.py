"""Liger-Kernel: modules with the constructors and forward signatures of Liger's fused
linear JSD losses, computed by `fused_linear_kd_loss` (no Liger import).

- `LigerFusedLinearJSDLoss`: `liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`
  (weighted JSD + hard-label cross-entropy, biases).
- `LigerFusedLinearJSD`: `liger_kernel.transformers.LigerFusedLinearJSD` (JSD only).

Switching is the import line. Liger's `LigerKLDIVLoss` and `LigerTVDLoss` take
probabilities; their kdkernels form takes the logits instead (`kd_loss`, no adapter):
docs/distilling.md, "Coming from Liger-Kernel", maps every keyword and says where the
numbers differ.
"""

from __future__ import annotations

import torch

from .._core.backend import Backend
from ..fused_linear.function import fused_linear_kd_loss

__all__ = ["LigerFusedLinearJSDLoss", "LigerFusedLinearJSD"]


def _vocab_mismatch(student_weight, teacher_weight) -> str:
    """A teacher head with extra (padding) rows: use the shared vocabulary. Liger instead
    appends constant-0 student logits for them; the other way round both raise."""
    return "truncate" if teacher_weight.shape[0] > student_weight.shape[0] else "error"


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """`LigerFusedLinearJSDLoss` computed by kdkernels; same constructor and forward.

    loss = weight_soft_loss · mean JSD_β(softmax(T/τ), softmax(S/τ))
         + weight_hard_loss · mean CE(S, labels),
    both means over the positions whose label is not `ignore_index` (at least 1), S and
    T the logits of the two heads (with their biases), the cross-entropy on the
    untempered S, no τ². β as in TRL and Liger: 0 is KL(teacher‖student).

    `compiled` is accepted and ignored. `chunk_size` (token rows per chunk) only trades
    memory for speed, never the value; None (the default here) lets kdkernels size it from
    the vocabulary and hidden sizes. The weight gradient accumulates in the weight's dtype,
    as Liger's. `return_soft_hard_loss=True` returns (loss, soft, hard) from the same
    fused pass (`return_components`: soft the mean JSD, hard the mean cross-entropy,
    loss = weight_soft_loss·soft + weight_hard_loss·hard; soft and hard are detached,
    as Liger's carry no gradient either). `backend` is kdkernels' (keyword only).
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int | None = None,
        return_soft_hard_loss: bool = False,
        *,
        backend: Backend = "auto",
    ):
        super().__init__()
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.beta = beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.backend = backend

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        true_labels: torch.Tensor | None,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ):
        return fused_linear_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels,
            student_bias=student_bias, teacher_bias=teacher_bias,
            divergence="jsd", beta=self.beta, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction="mean",
            hard_label_weight=self.weight_hard_loss, soft_label_weight=self.weight_soft_loss,
            vocab_mismatch=_vocab_mismatch(student_weight, teacher_weight),
            chunk_size=self.chunk_size, weight_grad_accumulation="weight",
            backend=self.backend, return_components=self.return_soft_hard_loss,
        )


class LigerFusedLinearJSD(torch.nn.Module):
    """`LigerFusedLinearJSD` (liger_kernel.transformers) computed by kdkernels.

    loss = mean over the positions whose `shift_labels` is not `ignore_index` (all
    positions without labels) of JSD_β(softmax(T/τ), softmax(S/τ)), S and T the logits
    of the two bias-free heads; no τ². `accum_dtype=None` accumulates the weight
    gradient in the weight's dtype, `torch.float32` in float32 (as Liger's).
    """

    def __init__(
        self,
        jsd_beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        accum_dtype: torch.dtype | None = None,
        *,
        backend: Backend = "auto",
    ):
        super().__init__()
        if accum_dtype not in (None, torch.float32):
            raise ValueError(
                f"accum_dtype must be None (the weight's dtype) or torch.float32, got "
                f"{accum_dtype}")
        self.jsd_beta = jsd_beta
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.accum_dtype = accum_dtype
        self.backend = backend

    def forward(
        self,
        student_input: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_input: torch.Tensor,
        teacher_weight: torch.Tensor,
        shift_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return fused_linear_kd_loss(
            student_input, student_weight, teacher_input, teacher_weight, shift_labels,
            divergence="jsd", beta=self.jsd_beta, temperature=self.temperature,
            ignore_index=self.ignore_index, reduction="mean",
            weight_grad_accumulation="weight" if self.accum_dtype is None else "float32",
            backend=self.backend,
        )
