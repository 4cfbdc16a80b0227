"""Vocabulary-parallel `kd_loss` for the divergences that read the row's label (dkd, nkd)
or whole-row sums (cosine): the two-phase torch launcher (docs/vocab_parallel.md).

Triton and CUDA vocabulary-parallel kernels cover the softmax-KL divergences only:
`check_vp_divergence` refuses these three there, before any collective.
"""

from __future__ import annotations

import math

import torch

from .._core.backend import BackendUnavailableError
from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from ..parallel import Shards, all_reduce
from .decoupled import _softplus, _xlog, binary_kl, sigmoid_diff
from .params import COSINE, NKD, KDParams

_NEG_INF = float("-inf")

# the divergences whose vocabulary-parallel form runs on backend 'torch' only
TORCH_ONLY = ("dkd", "nkd", "cosine")


def check_vp_divergence(op: str, divergence: str, backend: str) -> None:
    """BackendUnavailableError when `backend` ('triton' or 'cuda', resolved) has no
    vocabulary-parallel kernel for `divergence`. Local: call it before any collective."""
    if divergence in TORCH_ONLY and backend != "torch":
        raise BackendUnavailableError(
            f"{op}: divergence={divergence!r} runs vocabulary-parallel on backend='torch' "
            f"only (its label column and row sums are exchanged by the torch two-phase "
            f"launcher; the {backend} vocabulary-parallel kernels cover the softmax-KL "
            "divergences); pass backend='torch' or 'auto'")


# --- the torch launcher ----------------------------------------------------------------

def kd_fwd_vocab_parallel_target(s, scale, loss_out, grad_out, labels, t, prm: KDParams,
                                 sh: Shards, parts=None) -> None:
    """parallel.kd_fwd_vocab_parallel's contract (float64 per-row statistics, three
    all-reduces per row block) for prm.div in (DKD, NKD, COSINE); parts: None or [N, 2]
    float32, each row's addends soft_w·D_n, hard_w·CE_n."""
    fn = _cosine_block if prm.div == COSINE else _decoupled_block
    want_grad = grad_out.numel() > 0
    scale64 = scale.to(device=s.device, dtype=torch.float64)
    n = s.shape[0]
    rows = chunk_rows(sh.max_width, itemsize=8)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        y = labels[r0:r1].long() if labels is not None else None
        out = fn(s[r0:r1], t[r0:r1], y, prm, sh, scale64, loss_out[r0:r1], want_grad,
                 None if parts is None else parts[r0:r1])
        if want_grad:
            grad_out[r0:r1] = out


def _masked(d):
    """(d with NaN/+inf entries as −inf, [R] flag: the row had such an entry)."""
    bad = torch.isnan(d) | (d == math.inf)
    return d.masked_fill(bad, _NEG_INF), bad.any(-1)


def _target(y, prm: KDParams, sh: Shards, width: int):
    """(valid [R], in range [R], owns [R], [R, W] bool: the local column of the label)."""
    valid = y != prm.ignore_index
    in_range = (y >= 0) & (y < sh.v)
    owns = valid & (y >= sh.start) & (y < sh.stop)
    y_loc = torch.where(owns, y - sh.start, 0).unsqueeze(-1)
    at_y = torch.zeros(y.shape[0], width, dtype=torch.bool, device=y.device)
    at_y.scatter_(-1, y_loc, owns.unsqueeze(-1))
    return valid, in_range, owns, y_loc, at_y


def _sum_without_argmax(d, m_glob):
    """(Σ e^{d − M} over the local columns, leaving out the local argmax on a claimant
    rank (its max is the global M); the claim [R] bool; the local argmax [R, 1])."""
    loc_max = d.amax(-1)
    claim = (loc_max == m_glob) & torch.isfinite(m_glob)
    j = d.argmax(-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m_glob), m_glob, 0.0).unsqueeze(-1)
    e = torch.exp(d - m_safe)
    e.scatter_(-1, j, torch.where(claim.unsqueeze(-1), 0.0, e.gather(-1, j)))
    return e.sum(-1), claim, j


def _write(loss_out, parts, soft, hard, bad, valid):
    loss_out.copy_(row_policy(soft + hard, bad, valid))
    if parts is not None:
        parts[:, 0] = row_policy(soft, bad, valid)
        parts[:, 1] = row_policy(hard, bad, valid)


def _decoupled_block(s, t, y, prm, sh, scale64, loss_out, want_grad, parts):
    f64 = torch.float64
    nkd, it, it_t, w = prm.div == NKD, prm.inv_temp, prm.teacher_inv_temp, prm.w
    sep_x, sep_u = it != 1.0 and (nkd or prm.hard_w != 0.0), it_t != 1.0 and nkd
    valid, in_range, owns, y_loc, at_y = _target(y, prm, sh, s.shape[1])
    x, bad_x = _masked(s.to(f64))
    u, bad_u = _masked(t.to(f64))
    dists = [x * it if it != 1.0 else x, u * it_t if it_t != 1.0 else u]  # a, b (, x, u)
    dists += [x] * sep_x + [u] * sep_u
    nts = [d.masked_fill(at_y, _NEG_INF) for d in dists]  # the non-target classes
    # --- MAX: the non-target maxima, the label's column (from its owner), the bad flag
    ys = [torch.where(owns, d.gather(-1, y_loc).squeeze(-1), _NEG_INF) for d in dists]
    mx = torch.stack([d.amax(-1) for d in nts] + ys + [(bad_x | bad_u).to(f64)], -1)
    all_reduce(mx, "max", sh.group)
    nd = len(dists)
    big_m, d_y = mx[:, :nd], mx[:, nd:2 * nd]
    bad = (mx[:, -1] > 0) | ~in_range
    bad |= ((big_m[:, :2] == _NEG_INF) & (d_y[:, :2] == _NEG_INF)).any(-1)  # no finite s, t
    # --- SUM: Σ' e^{d − M} and the claimants: L = log Σ_N e^{d − M} = log1p(Z')
    sums = [_sum_without_argmax(d, big_m[:, i]) for i, d in enumerate(nts)]
    sm = torch.stack([p[0] for p in sums] + [p[1].to(f64) for p in sums], -1)
    all_reduce(sm, "sum", sh.group)
    has = torch.isfinite(big_m)
    lse = torch.where(has, torch.log1p(sm[:, :nd] + (sm[:, nd:] - 1.0).clamp_min(0.0)),
                      _NEG_INF)
    m_safe = torch.where(has, big_m, 0.0)
    z = (d_y - m_safe) - lse  # the binary logits of p_y

    def log_hat(i):  # log p̂ on this rank's non-target columns
        rel = nts[i] - m_safe[:, i:i + 1]
        return torch.where(has[:, i:i + 1], rel - torch.where(has, lse, 0.0)[:, i:i + 1],
                           _NEG_INF)

    za, zb = z[:, 0], z[:, 1]
    zx = z[:, 2] if sep_x else za
    zu = z[:, -1] if sep_u else zb
    lq, lp = log_hat(0), log_hat(1)
    q, p = lq.exp(), lp.exp()
    # --- SUM: the non-target term (NCKD, or nkd's −Σ p̂ log q̂ ≥ 0)
    nt_sum = (torch.where(p > 0, p * -lq, 0.0) if nkd else _xlog(p, lp, lq)).sum(-1)
    all_reduce(nt_sum, "sum", sh.group)
    nt = torch.where(torch.isfinite(lse[:, 1]), nt_sum, 0.0)
    p1_y = torch.sigmoid(zu)
    if nkd:
        d_row = torch.where(p1_y > 0, p1_y * _softplus(-zx), 0.0) + w * nt
    else:
        d_row = w * binary_kl(zb, za) + (1.0 - w) * nt
    soft = prm.soft_w * d_row.clamp_min(0.0)
    hard = prm.hard_w * _softplus(-zx) if prm.hard_w != 0.0 else torch.zeros_like(soft)
    _write(loss_out, parts, soft, hard, bad, valid)
    if not want_grad:
        return None
    # --- the local gradient (no communication); the pivot k* from closed forms:
    # (q̂ − p̂)_{k*} = expm1(log q̂_{k*}) − expm1(log p̂_{k*})
    c_soft = (prm.soft_w * it * scale64).unsqueeze(-1)
    c_h = prm.hard_w * scale64
    if nkd:
        c_h = c_h + prm.soft_w * scale64 * p1_y
        coef_q, coef_diff, g_y = 0.0, w, torch.zeros_like(za)
    else:
        delta = sigmoid_diff(za, zb)
        coef_q, coef_diff, g_y = -(w * delta).unsqueeze(-1), 1.0 - w, w * delta
    rest_x = torch.sigmoid(-zx).unsqueeze(-1)  # 1 − softmax(s)_y
    q1 = log_hat(2).exp() if sep_x else q
    c_h = c_h.unsqueeze(-1) if isinstance(c_h, torch.Tensor) and c_h.dim() else c_h
    out = ((q - p) * coef_diff + q * coef_q) * c_soft + q1 * rest_x * c_h
    kp = sums[0][2]
    own = sums[0][1] & (sm[:, nd] == 1.0)  # this rank holds the row's only pivot
    diff_k = torch.expm1(lq.gather(-1, kp)) - torch.expm1(lp.gather(-1, kp))
    piv = (diff_k * coef_diff + q.gather(-1, kp) * coef_q) * c_soft
    piv = piv + q1.gather(-1, kp) * rest_x * c_h
    out.scatter_(-1, kp, torch.where(own.unsqueeze(-1), piv, out.gather(-1, kp)))
    at = g_y.unsqueeze(-1) * c_soft - rest_x * c_h
    out = torch.where(at_y, at, out)
    out = torch.where(bad.unsqueeze(-1), torch.nan, out)
    return out.masked_fill_(~valid.unsqueeze(-1), 0.0)


def _cosine_block(s, t, y, prm, sh, scale64, loss_out, want_grad, parts):
    f64 = torch.float64
    it, hard = prm.inv_temp, prm.hard_w != 0.0
    x, bad_x = _masked(s.to(f64))
    u, bad_u = _masked(t.to(f64))
    a, b = x * it, u * prm.teacher_inv_temp
    inf_a, inf_b = a == _NEG_INF, b == _NEG_INF
    bad_loc = bad_x | bad_u | (inf_a ^ inf_b).any(-1)
    a0, b0 = a.masked_fill(inf_a, 0.0), b.masked_fill(inf_b, 0.0)
    valid = owns = y_loc = None
    if y is not None:
        valid, _, owns, y_loc, _ = _target(y, prm, sh, s.shape[1])
    x_y = (torch.where(owns, x.gather(-1, y_loc).squeeze(-1), _NEG_INF) if hard
           else torch.full_like(bad_loc, _NEG_INF, dtype=f64))
    # --- MAX: max |a|, max |b|, the student's max, x_y (from its owner), the bad flag
    mx = torch.stack([a0.abs().amax(-1), b0.abs().amax(-1), x.amax(-1), x_y,
                      bad_loc.to(f64)], -1)
    all_reduce(mx, "max", sh.group)
    bad = (mx[:, 4] > 0) | (mx[:, 2] == _NEG_INF)
    r_a = torch.where(mx[:, 0] > 0, 1.0 / mx[:, 0], 0.0).unsqueeze(-1)
    r_b = torch.where(mx[:, 1] > 0, 1.0 / mx[:, 1], 0.0).unsqueeze(-1)
    # --- SUM: Σ (a/m_a)², Σ (b/m_b)² (and the hard label's Σ' e^{x − M} and claimants)
    cols = [(a0 * r_a).square().sum(-1), (b0 * r_b).square().sum(-1)]
    if hard:
        z_x, claim, jx = _sum_without_argmax(x, mx[:, 2])
        cols += [z_x, claim.to(f64)]
    sm = torch.stack(cols, -1)
    all_reduce(sm, "sum", sh.group)
    s_a = torch.where(sm[:, 0:1] > 0, sm[:, 0:1].rsqrt(), 0.0)
    s_b = torch.where(sm[:, 1:2] > 0, sm[:, 1:2].rsqrt(), 0.0)
    ha, hb = a0 * r_a * s_a, b0 * r_b * s_b
    delta = hb - ha
    # --- SUM: ‖b̂ − â‖²
    sq = delta.square().sum(-1)
    all_reduce(sq, "sum", sh.group)
    zero = (mx[:, 0] == 0) | (mx[:, 1] == 0)
    d = torch.where(zero, 1.0, 0.5 * sq)
    soft, ce = prm.soft_w * d, torch.zeros_like(d)
    if hard:
        m_x = torch.where(bad, 0.0, mx[:, 2])
        l1p = torch.log1p(sm[:, 2] + (sm[:, 3] - 1.0).clamp_min(0.0))
        ce = prm.hard_w * ((m_x + l1p) - mx[:, 3])
    _write(loss_out, parts, soft, ce, bad, valid)
    if not want_grad:
        return None
    # ∂D/∂a = −(δ + D·â)/‖a‖
    out = (delta + d.unsqueeze(-1) * ha) * (-prm.soft_w * it * scale64 * r_a * s_a)
    if hard:  # + softmax(s) − onehot(y); at y as expm1(log softmax_y) where y is the
        # row's only pivot (softmax_y − 1 would be 1 − 1)
        logsm = (x - m_x.unsqueeze(-1)) - l1p.unsqueeze(-1)
        h = logsm.exp()
        lsm_y = logsm.gather(-1, y_loc)
        pivot_y = claim.unsqueeze(-1) & (sm[:, 3:4] == 1.0) & (jx == y_loc)
        h_y = torch.where(pivot_y, torch.expm1(lsm_y), lsm_y.exp() - 1.0)
        h.scatter_(-1, y_loc, torch.where(owns.unsqueeze(-1), h_y, h.gather(-1, y_loc)))
        out = out + h * (prm.hard_w * scale64)
    out = torch.where(bad.unsqueeze(-1), torch.nan, out)
    return out if valid is None else out.masked_fill_(~valid.unsqueeze(-1), 0.0)
