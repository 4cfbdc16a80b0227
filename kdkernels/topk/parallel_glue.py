"""The glue between the two kernels of vocabulary-parallel `topk_kd_loss`'s Triton and
CUDA launchers (topk/parallel_triton.py, topk/parallel_cuda.py; docs/vocab_parallel.md).

Both launchers' gather kernels leave the student's raw logits at the indices this rank
owns (0 at the others) in the float64 SUM buffer sel [N, k (+1)] and, for the bucket,
the local tail statistics tstat [N, 3] (tail max m, NaN/+inf flag, Σ e^{a − m}) in the
compute dtype CDT. `entry_step` then runs the collectives — the torch launcher's
tensors and bytes (topk/parallel.py): bucket, the all-reduce MAX of (m, flag) [N, 2],
each rank's sum rescaled to the global tail max M (Σ·e^{m − M}) into sel's last
column; the all-reduce SUM of sel — and the O(N·k) entry math in float64 with the torch
launcher's helpers (`teacher_side`, `entry_logs`, `loss_and_r`), and gives the gradient
kernels their inputs (`GradInputs`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..parallel import Shards, all_reduce
from .parallel import entry_logs, loss_and_r, teacher_side

_NEG_INF = float("-inf")


class GradInputs(NamedTuple):
    """What the gradient kernels read, per row: mode [N] int32 (0 the gradient, 1 a bad
    row: NaN, 2 an ignored row: 0), r [N, k (+1)] (CDT, contiguous: scale·∂L/∂a per entry,
    then the tail's for the bucket), tail [N, 2] (CDT: the tail's max M and log Σ e^{a − M};
    None for renormalize)."""

    mode: torch.Tensor
    r: torch.Tensor
    tail: torch.Tensor | None


def entry_step(sel, tstat, idx, vals, labels, scale, loss_out, code: int, w: float,
               inv_temp: float, logprobs: bool, bucket: bool, ignore_index: int, sh: Shards,
               soft_w: float, want_grad: bool, cdt) -> GradInputs | None:
    """The collectives and the entry math between the gather and gradient kernels: the
    per-row losses into loss_out (float32, the same on every rank) and, when want_grad,
    the gradient kernels' inputs (else None). sel, tstat: the gather kernel's buffers
    (tstat unused for renormalize); idx [N, k] global ids (−1 = padding); vals [N, k]."""
    f64 = torch.float64
    k = idx.shape[1]
    pad = idx < 0
    u, entries, bad = teacher_side(vals, pad, inv_temp, logprobs, bucket)
    lse_tail = full = m_safe = c_tail = None
    if bucket:
        mx = tstat[:, :2].to(f64, copy=True)  # (a float64 tstat must keep the local max)
        all_reduce(mx, "max", sh.group)
        m_tail = mx[:, 0:1]
        m_safe = torch.where(torch.isfinite(m_tail), m_tail, 0.0)
        m_loc = tstat[:, 0:1].to(f64)
        sel[:, k:] = torch.where(m_loc == _NEG_INF, 0.0,
                                 tstat[:, 2:3].to(f64) * torch.exp(m_loc - m_safe))
        all_reduce(sel, "sum", sh.group)
        empty = m_tail == _NEG_INF
        c_tail = torch.where(empty, 0.0, torch.log(sel[:, k:]))
        lse_tail = torch.where(empty, _NEG_INF, m_safe + c_tail)
        bad = bad | (mx[:, 1] > 0)
        full = (~pad).sum(1, keepdim=True) == sh.v  # every class selected: empty tail
    else:
        all_reduce(sel, "sum", sh.group)
    a_sel = sel[:, :k] * inv_temp if inv_temp != 1.0 else sel[:, :k]
    lp, lq, bad = entry_logs(u, a_sel, pad, entries, bad, lse_tail, full)
    scale64 = scale.to(device=sel.device, dtype=f64)
    has = torch.ones_like(entries) if bucket else entries
    loss, valid, r = loss_and_r(code, w, lp, lq, has, bad, labels, ignore_index, want_grad,
                                scale64, inv_temp, soft_w)
    loss_out.copy_(loss)
    if not want_grad:
        return None
    mode = torch.where(bad, 1, 0).to(torch.int32)
    if valid is not None:
        mode = torch.where(valid, mode, 2).to(torch.int32)
    tail = torch.cat([m_safe, c_tail], 1).to(cdt).contiguous() if bucket else None
    return GradInputs(mode, r.to(cdt).contiguous(), tail)
