"""Log-domain Sinkhorn with an exact, graph-free reverse pass (SPEC §4 `sinkhorn`).

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
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


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
    @once_differentiable
    def backward(ctx, grad_f, grad_g):
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
