"""The autograd pattern shared by the row losses (kd, PLD, top-k KD).

Each row loss has one launcher, a custom op
`launch(s, scale, loss, grad, backend, labels, *args)`
that writes the per-row losses into loss[N] (float32) and, when grad is non-empty, the
gradient of Σ_n scale·L_n w.r.t. the student rows s[N, V] into grad (in s's dtype).

- The gradient is computed in the forward pass, only when autograd will want it (grad
  mode on and the student requires grad): under no_grad/inference_mode nothing of size
  N × V is computed or allocated.
- Backward multiplies the stored gradient in place by the upstream gradient (a scalar for
  'mean'/'sum', per row for 'none'), on the device, skipping rows whose factor is exactly
  1. Because the rescale is in place, a second backward through the same graph is refused;
  so is double backward (create_graph=True), which these hand-written gradients cannot
  differentiate: both raise a RuntimeError that says so.
"""

from __future__ import annotations

import math

import torch

from .backend import Dispatch, Impl
from .chunking import row_blocks
from .customop import custom_op
from .validate import compute_dtype


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride (a view when possible)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _one_stride(sizes, strides) -> bool:
    """Do these dims address their elements with one stride (do they view as one dim)?"""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    if any(n == 0 for n, _ in dims):
        return True
    return all(st0 == st1 * n1 for (_, st0), (n1, st1) in zip(dims, dims[1:]))


def row_views(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tensors [..., V_i] of one leading shape as rows, as views where possible:
    [N, V_i] when every one's leading dims collapse to one row stride, else
    [N1, N2, V_i] with rows at two strides (row n at (n // N2)·stride(0) + (n % N2)·stride(1):
    `logits[:, :-1]` of [B, T, V] is [B, T-1, V] at strides (T·V, V)). A tensor that fits
    neither (or whose columns are not contiguous) is copied, the others are not."""
    xs = tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)
    lead = tuple(xs[0].shape[:-1])
    fits = lambda x, i: (_one_stride(lead[:i], x.stride()[:i])  # noqa: E731
                         and _one_stride(lead[i:], x.stride()[i:-1]))
    if all(fits(x, 0) for x in xs):
        return tuple(x.view(-1, x.shape[-1]) for x in xs)
    split = next((i for i in range(1, len(lead)) if all(fits(x, i) for x in xs)), None)
    if split is None:
        split = next((i for i in range(1, len(lead)) if fits(xs[0], i)), None)
    if split is None:
        return tuple(as_rows(x) for x in xs)
    n1, n2 = math.prod(lead[:split]), math.prod(lead[split:])
    return tuple((x if fits(x, split) else x.contiguous()).view(n1, n2, x.shape[-1])
                 for x in xs)


def n_rows(s: torch.Tensor) -> int:
    """The number of rows of a [N, V] or [N1, N2, V] row view."""
    return math.prod(s.shape[:-1])


def loss_scale(reduction: str, labels, n_rows: int, normalizer, ignore_index: int, device,
               dtype=torch.float32):
    """0-dim tensor multiplying every row's gradient: 1/denominator for 'mean'
    (normalizer, else the number of valid rows, at least 1), else 1. No host sync.
    dtype: float32, or float64 for float64 inputs (whose gradients keep 1/N's digits).

    A normalizer of 0 (validate.check_normalizer) gives 0 when no row counts, so the loss
    and gradient are 0; with valid rows, which only a host sync could have refused, NaN."""
    opts = dict(dtype=dtype, device=device)
    if reduction != "mean":
        return torch.ones((), **opts)
    if normalizer is None:
        if labels is None:
            return torch.full((), 1.0 / max(1, n_rows), **opts)
        count = (labels != ignore_index).sum().clamp_min(1)
        return count.to(dtype).reciprocal()
    if isinstance(normalizer, torch.Tensor):
        nrm = normalizer.to(**opts)
        return torch.where(nrm == 0, _zero_normalizer_scale(labels, n_rows, ignore_index, opts),
                           nrm.reciprocal())
    if normalizer == 0:
        return _zero_normalizer_scale(labels, n_rows, ignore_index, opts)
    return torch.full((), 1.0 / normalizer, **opts)


def _zero_normalizer_scale(labels, n_rows: int, ignore_index: int, opts) -> torch.Tensor:
    """The scale of a 0 normalizer: 0 when no row counts, NaN when some does."""
    if labels is None:
        return torch.full((), math.nan if n_rows > 0 else 0.0, **opts)
    return torch.where((labels != ignore_index).any(), math.nan, 0.0).to(**opts)


def row_policy(loss, bad, valid):
    """Per-row losses [R] under the non-finite policy (docs/spec.md): NaN where the row has
    no softmax (`bad`), 0 at ignored rows (`valid` False, or None: every row counts)."""
    loss = torch.where(bad, torch.nan, loss)
    return loss if valid is None else torch.where(valid, loss, 0.0)


def reduce_rows(loss: torch.Tensor, scale: torch.Tensor, reduction: str) -> torch.Tensor:
    """Per-row losses [N] -> 'none' (as is), 'sum', or 'mean' (the sum times scale)."""
    if reduction == "none":
        return loss
    total = loss.sum()
    return (total * scale).float() if reduction == "mean" else total


def refuse_double_backward(op: str) -> None:
    """In a backward: raise when autograd asks for a differentiable gradient."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True, e.g. a gradient penalty) is not "
            "supported: the gradient is computed by hand-written kernels that autograd "
            "cannot differentiate. Compute the penalty with a differentiable loss instead."
        )


def refuse_second_backward(ctx, op: str) -> None:
    """In a backward that rescales stored gradients in place: only once per graph."""
    if ctx.consumed:
        raise RuntimeError(
            f"{op}: backward was called twice through the same graph; the stored gradient "
            "is rescaled in place. Recompute the loss instead of retain_graph=True."
        )
    ctx.consumed = True


SCALE_ROWS = Dispatch("scale_rows", {
    "cuda": Impl("kdkernels._core.cuda:scale_rows_cuda"),
    "triton": Impl("kdkernels._triton.rows:scale_rows_triton"),
    "torch": Impl("kdkernels._core.rowgrad:scale_rows_torch"),
})


def scale_rows_torch(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad[N, V] *= scale (0-dim or [N]); multiplied in float32 (or wider) and rounded once."""
    if scale.dim() == 0:
        if scale.device.type != "cpu" or float(scale) != 1.0:
            grad.mul_(scale)
        return
    wide = compute_dtype(grad)
    for r0, r1 in row_blocks(grad.shape[0], grad.shape[1]):
        blk = grad[r0:r1]
        blk.copy_(blk.to(wide) * scale[r0:r1].to(wide).unsqueeze(-1))


@custom_op("scale_rows_", mutates=("grad",))
def scale_rows_(grad: torch.Tensor, scale: torch.Tensor, backend: str) -> None:
    """grad[N, V] *= scale, where scale is 0-dim or [N] (float32); no-op where scale == 1."""
    SCALE_ROWS(backend, grad, scale)


def rescale_stored(ctx, grad_out: torch.Tensor, op: str):
    """In backward: every saved gradient ([..., V], empty or None) times the upstream
    gradient, in place; returns them (ctx.saved_tensors)."""
    refuse_double_backward(op)
    refuse_second_backward(ctx, op)
    grads = ctx.saved_tensors
    g = grad_out.to(torch.float32).contiguous()
    for t in grads:
        if t is not None and t.numel() > 0:
            scale_rows_(t.view(-1, t.shape[-1]), g, ctx.backend)
    return grads


def row_loss_function(op: str, launch) -> type[torch.autograd.Function]:
    """The autograd.Function of a row loss whose launcher is `launch` (module docstring).

    apply(s [N, V] (or a [N1, N2, V] view, see row_views), scale 0-dim float32, reduction,
    backend, labels [N] | None, *args) -> reduced loss; the gradient flows to s only, in
    s's shape (the launcher gets it as a contiguous tensor of that shape).
    """

    class RowLossFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s, scale, reduction, backend, labels, *args):
            n = n_rows(s)
            loss = torch.empty(n, dtype=torch.float32, device=s.device)
            grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)  # contiguous
            if n > 0:
                launch(s, scale, loss, grad, backend, labels, *args)
            ctx.save_for_backward(grad)
            ctx.backend, ctx.consumed, ctx.n_args = backend, False, len(args)
            return reduce_rows(loss, scale, reduction)

        @staticmethod
        def backward(ctx, grad_out):
            (grad,) = rescale_stored(ctx, grad_out, op)
            return (grad, None, None, None, None) + (None,) * ctx.n_args

    RowLossFunction.__name__ = RowLossFunction.__qualname__ = f"{op}_function"
    return RowLossFunction


def row_loss(function, launch, student, labels, *args, reduction: str, normalizer,
             ignore_index: int, backend: str, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A row loss on student [..., V] and labels [...] | None: rows, the reduction's scale,
    then `function` (from row_loss_function) when autograd wants the student's gradient,
    else the launcher alone without a gradient. 'none' comes back shaped [...].
    rows: the student's rows as the launcher takes them (a view from row_views; default
    as_rows(student))."""
    lead = student.shape[:-1]
    s = as_rows(student) if rows is None else rows
    n = n_rows(s)
    y = labels.reshape(-1) if labels is not None else None
    scale = loss_scale(reduction, y, n, normalizer, ignore_index, s.device, compute_dtype(s))
    if torch.is_grad_enabled() and s.requires_grad:
        out = function.apply(s, scale, reduction, backend, y, *args)
    else:
        loss = torch.empty(n, dtype=torch.float32, device=s.device)
        if n > 0:
            launch(s.detach(), scale, loss, s.new_empty(0), backend, y, *args)
        out = reduce_rows(loss, scale, reduction)
    return out.reshape(lead) if reduction == "none" else out
