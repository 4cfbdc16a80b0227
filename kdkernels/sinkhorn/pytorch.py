"""The `torch` backend of `sinkhorn` and `sinkhorn_loss` (docs/spec.md §4).

Solver (`sinkhorn`): log-domain Sinkhorn with an exact, graph-free reverse pass.

Work in scaled potentials φ = f/ε, ψ = g/ε and scaled cost Ce = C/ε. From ψ⁰ = 0,
iteration k = 1..K is

    φᵏ_i = log a_i − LSE_j(ψᵏ⁻¹_j − Ce_ij)        (row update)
    ψᵏ_j = log b_j − LSE_i(φᵏ_i − Ce_ij)          (column update)

and (f, g) = ε(φᴷ, ψᴷ). Plan P_ij = exp(φ_i + ψ_j − Ce_ij).

Reverse mode (`unrolled`: the exact derivative of this K-step map). Write
α^k_ij = softmax_j(ψᵏ⁻¹_j − Ce_ij) (the row update's LSE weights) and
β^k_ij = softmax_i(φᵏ_i − Ce_ij) (the column update's). Then

    ∂fᵏ_i/∂gᵏ⁻¹_j = −α^k_ij,  ∂fᵏ_i/∂C_ij = α^k_ij,  ∂fᵏ_i/∂log a_i = ε
    ∂gᵏ_j/∂fᵏ_i   = −β^k_ij,  ∂gᵏ_j/∂C_ij = β^k_ij,  ∂gᵏ_j/∂log b_j = ε

so, with adjoints f̄, ḡ seeded by the upstream gradients of (f, g) and k running down:

    C̄ += β^k ⊙ ḡ (columns);  f̄ −= β^k ḡ;  log b̄ += ε ḡ
    C̄ += α^k ⊙ f̄ (rows);     ḡ = −α^kᵀ f̄;  log ā += ε f̄

The forward keeps only φᵏ, ψᵏ (O(K·B) numbers); the backward recomputes each α^k, β^k
from them, so memory is O(B1·B2) whatever K, instead of autograd's K stored graphs.
Time is O(K·B1·B2) each way.

Loss (`sinkhorn_loss`): the pairwise cost between tempered softmaxes, chunked over the
vocabulary, then the solver and ⟨P, C⟩.

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
vocabulary chunk of x, y is rebuilt from the logits when needed (N × w blocks of a
quarter of a row chunk, _core/chunking.py). C is accumulated with `torch.cdist` (direct
differences, no B × B × V tensor and no |x|² + |y|² − 2x·y cancellation). The l1 backward forms
sign(x_iv − y_jv) for a B × B × w' slab at a time (w' keeps the slab near one chunk);
the sqeuclidean backward is G = x·(C̄ 1) − C̄ y, two matmuls in float64. The gradient is
written into the returned gradient tensor: one pass stores G and accumulates the sum above,
a second applies the softmax Jacobian in place (for float16/bfloat16 gradients, which
cannot hold G exactly, the second pass recomputes G instead).

Time: O(B²·V) per batch for the cost and again for the backward; memory besides the
inputs and the returned gradient: O(B² + N + one chunk).
"""

from __future__ import annotations

import math

import torch

from .._core.chunking import chunk_rows, row_blocks
from .._core.rowgrad import refuse_double_backward


def _lse_rows(psi, ce):
    """LSE_j(ψ_j − Ce_ij): [M, B1] from ψ [M, B2], Ce [M, B1, B2]."""
    return torch.logsumexp(psi.unsqueeze(-2) - ce, dim=-1)


def _lse_cols(phi, ce):
    """LSE_i(φ_i − Ce_ij): [M, B2] from φ [M, B1], Ce [M, B1, B2]."""
    return torch.logsumexp(phi.unsqueeze(-1) - ce, dim=-2)


def sinkhorn_iterate(ce, log_a, log_b, n_iters: int, tol=None, history: bool = False):
    """Run the scaled iteration; returns (φ, ψ, φ_hist, ψ_hist).

    ce: [M, B1, B2] = C/ε; log_a: [M, B1]; log_b: [M, B2]; all one float dtype.
    `tol` (in marginal units): stop after the first iteration whose row-marginal error
    max_m Σ_i |Σ_j P_ij − a_i| is below it (one host sync per iteration).
    The histories are [K, M, B1] / [K, M, B2] (K = iterations run) when `history`.
    """
    m, b1, b2 = ce.shape
    psi = torch.zeros(m, b2, dtype=ce.dtype, device=ce.device)
    lse_r = _lse_rows(psi, ce)
    phis, psis = [], []
    for _ in range(n_iters):
        phi = log_a - lse_r
        psi = log_b - _lse_cols(phi, ce)
        if history:
            phis.append(phi)
            psis.append(psi)
        lse_r = _lse_rows(psi, ce)
        if tol is not None:
            # Row sums of P are exp(φ_i + LSE_j(ψ_j − Ce_ij)); the same LSE feeds the next
            # row update, so the check costs one exp per row.
            err = (torch.exp(phi + lse_r) - log_a.exp()).abs().sum(-1)
            if m == 0 or bool(err.max() < tol):
                break
    if history and phis:
        return phi, psi, torch.stack(phis), torch.stack(psis)
    return phi, psi, None, None


class SinkhornFunction(torch.autograd.Function):
    """(C, log a, log b) -> (f, g) after the Sinkhorn iterations; exact unrolled backward.

    cost: [M, B1, B2], log_a: [M, B1], log_b: [M, B2], one dtype (float32 or float64).
    """

    @staticmethod
    def forward(ctx, cost, log_a, log_b, epsilon: float, n_iters: int, tol):
        ce = cost / epsilon
        need = any(ctx.needs_input_grad[:3])
        phi, psi, phis, psis = sinkhorn_iterate(ce, log_a, log_b, n_iters, tol, history=need)
        ctx.epsilon = epsilon
        if need:
            ctx.save_for_backward(cost, phis, psis)
        return phi * epsilon, psi * epsilon

    @staticmethod
    def backward(ctx, grad_f, grad_g):
        refuse_double_backward("sinkhorn")
        cost, phis, psis = ctx.saved_tensors
        eps = ctx.epsilon
        ce = cost / eps
        m, b1, b2 = cost.shape
        f_bar = grad_f.to(cost.dtype) if grad_f is not None else cost.new_zeros(m, b1)
        g_bar = grad_g.to(cost.dtype) if grad_g is not None else cost.new_zeros(m, b2)
        c_bar = torch.zeros_like(cost)
        la_bar = torch.zeros_like(f_bar)
        lb_bar = torch.zeros_like(g_bar)
        n = phis.shape[0]
        zero_psi = cost.new_zeros(m, b2)
        for k in range(n - 1, -1, -1):
            # column update ψᵏ = log b − LSE_i(φᵏ − Ce)
            beta = torch.softmax(phis[k].unsqueeze(-1) - ce, dim=-2)
            w = beta.mul_(g_bar.unsqueeze(-2))  # β_ij ḡ_j
            c_bar.add_(w)
            f_bar = f_bar - w.sum(-1)
            lb_bar.add_(g_bar, alpha=eps)
            del beta, w
            # row update φᵏ = log a − LSE_j(ψᵏ⁻¹ − Ce)
            psi_prev = psis[k - 1] if k > 0 else zero_psi
            alpha = torch.softmax(psi_prev.unsqueeze(-2) - ce, dim=-1)
            w = alpha.mul_(f_bar.unsqueeze(-1))  # α_ij f̄_i
            c_bar.add_(w)
            la_bar.add_(f_bar, alpha=eps)
            g_bar = -w.sum(-2)
            f_bar = torch.zeros_like(f_bar)
            del alpha, w
        return (
            c_bar if ctx.needs_input_grad[0] else None,
            la_bar if ctx.needs_input_grad[1] else None,
            lb_bar if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
        )


def plan_from_potentials(f, g, cost, epsilon: float):
    """P_ij = exp((f_i + g_j − C_ij)/ε): [..., B1, B2] from f [..., B1], g [..., B2]."""
    return torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / epsilon)


def _row_stats(z, inv_temp: float, cdt):
    """Per row of z [N, V]: log Σ_v exp(z_v/τ) in cdt and the mode argmax_v z_v, a few
    rows at a time."""
    n, v = z.shape
    lse = torch.empty(n, dtype=cdt, device=z.device)
    mode = torch.empty(n, dtype=torch.long, device=z.device)
    for r0, r1 in row_blocks(n, v):
        blk = z[r0:r1]
        lse[r0:r1] = torch.logsumexp(blk.to(cdt) * inv_temp, dim=-1)
        mode[r0:r1] = blk.argmax(dim=-1)
    return lse, mode


def _probs(z, lse, v0: int, v1: int, inv_temp: float, cdt):
    """softmax(z/τ)[:, v0:v1] from the row log-sum-exps: [N, v1 − v0] in cdt (one buffer)."""
    x = z[:, v0:v1].to(cdt, memory_format=torch.contiguous_format, copy=True)
    return x.mul_(inv_temp).sub_(lse.unsqueeze(-1)).exp_()


def _vocab_step(n_rows: int, v: int) -> int:
    # [N, w] blocks of a quarter chunk: the backward holds several at once
    return min(v, chunk_rows(n_rows, itemsize=16))


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
    step = chunk_rows(m * b1 * b2)
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
    def backward(ctx, c_bar):
        refuse_double_backward("sinkhorn_loss")
        s, t, lse_s, mode_s, lse_t = ctx.saved_tensors
        inv_temp, kind, cdt = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = pairwise_cost_bwd(c_bar, s, t, lse_s, mode_s, lse_t, inv_temp, kind, cdt)
        return grad, None, None, None, None, None


def sinkhorn_torch(cost, log_a, log_b, epsilon: float, n_iters: int, tol):
    """(f [M, B1], g [M, B2]) from cost [M, B1, B2] and log marginals (one float dtype)."""
    return SinkhornFunction.apply(cost, log_a, log_b, epsilon, n_iters, tol)


def sinkhorn_loss_torch(s, t, bsz: int, inv_temp: float, cost: str, epsilon: float,
                        n_iters: int, grad: str, cdt):
    """⟨P, C⟩ averaged over the M = N/B batches of rows s, t [N, V] (t constant): float32."""
    m = s.shape[0] // bsz
    c = PairwiseCostFunction.apply(s, t, bsz, inv_temp, cost, cdt)  # [M, B, B]
    log_u = torch.full((m, bsz), -math.log(bsz), dtype=cdt, device=s.device)
    if grad == "unrolled":
        f, g = SinkhornFunction.apply(c, log_u, log_u.clone(), epsilon, n_iters, None)
        plan = plan_from_potentials(f, g, c, epsilon)
    else:
        with torch.no_grad():
            ce = c / epsilon
            phi, psi, _, _ = sinkhorn_iterate(ce, log_u, log_u, n_iters)
            plan = torch.exp(phi.unsqueeze(-1) + psi.unsqueeze(-2) - ce)
    return (plan * c).sum(dim=(-2, -1)).mean().float()
