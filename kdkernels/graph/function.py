"""`topk_logit_graph` and `graph_on_logits_loss`: validation and dispatch (docs/spec.md §5,
after InfiGFusion's GLD); the math is in pytorch.py."""

from __future__ import annotations

import torch

from .._core.backend import Backend
from .._core.rowmask import check_row_mask, kept_rows
from .._core.validate import (
    check_float_tensor,
    check_int,
    check_labels,
    check_number,
    check_same_device,
)
from .ops import GRAPH_LOSS, LOGIT_GRAPH


def topk_logit_graph(
    logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k logit graph of one group (docs/spec.md §5).

    Args:
        logits: [T, V] float tensor (one group of T positions).
        k: entries kept per position, 1 <= k <= V (ties by lower class index).
        temperature: τ > 0; a_t = top-k entries of softmax(logits_t / τ), zero elsewhere.
        mask: optional [T] bool (or 0/1 integer) tensor of valid positions.
        backend: 'auto' | 'torch' | 'triton' | 'cuda' ('auto' takes torch until a GPU
            run validates the kernels; triton, cuda: k <= 256, not float64).

    Returns:
        (nodes [n] int64, the classes in any valid position's top-k, ascending;
         adjacency [n, n] = Σ_t a_t a_tᵀ on those nodes, float32 (float64 for float64
         logits), differentiable w.r.t. logits).
    """
    z = check_float_tensor("logits", logits, min_dim=2)
    if z.dim() != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(z.shape)}")
    t_len, v = z.shape
    k = check_int("k", k, lo=1)
    if k > v:
        raise ValueError(f"k must be <= V = {v}, got {k}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    valid = check_row_mask(mask, (t_len,), z.device)
    be = LOGIT_GRAPH.resolve(backend, z.device)
    zz = z if z.stride(-1) == 1 else z.contiguous()
    return LOGIT_GRAPH(be, zz, k, 1.0 / temperature, valid)


def graph_on_logits_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Graph-on-logits distillation loss (docs/spec.md §5, after InfiGFusion's GLD).

    Args:
        student_logits: [G, T, V_s] float tensor; gets the gradient.
        teacher_logits: [G, T, V_t] float tensor (V_t may differ from V_s); a constant.
        k: top-k entries per position, 1 <= k <= min(V_s, V_t).
        temperature: τ > 0.
        mask: optional [G, T] bool (or 0/1 integer) tensor of valid positions (True =
            keep).
        labels: optional [G, T] integer tensor (student classes); positions whose label
            is `ignore_index` are masked (the labels are used for nothing else). With
            `mask` too, a position is valid where both keep it.
        ignore_index: the label of masked positions.
        backend: 'auto' | 'torch' | 'triton' | 'cuda' ('auto' takes torch until a GPU
            run validates the kernels; triton, cuda: k <= 256, not float64).

    Returns:
        float32 scalar: the mean over groups with at least one valid position (0 if none)
        of the better of the identity / reversal 1-D GW costs between the sorted node
        strengths of the two top-k logit graphs.
    """
    s = check_float_tensor("student_logits", student_logits)
    t = check_float_tensor("teacher_logits", teacher_logits)
    device = check_same_device(student_logits=s, teacher_logits=t)
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [G, T, V], got shape {tuple(x.shape)}")
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            "student_logits and teacher_logits must share [G, T], got "
            f"{tuple(s.shape[:2])} and {tuple(t.shape[:2])}"
        )
    g, t_len, v_s = s.shape
    v_t = t.shape[2]
    k = check_int("k", k, lo=1)
    if k > min(v_s, v_t):
        raise ValueError(f"k must be <= min(V_s, V_t) = {min(v_s, v_t)}, got {k}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    ignore_index = check_int("ignore_index", ignore_index)
    check_labels(labels, (g, t_len), v_s, ignore_index, device)
    valid = kept_rows(labels, ignore_index, check_row_mask(mask, (g, t_len), device))
    be = GRAPH_LOSS.resolve(backend, device)
    if g == 0 or t_len == 0:
        return s.new_zeros((), dtype=torch.float32) + 0.0 * s.sum()
    return GRAPH_LOSS(be, s, t.detach(), k, 1.0 / temperature, valid)
