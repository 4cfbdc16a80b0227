"""The dispatch tables of the graph-on-logits ops and the custom ops of their Triton and CUDA
backends.

The torch paths are autograd compositions that `torch.compile` traces, so the tables hold
the functions themselves. The triton entries are traceable functions too: an autograd
Function around custom ops (opaque to the compiler, with fakes) whose bodies import and
launch the kernels of triton.py, so Triton is never imported unless a kernel runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._core.backend import BackendUnavailableError, Dispatch, Impl
from .._core.customop import custom_op
from .._core.rowgrad import refuse_double_backward
from .pytorch import graph_on_logits_loss_torch, topk_logit_graph_torch

# Both GPU backends rank rows with topk_select's kernels (select/triton.py and csrc/topk.cu
# take k <= 256) and compute in float32.
TRITON_MAX_K = 256


def unsupported_reason(backend: str, k: int, *dtypes: torch.dtype) -> str | None:
    """None when the `backend` ('triton' or 'cuda') graph kernels take logits of these
    dtypes and this k, else why not (and what to do)."""
    for dtype in dtypes:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return (f"the {backend} graph kernels take float32, float16 or bfloat16 logits, "
                    f"got {dtype}; use backend='torch' (float64 included)")
    if k > TRITON_MAX_K:
        return (f"the {backend} graph kernels support k <= {TRITON_MAX_K}, got k={k}; "
                "use backend='torch'")
    return None


def _refuse(op: str, backend: str, k: int, *dtypes: torch.dtype) -> None:
    # Checked here rather than by a table verifier: a verifier is loaded by import path,
    # which torch.compile(fullgraph=True) cannot trace. Both backends are explicit-only
    # (auto=False), so only an explicit request reaches this.
    why = unsupported_reason(backend, k, *dtypes)
    if why is not None:
        raise BackendUnavailableError(f"{op}: backend={backend!r} cannot run: {why}")


# ------------------------------------------------------------------ topk_logit_graph


def _rows_fake(z, valid, k, inv_temp):
    n = z.shape[0]
    f32 = dict(dtype=torch.float32, device=z.device)
    return (z.new_empty((n, k), **f32), z.new_empty((n, k), dtype=torch.int32),
            z.new_empty((n,), **f32), z.new_empty((n,), **f32),
            z.new_empty((n,), dtype=torch.int64))


@custom_op("graph_topk_rows", fake=_rows_fake)
def graph_topk_rows(z: Tensor, valid: Tensor | None, k: int,
                    inv_temp: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """z [N, V] (unit column stride) -> (a [N, k] float32, idx [N, k] int32, top-k mass,
    LSE, k-th order key [N]); masked rows (valid False) are not read."""
    from .triton import topk_rows

    out = _rows_fake(z, valid, k, inv_temp)
    topk_rows(z, valid, k, inv_temp, *out)
    return out


@custom_op("graph_topk_rows_bwd", fake=lambda z, *args: z.new_empty(z.shape))
def graph_topk_rows_bwd(z: Tensor, valid: Tensor | None, a: Tensor, idx: Tensor, m: Tensor,
                        lse: Tensor, kth: Tensor, abar: Tensor, inv_temp: float) -> Tensor:
    """∂/∂z [N, V] of Σ abar·a (z's dtype)."""
    from .triton import rows_backward

    return rows_backward(z, valid, a, idx, m, lse, kth, inv_temp, abar=abar)


class TopkRowsTriton(torch.autograd.Function):
    """z [N, V] -> (a [N, k] float32 top-k softmax(z/τ) entries, idx [N, k] int32)."""

    @staticmethod
    def forward(ctx, z, k: int, inv_temp: float, valid):
        a, idx, m, lse, kth = graph_topk_rows(z, valid, k, inv_temp)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(z, valid, a, idx, m, lse, kth)
        ctx.inv_temp = inv_temp
        return a, idx

    @staticmethod
    def backward(ctx, a_bar, _idx_bar):
        refuse_double_backward("topk_logit_graph")
        z, valid, a, idx, m, lse, kth = ctx.saved_tensors
        if a_bar is None:
            return None, None, None, None
        abar = a_bar.to(torch.float32).contiguous()
        return (graph_topk_rows_bwd(z, valid, a, idx, m, lse, kth, abar, ctx.inv_temp),
                None, None, None)


def topk_logit_graph_triton(z, k: int, inv_temp: float, valid):
    """Same contract as pytorch.topk_logit_graph_torch, on the Triton row kernels."""
    _refuse("topk_logit_graph", "triton", k, z.dtype)
    a, idx = TopkRowsTriton.apply(z, k, inv_temp, valid)
    idx = idx.long()
    if valid is not None:
        a, idx = a[valid], idx[valid]
    nodes, inv = torch.unique(idx, sorted=True, return_inverse=True)
    rows = torch.zeros(a.shape[0], nodes.numel(), dtype=a.dtype, device=z.device)
    rows = rows.scatter(1, inv.reshape(a.shape), a)  # a_t restricted to U: [T', n]
    return nodes, rows.transpose(0, 1) @ rows


# -------------------------------------------------------------- graph_on_logits_loss


def _loss_fake(s, t, valid, k, inv_temp, need_grad):
    n = s.shape[0] * s.shape[1]
    e = n * k if need_grad else 0
    f32 = dict(dtype=torch.float32, device=s.device)
    a, idx, m, lse, kth = _rows_fake(s.new_empty((n, 1)), valid, k, inv_temp)
    return (s.new_empty((), **f32), a, idx, m, lse, kth,
            s.new_empty((e,), dtype=torch.int32), s.new_empty((e,), **f32),
            s.new_empty((), **f32))


@custom_op("graph_loss_fwd", fake=_loss_fake)
def graph_loss_fwd(s: Tensor, t: Tensor, valid: Tensor | None, k: int, inv_temp: float,
                   need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                             Tensor, Tensor, Tensor]:
    """(loss, then what the backward needs: the student's a, idx, m, lse, kth, the entries'
    strength slots and the slots' gradient (empty without need_grad), 1/#groups)."""
    from .triton import graph_loss_forward

    out = graph_loss_forward(s, t, valid, k, inv_temp, need_grad)
    return tuple(x.clone() if x._base is not None else x for x in out)


@custom_op("graph_loss_bwd", fake=lambda s, *args: s.new_empty(s.shape))
def graph_loss_bwd(s: Tensor, valid: Tensor | None, a: Tensor, idx: Tensor, m: Tensor,
                   lse: Tensor, kth: Tensor, uent: Tensor, gu: Tensor, scale: Tensor,
                   inv: Tensor, inv_temp: float) -> Tensor:
    """∂loss/∂s [G, T, V_s] (s's dtype) times the upstream gradient `scale`."""
    from .triton import graph_loss_backward

    return graph_loss_backward(s, valid, a, idx, m, lse, kth, uent, gu, scale, inv, inv_temp)


class GraphLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, k: int, inv_temp: float, valid):
        loss, *saved = graph_loss_fwd(s, t, valid, k, inv_temp, True)
        ctx.save_for_backward(s, valid, *saved)
        ctx.inv_temp = inv_temp
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("graph_on_logits_loss")
        s, valid, a, idx, m, lse, kth, uent, gu, inv = ctx.saved_tensors
        scale = grad_out.to(torch.float32).contiguous()
        grad = graph_loss_bwd(s, valid, a, idx, m, lse, kth, uent, gu, scale, inv,
                              ctx.inv_temp)
        return grad, None, None, None, None


def graph_on_logits_loss_triton(s, t, k: int, inv_temp: float, valid):
    """Same contract as pytorch.graph_on_logits_loss_torch, on the Triton kernels."""
    _refuse("graph_on_logits_loss", "triton", k, s.dtype, t.dtype)
    if torch.is_grad_enabled() and s.requires_grad:
        return GraphLossTriton.apply(s, t, k, inv_temp, valid)
    return graph_loss_fwd(s.detach(), t, valid, k, inv_temp, False)[0]


# ---------------------------------------------------------------------------- cuda
# The same structure on the CUDA kernels (cuda.py): custom ops whose bodies load the
# extension, autograd Functions around them, and the refusal of what they cannot take.


def _rows_cuda_fake(z, valid, k, inv_temp):
    return _rows_fake(z, valid, k, inv_temp)[:4]


@custom_op("graph_topk_rows_cuda", fake=_rows_cuda_fake)
def graph_topk_rows_cuda(z: Tensor, valid: Tensor | None, k: int,
                         inv_temp: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """z [N, V] (unit column stride) -> (a [N, k] float32, idx [N, k] int32, top-k mass,
    LSE [N]); masked rows (valid False) are zeros."""
    from .cuda import topk_rows_cuda

    return topk_rows_cuda(z, valid, k, inv_temp)


@custom_op("graph_topk_rows_cuda_bwd", fake=lambda z, *args: z.new_empty(z.shape))
def graph_topk_rows_cuda_bwd(z: Tensor, valid: Tensor | None, a: Tensor, idx: Tensor,
                             m: Tensor, lse: Tensor, abar: Tensor, inv_temp: float) -> Tensor:
    """∂/∂z [N, V] of Σ abar·a (z's dtype)."""
    from .cuda import rows_backward_cuda

    return rows_backward_cuda(z, valid, a, idx, m, lse, inv_temp, abar=abar)


class TopkRowsCuda(torch.autograd.Function):
    """z [N, V] -> (a [N, k] float32 top-k softmax(z/τ) entries, idx [N, k] int32)."""

    @staticmethod
    def forward(ctx, z, k: int, inv_temp: float, valid):
        a, idx, m, lse = graph_topk_rows_cuda(z, valid, k, inv_temp)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(z, valid, a, idx, m, lse)
        ctx.inv_temp = inv_temp
        return a, idx

    @staticmethod
    def backward(ctx, a_bar, _idx_bar):
        refuse_double_backward("topk_logit_graph")
        z, valid, a, idx, m, lse = ctx.saved_tensors
        if a_bar is None:
            return None, None, None, None
        abar = a_bar.to(torch.float32).contiguous()
        return (graph_topk_rows_cuda_bwd(z, valid, a, idx, m, lse, abar, ctx.inv_temp),
                None, None, None)


def topk_logit_graph_cuda(z, k: int, inv_temp: float, valid):
    """Same contract as pytorch.topk_logit_graph_torch, on the CUDA row kernels."""
    _refuse("topk_logit_graph", "cuda", k, z.dtype)
    a, idx = TopkRowsCuda.apply(z, k, inv_temp, valid)
    idx = idx.long()
    if valid is not None:
        a, idx = a[valid], idx[valid]
    nodes, inv = torch.unique(idx, sorted=True, return_inverse=True)
    rows = torch.zeros(a.shape[0], nodes.numel(), dtype=a.dtype, device=z.device)
    rows = rows.scatter(1, inv.reshape(a.shape), a)  # a_t restricted to U: [T', n]
    return nodes, rows.transpose(0, 1) @ rows


def _loss_cuda_fake(s, t, valid, k, inv_temp, need_grad):
    out = _loss_fake(s, t, valid, k, inv_temp, need_grad)
    return out[:5] + out[6:]  # no k-th key: the CUDA backward reads the k-th entry


@custom_op("graph_loss_cuda_fwd", fake=_loss_cuda_fake)
def graph_loss_cuda_fwd(s: Tensor, t: Tensor, valid: Tensor | None, k: int, inv_temp: float,
                        need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                  Tensor, Tensor, Tensor]:
    """(loss, then what the backward needs: the student's a, idx, m, lse, the entries'
    strength slots and the slots' gradient (empty without need_grad), 1/#groups)."""
    from .cuda import graph_loss_forward_cuda

    out = graph_loss_forward_cuda(s, t, valid, k, inv_temp, need_grad)
    return tuple(x.clone() if x._base is not None else x for x in out)


@custom_op("graph_loss_cuda_bwd", fake=lambda s, *args: s.new_empty(s.shape))
def graph_loss_cuda_bwd(s: Tensor, valid: Tensor | None, a: Tensor, idx: Tensor, m: Tensor,
                        lse: Tensor, uent: Tensor, gu: Tensor, scale: Tensor, inv: Tensor,
                        inv_temp: float) -> Tensor:
    """∂loss/∂s [G, T, V_s] (s's dtype) times the upstream gradient `scale`."""
    from .cuda import graph_loss_backward_cuda

    return graph_loss_backward_cuda(s, valid, a, idx, m, lse, uent, gu, scale, inv, inv_temp)


class GraphLossCuda(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, k: int, inv_temp: float, valid):
        loss, *saved = graph_loss_cuda_fwd(s, t, valid, k, inv_temp, True)
        ctx.save_for_backward(s, valid, *saved)
        ctx.inv_temp = inv_temp
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("graph_on_logits_loss")
        s, valid, a, idx, m, lse, uent, gu, inv = ctx.saved_tensors
        scale = grad_out.to(torch.float32).contiguous()
        grad = graph_loss_cuda_bwd(s, valid, a, idx, m, lse, uent, gu, scale, inv,
                                   ctx.inv_temp)
        return grad, None, None, None, None


def graph_on_logits_loss_cuda(s, t, k: int, inv_temp: float, valid):
    """Same contract as pytorch.graph_on_logits_loss_torch, on the CUDA kernels."""
    _refuse("graph_on_logits_loss", "cuda", k, s.dtype, t.dtype)
    if torch.is_grad_enabled() and s.requires_grad:
        return GraphLossCuda.apply(s, t, k, inv_temp, valid)
    return graph_loss_cuda_fwd(s.detach(), t, valid, k, inv_temp, False)[0]


# The cuda and triton entries are explicit-only until a GPU benchmark shows them faster.
LOGIT_GRAPH = Dispatch("topk_logit_graph", {
    "cuda": Impl(topk_logit_graph_cuda, auto=False),
    "triton": Impl(topk_logit_graph_triton, auto=False),
    "torch": Impl(topk_logit_graph_torch),
})
GRAPH_LOSS = Dispatch("graph_on_logits_loss", {
    "cuda": Impl(graph_on_logits_loss_cuda, auto=False),
    "triton": Impl(graph_on_logits_loss_triton, auto=False),
    "torch": Impl(graph_on_logits_loss_torch),
})
