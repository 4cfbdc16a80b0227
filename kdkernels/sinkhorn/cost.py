"""Pairwise cost between tempered softmaxes, chunked over the vocabulary.

For rows x_i = softmax(s_i/τ) (student) and y_j = softmax(t_j/τ) (teacher) of one
batch [B, V], with a per-entry cost c and its derivative φ = ∂c/∂x:

    l1           c(x, y) = |x − y|        φ = sign(x − y)   (0 at ties, as autograd's |·|)
    sqeuclidean  c(x, y) = ½ (x − y)²     φ = x − y

    C_ij = Σ_v c(x_iv, y_jv)

Backward, from C̄ = ∂L/∂C:  G_iv = Σ_j C̄_ij φ(x_iv, y_jv) = ∂L/∂x_iv, and through the
softmax  ∂L/∂s_iv = x_iv (G_iv − Σ_w x_iw G_iw) / τ. At wide logit spreads x_i is nearly
one-hot and Σ_w x_iw G_iw nearly equals G at the mode r_i, so that difference is taken
relative to the mode: G_iv − Σ_w x_iw G_iw = (G_iv − G_ir) − Σ_w x_iw (G_iw − G_ir), where
the last sum has no large terms (the w = r term is exactly zero).

Memory: the softmaxes are never stored. Per-row log-sum-exps (O(N)) are kept and each
vocabulary chunk of x, y is rebuilt from the logits when needed (N × w blocks of about
CHUNK_ELEMS/4 elements). C is accumulated with `torch.cdist` (direct differences, no
B × B × V tensor and no |x|² + |y|² − 2x·y cancellation). The l1 backward forms
sign(x_iv − y_jv) for a B × B × w' slab at a time (w' keeps the slab near CHUNK_ELEMS);
the sqeuclidean backward is G = x·(C̄ 1) − C̄ y, two matmuls in float64. The gradient is
written into the returned gradient tensor: one pass stores G and accumulates the sum above,
a second applies the softmax Jacobian in place (for float16/bfloat16 gradients, which
cannot hold G exactly, the second pass recomputes G instead).

Time: O(B²·V) per batch for the cost and again for the backward; memory besides the
inputs and the returned gradient: O(B² + N + CHUNK_ELEMS).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kd.chunked import CHUNK_ELEMS

COSTS = ("l1", "sqeuclidean")


def _row_stats(z, inv_temp: float, cdt):
    """Per row of z [N, V]: log Σ_v exp(z_v/τ) in cdt and the mode argmax_v z_v, a few
    rows at a time."""
    n, v = z.shape
    lse = torch.empty(n, dtype=cdt, device=z.device)
    mode = torch.empty(n, dtype=torch.long, device=z.device)
    rows = max(1, CHUNK_ELEMS // max(v, 1))
    for r0 in range(0, n, rows):
        blk = z[r0 : r0 + rows]
        lse[r0 : r0 + rows] = torch.logsumexp(blk.to(cdt) * inv_temp, dim=-1)
        mode[r0 : r0 + rows] = blk.argmax(dim=-1)
    return lse, mode


def _probs(z, lse, v0: int, v1: int, inv_temp: float, cdt):
    """softmax(z/τ)[:, v0:v1] from the row log-sum-exps: [N, v1 − v0] in cdt (one buffer)."""
    x = z[:, v0:v1].to(cdt, memory_format=torch.contiguous_format, copy=True)
    return x.mul_(inv_temp).sub_(lse.unsqueeze(-1)).exp_()


def _vocab_step(n_rows: int, v: int) -> int:
    # [N, w] blocks of CHUNK_ELEMS/4 elements: the backward holds several at once
    return max(1, min(v, CHUNK_ELEMS // 4 // max(n_rows, 1)))


def _grad_chunk(kind: str, x, y, c_bar, c_bar_rows):
    """G = ∂L/∂x for one vocabulary chunk: x, y [M, B, w], C̄ [M, B, B] -> [M, B, w]."""
    m, b1, w = x.shape
    b2 = y.shape[1]
    if kind == "sqeuclidean":
        # Σ_j C̄_ij (x_iv − y_jv) = x_iv Σ_j C̄_ij − (C̄ y)_iv, in float64
        g = torch.bmm(c_bar.double(), y.double()).neg_()
        g.addcmul_(x.double(), c_bar_rows.double().unsqueeze(-1))
        return g.to(x.dtype)
    # l1: G_iv = Σ_j C̄_ij sign(x_iv − y_jv); a [M·B, B, w'] slab of signs at a time,
    # contracted with C̄'s rows by a batched matmul.
    out = torch.empty_like(x)
    step = max(1, CHUNK_ELEMS // max(m * b1 * b2, 1))
    cb = c_bar.reshape(m * b1, 1, b2)
    for u0 in range(0, w, step):
        u1 = min(w, u0 + step)
        sgn = (x[:, :, None, u0:u1] - y[:, None, :, u0:u1]).sign_()
        out[:, :, u0:u1] = torch.bmm(cb, sgn.reshape(m * b1, b2, u1 - u0)).reshape(
            m, b1, u1 - u0
        )
    return out


def pairwise_cost_fwd(s, t, b: int, inv_temp: float, kind: str, cdt):
    """C [M, B, B] (cdt), and the student's row log-sum-exps and modes, the teacher's row
    log-sum-exps ([N] each).

    s, t: [N, V] logits with N = M·B (rows of one batch contiguous).
    """
    n, v = s.shape
    m = n // b
    lse_s, mode_s = _row_stats(s, inv_temp, cdt)
    lse_t, _ = _row_stats(t, inv_temp, cdt)
    cost = torch.zeros(m, b, b, dtype=cdt, device=s.device)
    step = _vocab_step(n, v)
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        x = _probs(s, lse_s, v0, v1, inv_temp, cdt).reshape(m, b, v1 - v0)
        y = _probs(t, lse_t, v0, v1, inv_temp, cdt).reshape(m, b, v1 - v0)
        if kind == "l1":
            cost += torch.cdist(x, y, p=1.0)
        else:
            d = torch.cdist(x, y, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
            cost += 0.5 * d.square_()
    return cost, lse_s, mode_s, lse_t


def _grad_at_mode(kind, s, t, lse_s, lse_t, mode, c_bar, c_bar_rows, inv_temp, cdt):
    """G_ir at each student row's mode r_i: [N] (cdt)."""
    n, v = s.shape
    m, b, _ = c_bar.shape
    x_r = torch.exp(s.gather(1, mode[:, None]).to(cdt) * inv_temp - lse_s[:, None])  # [N, 1]
    # y_{j, r_i} for every pair (i, j) of a batch: [M, B(i), B(j)]
    cols = mode.view(m, 1, b).expand(m, b, b)
    y_r = t.view(m, b, v).gather(2, cols).to(cdt) * inv_temp - lse_t.view(m, b, 1)
    y_r = torch.exp(y_r).transpose(1, 2)
    x_r = x_r.view(m, b, 1)
    if kind == "sqeuclidean":
        g = (x_r.double() - y_r.double()).mul_(c_bar.double()).sum(-1)
    else:
        g = (x_r - y_r).sign_().mul_(c_bar).sum(-1)
    return g.to(cdt).reshape(n)


def pairwise_cost_bwd(c_bar, s, t, lse_s, mode_s, lse_t, inv_temp: float, kind: str, cdt):
    """∂L/∂s [N, V] (dtype of s) from C̄ [M, B, B]."""
    n, v = s.shape
    m, b, _ = c_bar.shape
    c_bar = c_bar.to(cdt)
    c_bar_rows = c_bar.sum(-1) if kind == "sqeuclidean" else None
    g_mode = _grad_at_mode(kind, s, t, lse_s, lse_t, mode_s, c_bar, c_bar_rows, inv_temp, cdt)
    g_mode = g_mode.unsqueeze(-1)
    grad = torch.empty_like(s)
    keep = grad.dtype in (torch.float32, torch.float64)
    delta = torch.zeros(n, dtype=cdt, device=s.device)  # Σ_w x_iw (G_iw − G_ir)
    step = _vocab_step(n, v)

    def chunk(v0, v1):
        """x [N, w] and G − G_mode [N, w] for columns v0:v1."""
        x = _probs(s, lse_s, v0, v1, inv_temp, cdt)
        y = _probs(t, lse_t, v0, v1, inv_temp, cdt)
        w = v1 - v0
        g = _grad_chunk(kind, x.view(m, b, w), y.view(m, b, w), c_bar, c_bar_rows)
        return x, g.view(n, w).sub_(g_mode)

    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        x, g = chunk(v0, v1)
        delta += (x * g).sum(-1)
        if keep:
            grad[:, v0:v1] = g
    delta = delta.unsqueeze(-1)
    for v0 in range(0, v, step):
        v1 = min(v, v0 + step)
        if keep:
            x = _probs(s, lse_s, v0, v1, inv_temp, cdt)
            g = grad[:, v0:v1]
        else:
            x, g = chunk(v0, v1)
        grad[:, v0:v1] = x.mul_(g - delta).mul_(inv_temp)
    return grad


class PairwiseCostFunction(torch.autograd.Function):
    """(s [N, V], t [N, V]) -> C [M, B, B]; gradient to s only (the teacher is constant)."""

    @staticmethod
    def forward(ctx, s, t, b: int, inv_temp: float, kind: str, cdt):
        cost, lse_s, mode_s, lse_t = pairwise_cost_fwd(s, t, b, inv_temp, kind, cdt)
        ctx.save_for_backward(s, t, lse_s, mode_s, lse_t)
        ctx.args = (inv_temp, kind, cdt)
        return cost

    @staticmethod
    @once_differentiable
    def backward(ctx, c_bar):
        s, t, lse_s, mode_s, lse_t = ctx.saved_tensors
        inv_temp, kind, cdt = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = pairwise_cost_bwd(c_bar, s, t, lse_s, mode_s, lse_t, inv_temp, kind, cdt)
        return grad, None, None, None, None, None
