"""The oracle for `fused_linear_kd_loss`: materialise both logit matrices, call `kd_loss_ref`.

S = f_s(h_s W_sᵀ + b_s), T = f_t(h_t W_tᵀ + b_t), with f(x) = c·tanh(m·x/c) for a softcap
c, else m·x, all in `compute_dtype` (float64 for the oracle; the inputs' own dtype gives
"PyTorch's own error" for the low-precision rule). Gradients flow through autograd to
the student tensors. Memory is O(N·V): tests chunk the rows themselves at large shapes.
"""

from __future__ import annotations

import torch

from ..kd.reference import kd_loss_ref


def head_logits_ref(hidden, weight, bias=None, softcap=None, logit_scale=1.0,
                    compute_dtype=torch.float64):
    """f(hidden [..., H] @ weight [V, H]ᵀ + bias [V]) in `compute_dtype` -> [..., V]."""
    z = hidden.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        z = z + bias.to(compute_dtype)
    if softcap is None:
        return logit_scale * z
    return softcap * torch.tanh(logit_scale * z / softcap)


def fused_linear_kd_loss_ref(
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
    student_bias=None, teacher_bias=None, student_softcap=None, teacher_softcap=None,
    student_logit_scale=1.0, teacher_logit_scale=1.0, compute_dtype=torch.float64,
    **kd_kwargs,
):
    """docs/spec.md §2 computed by materialising the logits; `kd_kwargs` as in `kd_loss_ref`."""
    s = head_logits_ref(student_hidden, student_weight, student_bias, student_softcap,
                        student_logit_scale, compute_dtype)
    with torch.no_grad():
        t = head_logits_ref(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap,
                            teacher_logit_scale, compute_dtype)
    return kd_loss_ref(s, t, labels, compute_dtype=compute_dtype, **kd_kwargs)


def fused_linear_topk_kd_loss_ref(
    student_hidden, student_weight, teacher_topk_indices, teacher_topk_values, labels=None, *,
    student_bias=None, student_softcap=None, student_logit_scale=1.0,
    compute_dtype=torch.float64, **topk_kwargs,
):
    """docs/spec.md §2 (top-k form) by materialising the student logits, then the top-k
    oracle `topk_kd_loss_ref` (`topk_kwargs` as there)."""
    from ..topk.reference import topk_kd_loss_ref

    s = head_logits_ref(student_hidden, student_weight, student_bias, student_softcap,
                        student_logit_scale, compute_dtype)
    return topk_kd_loss_ref(s, teacher_topk_indices, teacher_topk_values, labels,
                            compute_dtype=compute_dtype, **topk_kwargs)
