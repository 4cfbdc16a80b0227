"""The `torch` backend of `kd_loss` for the divergences that split a row at its label
y: dkd (Decoupled KD) and nkd (Normalized KD); exact PyTorch, chunked over rows.

Every distribution d (a = s/τ, b = t/τ; the untempered x = s and u = t where τ ≠ 1) is
described by statistics of its non-target classes N = {v ≠ y} and its target entry:

  M = max_N d (at the non-target pivot k*),  L = log Σ_N e^{d − M} = log1p(Σ_{N∖k*} e^{d−M}),
  z = (d_y − M) − L = log(p_y / (1 − p_y)),  log p̂_v = (d_v − M) − L  (v ∈ N),

so that p_y = σ(z), 1 − p_y = σ(−z), log p_y = −softplus(−z), log(1 − p_y) = −softplus(z):
no 1 − p_y is ever formed, and p_y → 1 keeps every digit of 1 − p_y (kernels: the same).

dkd (params.canonical: w = α/(α+β), soft_w·(α+β)), D = w·TCKD + (1−w)·NCKD:
  TCKD = σ(z_b)(softplus(−z_a) − softplus(−z_b)) + σ(−z_b)(softplus(z_a) − softplus(z_b))
  NCKD = Σ_N p̂ (log p̂ − log q̂)      (0 when the teacher has no mass outside y)
  ∂D/∂a_y = w·Δ,  ∂D/∂a_v = −w·Δ·q̂_v + (1−w)(q̂_v − p̂_v) (v ∈ N),  Δ = q_y − p_y
  with Δ = σ(−z_b) − σ(−z_a) where both are near 1 (z_a + z_b > 0), else σ(z_a) − σ(z_b).
nkd (w = γ), D = −p1_y log q1_y + γ·(−Σ_N p̂ log q̂) with p1 = softmax(t), q1 = softmax(s):
  −p1_y log q1_y = σ(z_u)·softplus(−z_x), −log q̂_v = (M_a − a_v) + L_a ≥ 0 (no cancellation)
  ∂D/∂s = σ(z_u)·(softmax(s) − onehot(y)) + (γ/τ)(q̂ − p̂) on N:
  the target term is a cross-entropy weighted by the teacher's p1_y, folded into the
  hard label's coefficient.
The hard label's softmax(s)_y − 1 is −σ(−z_x), its other entries σ(−z_x)·q̂1_v.
Every term sums to 0 over the row, so the pivot k*'s entry (where q̂ and p̂ may both
round to 1) is written as minus the sum of the others, as in pytorch.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from .._core.validate import compute_dtype
from .params import NKD, KDParams
from .pytorch import _pivot_last

_NEG_INF = float("-inf")


class Split(NamedTuple):
    """A distribution's target / non-target statistics (module docstring), rows [R]."""

    m: torch.Tensor  # M, the non-target max (−inf: no finite non-target entry)
    piv: torch.Tensor  # [R, 1] k*, the non-target argmax
    lse: torch.Tensor  # L (−inf: no non-target mass)
    z: torch.Tensor  # the binary logit log(p_y / (1 − p_y))
    logp: torch.Tensor  # [R, V] log p̂ on N, −inf at y and where there is no mass


def split(d: torch.Tensor, ys: torch.Tensor) -> Split:
    """The statistics of logits d [R, V] at the targets ys [R, 1] (valid classes)."""
    nt = d.scatter(-1, ys, _NEG_INF)
    m = nt.amax(-1, keepdim=True)
    piv = nt.argmax(-1, keepdim=True)
    m_safe = torch.where(m > _NEG_INF, m, 0.0)
    rel = nt - m_safe
    z_rest = torch.exp(rel).scatter_(-1, piv, 0.0).sum(-1, keepdim=True)
    has = m > _NEG_INF
    lse = torch.where(has, torch.log1p(z_rest), _NEG_INF)
    z = (d.gather(-1, ys) - m_safe) - lse
    logp = torch.where(has, rel.sub_(torch.where(has, lse, 0.0)), _NEG_INF)
    return Split(m.squeeze(-1), piv, lse.squeeze(-1), z.squeeze(-1), logp)


def _softplus(x):
    """log(1 + e^x), exact at every x (infinities included)."""
    return x.clamp_min(0).add_(torch.log1p(torch.exp(-x.abs())))


def binary_kl(zp, zq):
    """KL([σ(zp), σ(−zp)] ‖ [σ(zq), σ(−zq)]) from the binary logits, 0·log 0 = 0."""
    p1, p0 = torch.sigmoid(zp), torch.sigmoid(-zp)
    t1 = torch.where(p1 > 0, p1 * (_softplus(-zq) - _softplus(-zp)), 0.0)
    t0 = torch.where(p0 > 0, p0 * (_softplus(zq) - _softplus(zp)), 0.0)
    return t1 + t0


def sigmoid_diff(za, zb):
    """σ(za) − σ(zb) without the 1 − 1 of two probabilities near 1."""
    near_one = (za + zb) > 0
    return torch.where(near_one, torch.sigmoid(-zb) - torch.sigmoid(-za),
                       torch.sigmoid(za) - torch.sigmoid(zb))


def _xlog(x, logx, logy):
    return torch.where(x > 0, x * (logx - logy), 0.0)


def kd_fwd_torch_decoupled(s, t, labels, scale, loss_out, grad_out, prm: KDParams,
                           v: int, parts=None) -> None:
    """pytorch.kd_fwd_torch's contract for prm.div in (DKD, NKD); labels [N] required.
    The teacher's b = t/τ_t (prm.teacher_inv_temp); nkd's target term is untempered."""
    n = s.shape[0]
    cdt = compute_dtype(s)
    want_grad = grad_out.numel() > 0
    scale_c = float(scale) if scale.device.type == "cpu" else scale.to(cdt)
    nkd = prm.div == NKD
    w, it, it_t = prm.w, prm.inv_temp, prm.teacher_inv_temp
    for r0 in range(0, n, chunk_rows(v)):
        r1 = min(n, r0 + chunk_rows(v))
        y = labels[r0:r1]
        valid = y != prm.ignore_index
        in_range = (y >= 0) & (y < v)  # (CPU labels are range-checked before; GPU ones not)
        ys = torch.where(valid & in_range, y, 0).long().unsqueeze(-1)
        x = s[r0:r1, :v].to(cdt)
        u = t[r0:r1, :v].to(cdt)
        bad = ~in_range
        for z in (x, u):  # NaN/+inf, or no finite entry at all
            bad |= (torch.isnan(z) | (z == float("inf"))).any(-1) | (z == _NEG_INF).all(-1)
        a = x * it if it != 1.0 else x
        b = u * it_t if it_t != 1.0 else u
        sa, sb = split(a, ys), split(b, ys)
        sx = split(x, ys) if it != 1.0 and (nkd or prm.hard_w != 0.0) else sa
        q_nt, p_nt = sa.logp.exp(), sb.logp.exp()
        if nkd:
            su = split(u, ys) if it_t != 1.0 else sb
            p1_y = torch.sigmoid(su.z)
            target = torch.where(p1_y > 0, p1_y * _softplus(-sx.z), 0.0)
            ce = torch.where(p_nt > 0, p_nt * -sa.logp, 0.0).sum(-1)  # −log q̂ ≥ 0
            d_row = target + w * ce
        else:
            nckd = torch.where(sb.lse > _NEG_INF, _xlog(p_nt, sb.logp, sa.logp).sum(-1), 0.0)
            d_row = w * binary_kl(sb.z, sa.z) + (1.0 - w) * nckd
        soft = prm.soft_w * d_row.clamp_min(0.0)
        hard = prm.hard_w * _softplus(-sx.z) if prm.hard_w != 0.0 else torch.zeros_like(soft)
        loss_out[r0:r1] = row_policy(soft + hard, bad, valid)  # (−log softmax(s)_y)
        if parts is not None:
            parts[r0:r1, 0] = row_policy(soft, bad, valid)
            parts[r0:r1, 1] = row_policy(hard, bad, valid)
        if not want_grad:
            continue
        c_soft = torch.as_tensor(prm.soft_w * it * scale_c, dtype=cdt, device=s.device)
        row_c = torch.where(bad, torch.nan, c_soft).unsqueeze(-1)  # NaN in bad rows
        c_hard = prm.hard_w * scale_c
        if nkd:  # the target term: σ(z_u)·CE(s, y), the hard label's form
            c_hard = c_hard + (prm.soft_w * scale_c) * p1_y.unsqueeze(-1)
            g = (q_nt - p_nt).mul_(w)
            g_y = torch.zeros_like(sa.z).unsqueeze(-1)
        else:
            delta = sigmoid_diff(sa.z, sb.z).unsqueeze(-1)
            g = (q_nt - p_nt).mul_(1.0 - w).sub_(q_nt * (w * delta))
            g_y = w * delta
        out = g.mul_(row_c)
        at_y = g_y * row_c
        if nkd or prm.hard_w != 0.0:  # + c_hard·(softmax(s) − onehot(y))
            rest_x = torch.sigmoid(-sx.z).unsqueeze(-1)  # 1 − softmax(s)_y
            x_nt = sx.logp.exp() if sx is not sa else q_nt
            out.add_(x_nt * rest_x * c_hard)
            at_y = at_y - rest_x * c_hard
        out.scatter_(-1, ys, at_y)
        # the pivot k*: minus the sum of the others (rows with a non-target entry)
        rows = (sa.m > _NEG_INF).nonzero()[:, 0]
        _pivot_last(out, sa.piv[rows], rows)
        out.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad_out[r0:r1, :v] = out
    if want_grad and grad_out.shape[1] > v:
        grad_out[:, v:].zero_()
