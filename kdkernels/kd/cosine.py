"""The `torch` backend of `kd_loss` for divergence='cosine': exact PyTorch, chunked over rows.

D = 1 − cos(a, b) with a = s/τ, b = t/τ (cosine is scale-invariant: τ changes nothing but
the gradient's 1/τ, as for the others), Liger-Kernel's cosine-similarity distillation
loss. An entry −inf in both rows is left out (a masked class); −inf in one row only makes
the row NaN, as eager PyTorch's normalisation does; a zero row has cosine 0 (D = 1) and
gradient 0.

Cancellation-free forms. With â = a/‖a‖, b̂ = b/‖b‖ and δ = b̂ − â,
  D = 1 − â·b̂ = ½‖δ‖²,   ∂D/∂a = −(b̂ − cos·â)/‖a‖ = −(δ + D·â)/‖a‖,
so a nearly parallel pair (D ~ 1e-8) keeps its digits where 1 − â·b̂ would round to 0.
The norms are taken of the rows divided by their largest |entry| (no overflow or
underflow at any finite logit) and summed in float64. What float32 cannot remove is the
problem's own conditioning: the gradient of a pair δ apart moves by ~ε/‖δ‖ relative when
the inputs move by their rounding ε.
"""

from __future__ import annotations

import torch

from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from .._core.validate import compute_dtype
from .params import KDParams

_NEG_INF = float("-inf")


def unit(x: torch.Tensor):
    """(x/‖x‖, 1/‖x‖ [R, 1]) of rows x [R, V], both 0 for a zero row."""
    m = x.abs().amax(-1, keepdim=True)
    r = torch.where(m > 0, 1.0 / m, 0.0)
    xs = x * r
    nrm = torch.linalg.vector_norm(xs, dim=-1, keepdim=True, dtype=torch.float64)
    inv = torch.where(nrm > 0, 1.0 / nrm, 0.0).to(x.dtype)
    return xs.mul_(inv), r * inv


def kd_fwd_torch_cosine(s, t, labels, scale, loss_out, grad_out, prm: KDParams,
                        v: int, parts=None) -> None:
    """pytorch.kd_fwd_torch's contract for prm.div == COSINE (b = t/τ_t)."""
    n = s.shape[0]
    cdt = compute_dtype(s)
    want_grad = grad_out.numel() > 0
    scale_c = float(scale) if scale.device.type == "cpu" else scale.to(cdt)
    it, it_t = prm.inv_temp, prm.teacher_inv_temp
    rows = chunk_rows(v)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x = s[r0:r1, :v].to(cdt)
        a = x * it if it != 1.0 else x
        b = t[r0:r1, :v].to(cdt)
        b = b * it_t if it_t != 1.0 else b
        inf_a, inf_b = a == _NEG_INF, b == _NEG_INF
        bad = (inf_a ^ inf_b).any(-1) | inf_a.all(-1)  # −inf in one row only; no finite s
        for z in (a, b):
            bad |= (torch.isnan(z) | (z == float("inf"))).any(-1)
        both = inf_a & inf_b
        ha, inv_a = unit(a.masked_fill(both, 0.0))
        hb, _ = unit(b.masked_fill(both, 0.0))
        zero = (inv_a == 0) | (hb == 0).all(-1, keepdim=True)
        delta = hb.sub_(ha)
        half_sq = torch.linalg.vector_norm(delta, dim=-1, keepdim=True, dtype=torch.float64)
        d = torch.where(zero, 1.0, half_sq.square_().mul_(0.5).to(cdt))  # ½‖δ‖²
        soft = prm.soft_w * d.squeeze(-1)
        hard = torch.zeros_like(soft)
        valid = ys = None
        if labels is not None:
            y = labels[r0:r1]
            valid = y != prm.ignore_index
            ys = torch.where(valid, y, 0).long().unsqueeze(-1)
        if prm.hard_w != 0.0:
            logsm = torch.log_softmax(x, -1)
            hard = -prm.hard_w * logsm.gather(-1, ys).squeeze(-1)
        loss_out[r0:r1] = row_policy(soft + hard, bad, valid)
        if parts is not None:
            parts[r0:r1, 0] = row_policy(soft, bad, valid)
            parts[r0:r1, 1] = row_policy(hard, bad, valid)
        if not want_grad:
            continue
        c_soft = torch.as_tensor(prm.soft_w * it * scale_c, dtype=cdt, device=s.device)
        row_c = torch.where(bad, torch.nan, c_soft).unsqueeze(-1)  # NaN in bad rows
        # ∂D/∂a = −(δ + D·â)/‖a‖ (0 for a zero row: inv_a = 0, or δ + D·â = −â + â)
        out = delta.add_(ha.mul_(d)).mul_(inv_a * -row_c)
        if prm.hard_w != 0.0:  # + softmax(s) − onehot(y); at y: −Σ_{v≠y} softmax(s)_v
            c_hard = prm.hard_w * scale_c
            at_y = out.gather(-1, ys)
            rest = torch.logsumexp(logsm.scatter(-1, ys, _NEG_INF), -1, keepdim=True)
            out.add_(logsm.exp_().mul_(c_hard))
            out.scatter_(-1, ys, at_y - rest.exp_() * c_hard)
        if valid is not None:
            out.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad_out[r0:r1, :v] = out
    if want_grad and grad_out.shape[1] > v:
        grad_out[:, v:].zero_()
