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


def _rows_with_finite(x):
    """(x with every entry of a row without a finite entry set to 0, that row mask [R]):
    log_softmax/logsumexp of an all −inf row is NaN in autograd's backward."""
    ok = (x > float("-inf")).any(-1)
    return torch.where(ok.unsqueeze(-1), x, 0.0), ok


def _without(x, y):
    """x with the target column y ([R, 1]) set to −inf: the non-target classes."""
    return x.scatter(-1, y, float("-inf"))


def _dkd(a, b, y, dkd_alpha, dkd_beta):
    """Decoupled KD (Zhao et al. 2022): α·KL(b_t‖b_s) + β·KL(p̂‖q̂), b = [p_y, 1 − p_y],
    p̂, q̂ the non-target classes renormalised; NCKD is 0 where the teacher has no
    non-target mass."""
    logq, logp = F.log_softmax(a, -1), F.log_softmax(b, -1)
    # log(1 − p_y) = log Σ_{v≠y} p_v (the sum, not 1 − p_y: p_y may round to 1)
    lq_rest, ok_q = _rows_with_finite(_without(logq, y))
    lp_rest, ok_p = _rows_with_finite(_without(logp, y))
    lq_rest = torch.where(ok_q, torch.logsumexp(lq_rest, -1), float("-inf"))
    lp_rest = torch.where(ok_p, torch.logsumexp(lp_rest, -1), float("-inf"))
    lq_bin = torch.stack([logq.gather(-1, y).squeeze(-1), lq_rest], -1)
    lp_bin = torch.stack([logp.gather(-1, y).squeeze(-1), lp_rest], -1)
    tckd = _kl(lp_bin.exp(), lp_bin, lq_bin)
    a_nt, ok_a = _rows_with_finite(_without(a, y))
    b_nt, ok_b = _rows_with_finite(_without(b, y))
    logq_nt, logp_nt = F.log_softmax(a_nt, -1), F.log_softmax(b_nt, -1)
    logq_nt = logq_nt.masked_fill(~ok_a.unsqueeze(-1), float("-inf"))
    nckd = torch.where(ok_b, _kl(logp_nt.exp(), logp_nt, logq_nt), 0.0)
    return dkd_alpha * tckd + dkd_beta * nckd


def _nkd(s, t, a, b, y, nkd_gamma):
    """Normalized KD (Yang et al. 2023): −p_y log q_y at temperature 1 (p = softmax(t),
    q = softmax(s)) + γ·(−Σ_{v≠y} p̂_v log q̂_v) at temperature τ (p̂, q̂ the non-target
    classes renormalised). No τ² factor."""
    logq1 = F.log_softmax(s, -1).gather(-1, y).squeeze(-1)
    p1 = F.softmax(t, -1).gather(-1, y).squeeze(-1)
    target = torch.where(p1 > 0, -p1 * torch.where(p1 > 0, logq1, 0.0), 0.0)
    a_nt, ok_a = _rows_with_finite(_without(a, y))
    b_nt, ok_b = _rows_with_finite(_without(b, y))
    logq_nt = F.log_softmax(a_nt, -1).masked_fill(~ok_a.unsqueeze(-1), float("-inf"))
    p_nt = torch.where(ok_b.unsqueeze(-1), F.softmax(b_nt, -1), 0.0)
    pos = p_nt > 0
    ce = torch.where(pos, -p_nt * torch.where(pos, logq_nt, 0.0), 0.0).sum(-1)
    return target + nkd_gamma * ce


def _cosine(a, b):
    """1 − cos(a, b) (Liger-Kernel's cosine-similarity distillation loss); an entry −inf
    in both rows is left out; a zero row has cosine 0 (D = 1)."""
    if a.shape[-1] == 1:  # cos of two numbers: the product of their signs (gradient 0,
        return 1.0 - torch.sign(a[..., 0]) * torch.sign(b[..., 0])  # not rounding noise)
    both = (a == float("-inf")) & (b == float("-inf"))
    a, b = a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    # normalised first (as F.normalize): no overflow of Σ a·b in low precision
    ha = torch.where(na > 0, a / torch.where(na > 0, na, 1.0), 0.0)
    hb = torch.where(nb > 0, b / torch.where(nb > 0, nb, 1.0), 0.0)
    return 1.0 - (ha * hb).sum(-1)


def divergence_ref(s, t, divergence, *, beta=0.5, alpha=0.1, taid_t=None, temperature=1.0,
                   labels=None, dkd_alpha=1.0, dkd_beta=8.0, nkd_gamma=1.5,
                   teacher_temperature=None):
    """Per-row D_n for logits s, t of shape [N, V] (already in the compute dtype); labels
    [N] (dkd and nkd; any valid class at ignored rows). a = s/τ, b = t/τ_t with τ_t =
    teacher_temperature (None: τ)."""
    a = s / temperature
    b = (t / (temperature if teacher_temperature is None else teacher_temperature)).detach()
    if divergence in ("dkd", "nkd"):
        y = labels.long().unsqueeze(-1)
        if divergence == "dkd":
            return _dkd(a, b, y, dkd_alpha, dkd_beta)
        return _nkd(s, t.detach(), a, b, y, nkd_gamma)
    if divergence == "cosine":
        return _cosine(a, b)
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
    dkd_alpha=1.0,
    dkd_beta=8.0,
    nkd_gamma=1.5,
    teacher_temperature=None,
    temperature_scaling="none",
):
    """docs/spec.md §1 `kd_loss`, computed in `compute_dtype` (no validation: the oracle).

    The loss comes back in `compute_dtype` so that a float64 oracle keeps its digits.
    Gradients flow to `student_logits` through autograd. temperature_scaling='tau_squared'
    multiplies the soft term by temperature² (the student's τ).
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    v = min(vs, vt) if vocab_mismatch == "truncate" else vs
    lead = student_logits.shape[:-1]
    s = student_logits[..., :v].reshape(-1, v).to(compute_dtype)
    t = teacher_logits[..., :v].reshape(-1, v).to(compute_dtype).detach()
    rows = torch.zeros(s.shape[0], dtype=compute_dtype, device=s.device)
    if labels is not None:
        y = labels.reshape(-1)
        valid = y != ignore_index
    else:
        y, valid = None, torch.ones_like(rows, dtype=torch.bool)
    if soft_label_weight != 0:
        d = divergence_ref(
            s, t, divergence, beta=beta, alpha=alpha, taid_t=taid_t, temperature=temperature,
            labels=None if y is None else torch.where(valid, y, 0), dkd_alpha=dkd_alpha,
            dkd_beta=dkd_beta, nkd_gamma=nkd_gamma, teacher_temperature=teacher_temperature,
        )
        if temperature_scaling == "tau_squared":
            d = d * (temperature * temperature)
        rows = rows + soft_label_weight * d
    if hard_label_weight != 0:
        ce = F.cross_entropy(s, torch.where(valid, y, 0), reduction="none")
        rows = rows + hard_label_weight * ce
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    return reduce_ref(rows, lead, reduction, normalizer, valid.sum())
