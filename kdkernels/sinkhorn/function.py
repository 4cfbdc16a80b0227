"""`sinkhorn` and `sinkhorn_loss`: validation, dispatch, assembly (docs/spec.md §4)."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

from .._core.backend import Backend
from .._core.rowmask import check_row_mask, kept_rows
from .._core.validate import (
    check_choice,
    check_float_tensor,
    check_int,
    check_labels,
    check_number,
    check_same_device,
    compute_dtype,
)
from .ops import SINKHORN, SINKHORN_LOSS

SinkhornCost = Literal["l1", "sqeuclidean"]
SinkhornGrad = Literal["unrolled", "envelope"]
COSTS: tuple[str, ...] = get_args(SinkhornCost)
GRADS: tuple[str, ...] = get_args(SinkhornGrad)



def _log_marginal(name, w, lead, size, cdt, device):
    """log of marginal `w` broadcast to [M, size]; uniform 1/size when None."""
    if w is None:
        return torch.full((math.prod(lead), size), -math.log(size), dtype=cdt, device=device)
    if w.shape[-1] != size:
        raise ValueError(
            f"{name} must have last dimension {size} (the cost's), got shape {tuple(w.shape)}"
        )
    full = tuple(lead) + (size,)
    fits = w.dim() <= len(full) and all(
        d in (1, e) for d, e in zip(reversed(w.shape), reversed(full))
    )
    if not fits:
        raise ValueError(
            f"{name} of shape {tuple(w.shape)} does not broadcast to the cost's shape "
            f"without its last dimension, {full}"
        )
    if w.device.type == "cpu" and w.numel() > 0 and bool((w.detach() < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    w = w.to(cdt).expand(tuple(lead) + (size,)).reshape(-1, size)
    return w.log()


def _check_equal_mass(a, b, rtol: float = 1e-4) -> None:
    """Balanced OT: Σa = Σb (1 for a uniform marginal), per problem; checked on CPU
    tensors only (a GPU check would synchronise the host) and not while tracing."""
    given = [w for w in (a, b) if w is not None]
    if not given or any(w.device.type != "cpu" for w in given) or torch.compiler.is_compiling():
        return
    mass = [w.detach().double().sum(-1) if w is not None else torch.ones((), dtype=torch.float64)
            for w in (a, b)]
    ma, mb = torch.broadcast_tensors(*mass)
    off = (ma - mb).abs() > rtol * torch.maximum(ma, mb)
    if bool(off.any()):
        i = off.flatten().nonzero()[0, 0]
        raise ValueError(
            "a and b must carry the same total mass (balanced optimal transport; a "
            f"marginal left as None has mass 1): found Σa = {ma.flatten()[i]:.6g} and "
            f"Σb = {mb.flatten()[i]:.6g}"
        )


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    epsilon: float,
    n_iters: int,
    tol: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropic optimal transport in the log domain, batched (docs/spec.md §4).

    From f = g = 0, each iteration sets
    f_i = ε log a_i − ε LSE_j((g_j − C_ij)/ε), then g_j = ε log b_j − ε LSE_i((f_i − C_ij)/ε).
    The plan is P_ij = exp((f_i + g_j − C_ij)/ε).

    Args:
        cost: [..., B1, B2] float tensor C (any leading dims are independent problems).
        a: optional [B1] or [..., B1] non-negative row marginal (default uniform 1/B1);
            broadcast over the leading dims.
        b: optional [B2] or [..., B2] non-negative column marginal (default uniform 1/B2).
        epsilon: entropic regularisation ε > 0 (in the cost's units).
        n_iters: number of (row, column) update pairs, >= 1.
        tol: optional; stop after the first iteration where the row-marginal error
            max over the batch of Σ_i |Σ_j P_ij − a_i| is below `tol` (torch: one
            host sync per iteration; triton, cuda: decided on the device, no sync).
        backend: 'auto' | 'torch' | 'triton' | 'cuda' ('auto' takes torch until a GPU run
            validates the kernels).

    Returns:
        (f [..., B1], g [..., B2]) in float32 (float64 for a float64 cost). Differentiable
        w.r.t. cost, a and b: the exact derivative of the iterations that ran, computed by
        a hand-written reverse pass that recomputes each step (memory O(B1·B2)).
    """
    check_float_tensor("cost", cost, min_dim=2)
    for name, w in (("a", a), ("b", b)):
        if w is not None:
            check_float_tensor(name, w)
    device = check_same_device(cost=cost, a=a, b=b)
    epsilon = check_number("epsilon", epsilon, lo=0.0, lo_open=True)
    n_iters = check_int("n_iters", n_iters, lo=1)
    if tol is not None:
        tol = check_number("tol", tol, lo=0.0, lo_open=True)
    *lead, b1, b2 = cost.shape
    if b1 < 1 or b2 < 1:
        raise ValueError(f"cost must have non-empty last two dimensions, got {tuple(cost.shape)}")
    cdt = compute_dtype(cost)
    log_a = _log_marginal("a", a, lead, b1, cdt, device)
    log_b = _log_marginal("b", b, lead, b2, cdt, device)
    _check_equal_mass(a, b)
    be = SINKHORN.resolve(backend, device)
    c = cost.to(cdt).reshape(-1, b1, b2)
    f, g = SINKHORN(be, c, log_a, log_b, epsilon, n_iters, tol)
    return f.reshape(*lead, b1), g.reshape(*lead, b2)


def sinkhorn_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    cost: SinkhornCost = "l1",
    epsilon: float = 0.1,
    n_iters: int = 20,
    grad: SinkhornGrad = "unrolled",
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """SinKD's batch-wise Sinkhorn distance between tempered softmaxes (docs/spec.md §4).

    With p_s = softmax(s/τ) and p_t = softmax(t/τ) over the vocabulary, the cost between
    row i of the student and row j of the teacher is C_ij = Σ_v |p_s[i,v] − p_t[j,v]|
    (`l1`) or ½ Σ_v (p_s[i,v] − p_t[j,v])² (`sqeuclidean`); `sinkhorn` runs `n_iters`
    iterations with uniform marginals 1/B and the loss is ⟨P, C⟩, averaged over the
    leading dims. SinKD's kernel-domain code (marginals 1) gives B times this value.

    Rows whose label is `ignore_index` (or whose `mask` entry is False) are left out of
    their batch's transport problem entirely, as if the batch did not hold them: a batch
    keeping B' rows is the problem on those B' rows (marginals 1/B'), and batches keeping
    none are left out of the mean (0 when no batch keeps a row). Their logits are never
    read (NaN included) and their gradient is 0.

    Args:
        student_logits: [..., B, V] float tensor; gets the gradient.
        teacher_logits: [..., B, V] float tensor, same shape; treated as a constant.
        labels: optional [..., B] integer tensor; rows equal to `ignore_index` are left
            out (the labels are used for nothing else).
        temperature: τ > 0.
        cost: 'l1' | 'sqeuclidean'.
        epsilon: entropic regularisation ε > 0 (cost units; l1 costs lie in [0, 2]).
        n_iters: Sinkhorn iterations, >= 1.
        grad: 'unrolled' (exact derivative of the finite iteration) | 'envelope'
            (P held constant: ∂L/∂C = P).
        ignore_index: the label of rows left out.
        mask: optional [..., B] bool (or 0/1 integer) tensor, True = keep the row (for
            callers without labels); with labels too, a row counts where both keep it.
            With labels or mask the kept rows are counted on the host (one sync: the
            problems' shapes depend on them) and selected (index_select) before the
            cost kernels.
        backend: 'auto' | 'torch' | 'triton' (the fused cost kernels; the solver runs
            on triton too; 'auto' takes torch until a GPU run validates the kernels).

    Returns:
        float32 scalar loss.
    """
    s = check_float_tensor("student_logits", student_logits, min_dim=2)
    t = check_float_tensor("teacher_logits", teacher_logits, min_dim=2)
    device = check_same_device(student_logits=s, teacher_logits=t)
    if tuple(s.shape) != tuple(t.shape):
        raise ValueError(
            "student_logits and teacher_logits must have the same shape [..., B, V], got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    check_choice("cost", cost, COSTS)
    epsilon = check_number("epsilon", epsilon, lo=0.0, lo_open=True)
    n_iters = check_int("n_iters", n_iters, lo=1)
    check_choice("grad", grad, GRADS)
    *lead, bsz, v = s.shape
    if bsz < 1 or v < 1:
        raise ValueError(
            f"student_logits must have B >= 1 rows and V >= 1 classes, got {tuple(s.shape)}"
        )
    ignore_index = check_int("ignore_index", ignore_index)
    rows_shape = tuple(s.shape[:-1])
    check_labels(labels, rows_shape, v, ignore_index, device)
    keep = kept_rows(labels, ignore_index, check_row_mask(mask, rows_shape, device))
    be = SINKHORN_LOSS.resolve(backend, device)
    if math.prod(lead) == 0:
        return s.new_zeros((), dtype=torch.float32) + 0.0 * s.sum()
    s2 = (s if s.is_contiguous() else s.contiguous()).reshape(-1, v)
    t2 = t.detach()
    t2 = (t2 if t2.is_contiguous() else t2.contiguous()).reshape(-1, v)
    args = (1.0 / temperature, cost, epsilon, n_iters, grad, compute_dtype(s))
    if keep is None:
        return SINKHORN_LOSS(be, s2, t2, bsz, *args)
    return _kept_rows_loss(be, s2, t2, keep.reshape(-1, bsz), args)


def _kept_rows_loss(be: str, s2, t2, keep, args) -> torch.Tensor:
    """sinkhorn_loss over the kept rows only: the problems [M] of s2, t2 [M·B, V] grouped
    by how many rows each keeps (keep [M, B] bool), each group's kept rows selected
    (index_select: the gradient of the others is exactly 0, their values never read) and
    solved as one batch of problems of that size; the mean over problems keeping a row."""
    m, bsz = keep.shape
    counts = keep.sum(1)
    sizes = counts.tolist()  # (the one host sync: shapes depend on it)
    if min(sizes) == bsz:
        return SINKHORN_LOSS(be, s2, t2, bsz, *args)
    total, problems = None, 0
    for size in sorted(set(sizes) - {0}):
        probs = (counts == size).nonzero()[:, 0]
        rows = (probs * bsz).repeat_interleave(size) + keep[probs].nonzero()[:, 1]
        part = SINKHORN_LOSS(be, s2.index_select(0, rows), t2.index_select(0, rows), size,
                             *args) * probs.numel()
        total = part if total is None else total + part
        problems += probs.numel()
    if total is None:  # no problem keeps a row: 0, with a zero gradient (nothing read)
        return s2[:0].sum().float()
    return total / problems
