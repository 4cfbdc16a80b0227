"""The oracle for `kd_loss`: docs/spec.md §1 written directly, differentiated by autograd.

Unchunked and unoptimised on purpose: every divergence is the textbook formula in
probability space, so that the hand-derived gradients of the fast backends are checked
against an independent derivation. Tests call it in float64 (`compute_dtype`); calling
it with the input's own low-precision dtype gives "PyTorch's own error" for the
low-precision tolerance rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._core.oracle import reduce_ref


def _kl(x, logx, logy):
    """sum_v x (log x - log y) with 0 log 0 = 0, over the last dim.

    The logs are replaced by 0 where x == 0 before they meet, so that neither the value
    nor autograd's derivative of the unused branch forms -inf - (-inf).
    """
    pos = x > 0
    logx = torch.where(pos, logx, 0.0)
    logy = torch.where(pos, logy, 0.0)
    return torch.where(pos, x * (logx - logy), 0.0).sum(-1)



def _log_mix(m):
    # log of a mixture; entries with m == 0 only meet x == 0 in _kl, where they are unused.
    return torch.log(torch.where(m > 0, m, 1.0))


def divergence_ref(s, t, divergence, *, beta=0.5, alpha=0.1, taid_t=None, temperature=1.0):
    """Per-row D_n for logits s, t of shape [N, V] (already in the compute dtype)."""
    a = s / temperature
    b = (t / temperature).detach()
    logq, logp = F.log_softmax(a, -1), F.log_softmax(b, -1)
    q, p = logq.exp(), logp.exp()
    if divergence == "forward_kl":
        return _kl(p, logp, logq)
    if divergence == "reverse_kl":
        return _kl(q, logq, logp)
    if divergence == "jsd":
        if beta == 0:
            return _kl(p, logp, logq)
        if beta == 1:
            return _kl(q, logq, logp)
        logm = _log_mix(beta * p + (1 - beta) * q)
        return beta * _kl(p, logp, logm) + (1 - beta) * _kl(q, logq, logm)
    if divergence == "skew_forward_kl":
        return _kl(p, logp, _log_mix(alpha * p + (1 - alpha) * q))
    if divergence == "skew_reverse_kl":
        return _kl(q, logq, _log_mix((1 - alpha) * p + alpha * q))
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if divergence == "taid":
        lam = taid_t
        a_sg = a.detach()
        if lam == 0:
            mix = a_sg
        elif lam == 1:
            mix = b
        else:
            mix = (1 - lam) * a_sg + lam * b
        logr = F.log_softmax(mix, -1)
        return _kl(logr.exp(), logr, logq)
    raise ValueError(f"unknown divergence {divergence!r}")


def kd_loss_ref(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    divergence="forward_kl",
    beta=0.5,
    alpha=0.1,
    taid_t=None,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    normalizer=None,
    hard_label_weight=0.0,
    soft_label_weight=1.0,
    vocab_mismatch="error",
    compute_dtype=torch.float64,
):
    """docs/spec.md §1 `kd_loss`, computed in `compute_dtype` (no validation: the oracle).

    The loss comes back in `compute_dtype` so that a float64 oracle keeps its digits.
    Gradients flow to `student_logits` through autograd.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    v = min(vs, vt) if vocab_mismatch == "truncate" else vs
    lead = student_logits.shape[:-1]
    s = student_logits[..., :v].reshape(-1, v).to(compute_dtype)
    t = teacher_logits[..., :v].reshape(-1, v).to(compute_dtype).detach()
    rows = torch.zeros(s.shape[0], dtype=compute_dtype, device=s.device)
    if soft_label_weight != 0:
        d = divergence_ref(
            s, t, divergence, beta=beta, alpha=alpha, taid_t=taid_t, temperature=temperature
        )
        rows = rows + soft_label_weight * d
    if labels is not None:
        y = labels.reshape(-1)
        valid = y != ignore_index
    else:
        y, valid = None, torch.ones_like(rows, dtype=torch.bool)
    if hard_label_weight != 0:
        ce = F.cross_entropy(s, torch.where(valid, y, 0), reduction="none")
        rows = rows + hard_label_weight * ce
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return reduce_ref(rows, lead, reduction, normalizer, valid.sum())
