"""`kd_loss` over a vocabulary split across ranks: the two-phase torch launcher
(docs/vocab_parallel.md).

Each rank holds columns [start, stop) of s and t ([N, W] locally). Per block of rows
(the same blocks on every rank: sized from the widest shard), in float64:

Phase 1, normalisers. For every distribution the loss needs (a = s/τ; b = t/τ, or
TAID's mix (1−λ)a + λb; the untempered x = s for the hard label when τ ≠ 1): the local
row max m over the finite-or-−inf entries and a flag for NaN/+inf entries, then one
all-reduce MAX of [rows, ·] gives the global max M and the row's bad flag. Then
Σ e^{d − M} over the local columns, leaving out the local argmax on a rank whose max
is M (a "claimant"), and the claimant count: one all-reduce SUM gives
Z' = Σ_{v≠j*} e^{d_v − M} (+ count − 1 when the max is tied across ranks) and
LSE = M + log1p(Z'). So log q at the argmax j* is −log1p(Z'), exact even when q
rounds to 1, as in the kernels.

Phase 2, partial sums. With log q = a − LSE_a, log p = b − LSE_b: the divergence's
Σ d, and for the divergences whose gradient is q(g − ḡ) the sums G' = Σ_{v≠j*} q g and
P = q_{j*} g_{j*} (only the owner of j* has a P term); the hard label's x_y on the rank
that owns the label. One all-reduce SUM.

Phase 3, the local gradient (no communication): forward KL / TAID q − p; the others
q(g − ḡ) with ḡ = G' + P; the hard label softmax(x) − onehot(y). The pivot j* (the
student's argmax, when one rank alone holds the row max) is written from the closed
forms that keep their digits where q_{j*} rounds to 1: (q − p)_{j*} = Σ'p − Σ'q =
expm1(log q_{j*}) − expm1(log p_{j*}), q_{j*}(g_{j*} − ḡ) = q_{j*}(Σ'q·g_{j*} − G'),
softmax_y − 1 = expm1(log softmax_y) (Σ' = the sum over the other classes, −expm1 of
the log). tvd's |p − q| at j* is Σ'q − Σ'p the same way, so its sign is exact too.

Communication per row: (n_d + 1) + 2·n_d (+ 1 for reverse KL: b at the student's argmax,
for its shifted g) + 4 float64 numbers in three all-reduces, with n_d ≤ 3 distributions:
at most 18 × 8 bytes per row and step, independent of V.
"""

from __future__ import annotations

import math

import torch

from .._core.backend import BackendUnavailableError, device_reason, requested
from .._core.chunking import chunk_rows
from .._core.rowgrad import row_policy
from ..parallel import Shards, all_reduce
from .params import COSINE, DKD, FWD_KL, NKD, REV_KL, TAID, TVD, ZERO, KDParams
from .pytorch import _pair_terms, _xlog

_NEG_INF = float("-inf")


def _masked(d):
    """(d with NaN/+inf entries as −inf, [R] flag: the row had such an entry)."""
    bad = torch.isnan(d) | (d == math.inf)
    return d.masked_fill(bad, _NEG_INF), bad.any(-1)


def kd_fwd_vocab_parallel(s, scale, loss_out, grad_out, backend, labels, t, prm: KDParams,
                          sh: Shards, parts=None) -> None:
    """Fill loss_out[N] (float32, unscaled per-row losses, the same on every rank) and, if
    grad_out is non-empty, grad_out[N, W] = scale·∂L_n/∂s at this rank's columns.

    s, t: [N, W] local logits (W = sh.stop − sh.start); labels: [N] global ids or None;
    scale: 0-dim float tensor. Every rank of sh.group must call it with the same N.
    parts: None or [N, 2] float32, each row's addends soft_w·D_n, hard_w·CE_n.
    """
    if prm.div in (DKD, NKD, COSINE):  # torch only: kd_loss refuses the others first
        from .parallel_target import kd_fwd_vocab_parallel_target

        if backend != "torch":
            raise BackendUnavailableError(f"divergence code {prm.div} runs vocabulary-"
                                          "parallel on backend='torch' only")
        return kd_fwd_vocab_parallel_target(s, scale, loss_out, grad_out, labels, t, prm, sh,
                                            parts)
    if backend == "triton":  # the same three phases, local work in Triton kernels
        from .parallel_triton import kd_fwd_vocab_parallel_triton

        return kd_fwd_vocab_parallel_triton(s, scale, loss_out, grad_out, labels, t, prm, sh,
                                            parts)
    if backend == "cuda":  # the same three phases, local work in CUDA kernels
        from .parallel_cuda import kd_fwd_vocab_parallel_cuda

        return kd_fwd_vocab_parallel_cuda(s, scale, loss_out, grad_out, labels, t, prm, sh,
                                          parts)
    n, _ = s.shape
    f64 = torch.float64
    want_grad = grad_out.numel() > 0
    code, it, w = prm.div, prm.inv_temp, prm.w
    it_t = prm.teacher_inv_temp
    use_b = code != ZERO
    use_x = prm.hard_w != 0.0 and it != 1.0
    scale64 = scale.to(device=s.device, dtype=f64)
    rows = chunk_rows(sh.max_width, itemsize=8)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        x, bad_x = _masked(s[r0:r1].to(f64))
        a = x * it if it != 1.0 else x
        dists, bad_loc = [a], bad_x
        if use_b:
            b = t[r0:r1].to(f64)
            if it_t != 1.0:
                b = b * it_t
            if code == TAID:  # r = softmax((1−λ) a + λ b): a NaN in a or b reaches the mix
                b = (1 - w) * s[r0:r1].to(f64) * it + w * b
            b, bad_b = _masked(b)
            dists.append(b)
            bad_loc = bad_loc | bad_b
        if use_x:
            dists.append(x)
        # --- phase 1: global max (and the bad flag), then Σ' exp and the claimants
        loc_max = [d.amax(-1) for d in dists]
        mx = torch.stack(loc_max + [bad_loc.to(f64)], -1)
        all_reduce(mx, "max", sh.group)
        big_m, bad = mx[:, :-1], mx[:, -1] > 0
        bad = bad | (big_m == _NEG_INF).any(-1)
        m_safe = torch.where(torch.isfinite(big_m), big_m, 0.0)
        sums, claims, argm = [], [], []
        for i, d in enumerate(dists):
            claim = (loc_max[i] == big_m[:, i]) & torch.isfinite(big_m[:, i])
            j = d.argmax(-1, keepdim=True)
            e = torch.exp(d - m_safe[:, i:i + 1])
            e.scatter_(-1, j, torch.where(claim.unsqueeze(-1), 0.0, e.gather(-1, j)))
            sums.append(e.sum(-1))
            claims.append(claim)
            argm.append(j)
        cols = sums + [c.to(f64) for c in claims]
        if code == REV_KL:  # b at the student's argmax, from the rank that holds it
            cols.append(torch.where(claims[0], b.gather(-1, argm[0]).squeeze(-1), 0.0))
        sm = torch.stack(cols, -1)
        all_reduce(sm, "sum", sh.group)
        nd = len(dists)
        z_rest = sm[:, :nd] + (sm[:, nd:2 * nd] - 1.0).clamp_min(0.0)
        l1p = torch.log1p(z_rest)
        lse = m_safe + l1p

        def log_softmax(i, d, m=m_safe, l1p=l1p):  # (d − M) − log1p(Z'): never M + tiny
            return (d - m[:, i:i + 1]).sub_(l1p[:, i:i + 1])  # rounded to M
        # the student's argmax j*, when one rank alone holds the row max (a tie across
        # ranks means q_{j*} <= 1/2: nothing to protect)
        own = claims[0] & (sm[:, nd] == 1.0)
        jp = argm[0]
        logq = log_softmax(0, a)
        q = logq.exp()
        logq_j = logq.gather(-1, jp)
        valid = y_loc = owns_y = None
        if labels is not None:
            y = labels[r0:r1].long()
            valid = y != prm.ignore_index
            owns_y = valid & (y >= sh.start) & (y < sh.stop)
            y_loc = torch.where(owns_y, y - sh.start, 0).unsqueeze(-1)
        # --- phase 2: partial sums of the divergence, ḡ = G' + P, and x_y
        part = torch.zeros(r1 - r0, 4, dtype=f64, device=s.device)
        g = None
        if use_b:
            logp = log_softmax(1, b)
            p = logp.exp()
            logp_j = logp.gather(-1, jp)
            if code in (FWD_KL, TAID):
                d_el = _xlog(p, logp, logq)
            elif code == REV_KL:
                d_el = _xlog(q, logq, logp)
                # g = (a − a_{j*}) − (b − b_{j*}): one rounding of a difference of inputs,
                # 0 at the pivot (any row constant would do where no rank owns one)
                b_j = sm[:, 2 * nd:2 * nd + 1]
                b_j = torch.where(sm[:, nd:nd + 1] == 1.0, b_j, lse[:, 1:2])  # one claimant
                b_j = torch.where(torch.isfinite(b_j), b_j, lse[:, 1:2])
                g = torch.where(q > 0, (a - m_safe[:, 0:1]).sub_(b - b_j), 0.0)
            elif code == TVD:
                diff = p - q  # at j*: Σ'q − Σ'p (1 − 1 when both peak there)
                piv_diff = torch.expm1(logp_j) - torch.expm1(logq_j)
                diff.scatter_(-1, jp, torch.where(own.unsqueeze(-1), piv_diff,
                                                  diff.gather(-1, jp)))
                d_el = diff.abs().mul_(0.5)
                g = torch.sign(diff).add_(1.0).mul_(-0.5)
            else:
                d_el, g = _pair_terms(code, logq, q, logp, p, w, None, None, None)
            part[:, 0] = d_el.sum(-1)
            if g is not None:
                qg = q * g
                qg_j = qg.gather(-1, jp)
                # G' summed without the pivot, never as total − q_{j*} g_{j*}: that
                # cancels where q_{j*} rounds to 1 and G' is ~1e-50
                part[:, 1] = qg.scatter(-1, jp, torch.where(own.unsqueeze(-1), 0.0, qg_j)).sum(-1)
                part[:, 2] = torch.where(own, qg_j.squeeze(-1), 0.0)
        if prm.hard_w != 0.0:
            part[:, 3] = torch.where(owns_y, x.gather(-1, y_loc).squeeze(-1), 0.0)
        all_reduce(part, "sum", sh.group)
        loss = soft = prm.soft_w * part[:, 0].clamp_min(0.0)
        lse_x = lse[:, -1] if use_x else lse[:, 0]  # (τ = 1: x = a)
        hard = torch.zeros_like(loss)
        if prm.hard_w != 0.0:
            hard = prm.hard_w * (lse_x - part[:, 3])
            loss = loss + hard
        loss_out[r0:r1] = row_policy(loss, bad, valid)
        if parts is not None:
            parts[r0:r1, 0] = row_policy(soft, bad, valid)
            parts[r0:r1, 1] = row_policy(hard, bad, valid)
        if not want_grad:
            continue
        # --- phase 3: the local gradient
        c_soft = prm.soft_w * it * scale64
        c_hard = prm.hard_w * scale64
        if code in (FWD_KL, TAID):
            out = (q - p).mul_(c_soft)
            piv = torch.expm1(logq_j) - torch.expm1(logp_j)
        elif g is not None:
            g_bar = (part[:, 1] + part[:, 2]).unsqueeze(-1)
            out = (g - g_bar).mul_(q).mul_(c_soft)
            piv = (-torch.expm1(logq_j) * g.gather(-1, jp) - part[:, 1:2]) * logq_j.exp()
        else:
            out = torch.zeros_like(a)
            piv = torch.zeros_like(logq_j)
        piv = piv * c_soft
        if prm.hard_w != 0.0:
            logsm = log_softmax(nd - 1, x) if use_x else logq
            out.add_(logsm.exp() * c_hard)
            out.scatter_add_(-1, y_loc, torch.where(owns_y, -c_hard, 0.0).unsqueeze(-1))
            logsm_j = logsm.gather(-1, jp)
            at_y = owns_y.unsqueeze(-1) & (y_loc == jp)
            piv = piv + c_hard * torch.where(at_y, torch.expm1(logsm_j), logsm_j.exp())
        out.scatter_(-1, jp, torch.where(own.unsqueeze(-1), piv, out.gather(-1, jp)))
        out = torch.where(bad.unsqueeze(-1), torch.nan, out)
        if valid is not None:
            out.masked_fill_(~valid.unsqueeze(-1), 0.0)
        grad_out[r0:r1] = out


def vocab_parallel_backend(backend, device, op: str = "kd_loss") -> str:
    """The backend vocabulary-parallel `kd_loss` (or `topk_kd_loss`, `op`) runs: 'torch',
    'triton' or 'cuda'.

    'auto' (and KDKERNELS_BACKEND=auto) takes 'torch' on every device; an explicit
    'triton' runs where the triton backend can (CUDA tensors, or TRITON_INTERPRET=1 on
    the CPU), an explicit 'cuda' where the CUDA extension can (CUDA tensors, the module
    built, a device), and both raise BackendUnavailableError with the reason elsewhere.
    The checks are local, so call it before any collective."""
    name, _ = requested(backend)
    if name in ("triton", "cuda"):
        why = device_reason(name, device)
        if why is not None:
            raise BackendUnavailableError(
                f"{op}: backend={name!r} cannot run with vocab_parallel: {why}")
        return name
    return "torch"
