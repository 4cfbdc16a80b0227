"""The `cuda` backend of `topk_logit_graph` and `graph_on_logits_loss`: launchers of the
compiled kernels (csrc/graph.cu, csrc/include/kdkernels/graph.cuh; docs/cuda.md).

Same stages and contract as the Triton backend (triton.py):

  rows     the CUDA `topk_select` kernel (csrc/topk.cu) gives each position's k classes,
           then `graph_rows_kernel` one pass of the row for its log-sum-exp and the
           entries a = exp(z/τ − LSE), classes (int32), the top-k mass m and the LSE;
  group    a stable library sort of each group's entries by class, `graph_runs_kernel`
           (the fixed-point strength of every class run), a stable descending library
           sort of the strengths, `graph_gw_kernel` (the closed-form 1-D GW cost with the
           identity / reversal choice, in float64, and its gradient at each strength's
           slot), `graph_finish_kernel` (the mean over groups with a valid position);
  backward `graph_rows_bwd_kernel`: the dense top-k softmax gradient of each student row,
           written once.

Float32 arithmetic in the row kernels (float64 in the group kernels); float32, float16 or
bfloat16 logits and k <= 256 (ops.unsupported_reason refuses the others before any
kernel runs). No host
synchronisation anywhere.
"""

from __future__ import annotations

import torch

from .._core.cuda import DTYPE_CODES, check_rows, device_index, module, stream


def _bool_valid(valid):
    if valid is None:
        return None
    return valid.to(torch.bool).contiguous()


def topk_rows_cuda(z: torch.Tensor, valid, k: int, inv_temp: float):
    """z [N, V] (unit column stride) -> (a [N, k] float32, idx [N, k] int32, m [N], lse [N]);
    masked rows (valid False): a = 0, idx = 2³¹ − 1, m = lse = 0."""
    from ..select.cuda import topk_select_cuda

    check_rows("logits", z)
    n, v = z.shape
    dev = z.device
    f32 = dict(dtype=torch.float32, device=dev)
    a = torch.empty(n, k, **f32)
    idx = torch.empty(n, k, dtype=torch.int32, device=dev)
    m = torch.empty(n, **f32)
    lse = torch.empty(n, **f32)
    if n == 0:
        return a, idx, m, lse
    values = torch.empty(n, k, dtype=z.dtype, device=dev)
    top = torch.empty(n, k, dtype=torch.int64, device=dev)
    topk_select_cuda(z, k, values, top)
    vb = _bool_valid(valid)
    module().graph_rows(
        z.data_ptr(), z.stride(0), vb.data_ptr() if vb is not None else 0, top.data_ptr(), n, v,
        k, float(inv_temp), DTYPE_CODES[z.dtype], a.data_ptr(), idx.data_ptr(), m.data_ptr(),
        lse.data_ptr(), device_index(dev), stream(dev))
    return a, idx, m, lse


def rows_backward_cuda(z, valid, a, idx, m, lse, inv_temp: float, *, abar=None, uent=None,
                       gu=None, t_len: int = 1, scale=None, inv=None) -> torch.Tensor:
    """∂/∂z [N, V] (z's dtype) of Σ ā·a: ā = abar [N, k], or from (uent, gu) of groups of
    t_len rows; times scale·inv (0-dim float32 device tensors) when given."""
    check_rows("logits", z)
    n, v = z.shape
    k = a.shape[1]
    grad = torch.empty(n, v, dtype=z.dtype, device=z.device)
    if n == 0:
        return grad
    vb = _bool_valid(valid)
    if abar is not None:
        abar = abar.to(torch.float32).contiguous()

    def ptr(x):
        return x.data_ptr() if x is not None else 0

    dev = z.device
    module().graph_rows_bwd(
        z.data_ptr(), z.stride(0), ptr(vb), a.contiguous().data_ptr(), idx.contiguous().data_ptr(),
        m.data_ptr(), lse.data_ptr(), ptr(abar), ptr(uent), ptr(gu), ptr(scale), ptr(inv),
        grad.data_ptr(), grad.stride(0), n, v, k, t_len, float(inv_temp), DTYPE_CODES[z.dtype],
        device_index(dev), stream(dev))
    return grad


def fixed_point_bits(t_len: int) -> int:
    """F: a strength sums at most t_len weights <= 1 (plus rounding), so t_len·2^F + 1
    stays below 2^63."""
    return 62 - t_len.bit_length()


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[G, T, V] -> [G·T, V] with unit column stride (a view when the layout allows)."""
    g, t_len, v = x.shape
    if x.stride(2) != 1 or x.stride(0) != t_len * x.stride(1):
        x = x.contiguous()
    return x.view(g * t_len, v) if x.is_contiguous() else x.reshape(g * t_len, v)


def graph_loss_forward_cuda(s: torch.Tensor, t: torch.Tensor, valid, k: int, inv_temp: float,
                            need_grad: bool):
    """The loss of s [G, T, V_s] against t [G, T, V_t] (G, T >= 1), and what the backward
    needs: (loss, a, idx, m, lse, uent, gu, inv); uent, gu empty without need_grad."""
    g, t_len, _ = s.shape
    n, p = g * t_len, t_len * k
    dev = s.device
    vrow = valid.reshape(n) if valid is not None else None
    a = torch.empty(2, n, k, dtype=torch.float32, device=dev)
    idx = torch.empty(2, n, k, dtype=torch.int32, device=dev)
    m = torch.empty(2, n, dtype=torch.float32, device=dev)
    lse = torch.empty(2, n, dtype=torch.float32, device=dev)
    for side, z in enumerate((s, t)):
        a[side], idx[side], m[side], lse[side] = topk_rows_cuda(_as_rows(z), vrow, k, inv_temp)
    mod = module()
    di, st = device_index(dev), stream(dev)
    # strengths: entries sorted by class (stable: deterministic runs), fixed-point run sums
    key, perm = torch.sort(idx.view(2 * g, p), dim=1, stable=True)
    key, perm = key.contiguous(), perm.contiguous()
    du = torch.full((2 * g, p), -1, dtype=torch.int64, device=dev)
    nu = torch.zeros(2 * g, dtype=torch.int32, device=dev)
    bad = torch.zeros(2 * g, dtype=torch.int32, device=dev)
    uent = torch.empty(n * k if need_grad else 0, dtype=torch.int32, device=dev)
    bits = fixed_point_bits(t_len)
    mod.graph_runs(key.data_ptr(), perm.data_ptr(), a.data_ptr(), m.data_ptr(), du.data_ptr(),
                   nu.data_ptr(), bad.data_ptr(), uent.data_ptr() if need_grad else 0, g, t_len,
                   k, float(2.0**bits), di, st)
    sorted_du, order = torch.sort(du, dim=1, descending=True, stable=True)
    sorted_du, order = sorted_du.contiguous(), order.contiguous()
    cost = torch.empty(g, dtype=torch.float64, device=dev)
    gu = torch.empty(n * k if need_grad else 0, dtype=torch.float32, device=dev)
    mod.graph_gw(sorted_du.data_ptr(), order.data_ptr(), nu.data_ptr(), bad.data_ptr(),
                 cost.data_ptr(), gu.data_ptr() if need_grad else 0, g, p, float(2.0**-bits),
                 di, st)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    inv = torch.empty((), dtype=torch.float32, device=dev)
    mod.graph_finish(cost.data_ptr(), nu.data_ptr(), loss.data_ptr(), inv.data_ptr(), g, di, st)
    return loss, a[0], idx[0], m[0], lse[0], uent, gu, inv


def graph_loss_backward_cuda(s, valid, a, idx, m, lse, uent, gu, scale, inv,
                             inv_temp: float) -> torch.Tensor:
    """∂loss/∂s [G, T, V_s] times the upstream gradient `scale` (0-dim float32)."""
    g, t_len, v = s.shape
    grad = rows_backward_cuda(_as_rows(s), valid.reshape(-1) if valid is not None else None,
                              a, idx, m, lse, inv_temp, uent=uent, gu=gu, t_len=t_len,
                              scale=scale.to(torch.float32).contiguous(), inv=inv)
    return grad.view(g, t_len, v)
