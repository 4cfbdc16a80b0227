"""The glue between the kernels of vocabulary-parallel `kd_loss`'s Triton and CUDA
launchers (kd/parallel_triton.py, kd/parallel_cuda.py; docs/vocab_parallel.md).

Both launchers run the three phases of the torch launcher (kd/parallel.py) with the
local work in kernels that share one buffer layout, per row, in the compute dtype CDT
(float32 for 16/32-bit students, float64 for float64 ones):

  stats [N, 8]  m_a, m_b, m_x, flag, Z'_a, Z'_b, Z'_x, b at a's local argmax
                (the stats kernel: local maxima, Σ e^{d − m} without one argmax, NaN/+inf)
  norm  [N, 9]  M_a, c_a, M_b, c_b, M_x, c_x, b_ref, G', P  (c = log1p(Z'): the global
                normalisers of phase 1; G' and P from phase 2, for the gradient kernel)
  flags [N]     int32: bit 0 a bad row (NaN/+inf somewhere, or no finite entry), bit 1
                this rank holds the global pivot j*
  part  [N, 4]  Σ d, G', P, x_y  (the partials kernel)

and the same collectives, the torch path's tensors and bytes (float64, through
kdkernels.parallel.all_reduce): phase 1's MAX and SUM here (`global_normalisers`),
phase 2's SUM here (`reduce_partials`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .._core.rowgrad import row_policy
from ..parallel import all_reduce
from .params import REV_KL, ZERO, KDParams

N_STATS = 8  # m_a, m_b, m_x, flag, Z'_a, Z'_b, Z'_x, b at a's local argmax
N_NORM = 9  # M_a, c_a, M_b, c_b, M_x, c_x, b_ref, G', P  (c = log1p(Z'))
N_PART = 4  # Σ d, G', P, x_y


class Dists(NamedTuple):
    """Which distributions the loss needs besides a = s/τ: b (the teacher's, or TAID's
    mix; not for soft_label_weight = 0) and x = s (the hard label's, when τ ≠ 1)."""

    use_b: bool
    hard: bool
    use_x: bool


def dists(prm: KDParams) -> Dists:
    hard = prm.hard_w != 0.0
    return Dists(prm.div != ZERO, hard, hard and prm.inv_temp != 1.0)


class Normalisers(NamedTuple):
    """Phase 1's result: lse [N, n_d] (float64, M + log1p(Z') per distribution used),
    bad [N], flags [N] int32 and norm [N, 9] (the kernels' compute dtype)."""

    lse: torch.Tensor
    bad: torch.Tensor
    flags: torch.Tensor
    norm: torch.Tensor


def global_normalisers(stats: torch.Tensor, code: int, d: Dists, group) -> Normalisers:
    """The glue of phase 1, from the kernels' [N, 8] local statistics. Two all-reduces:
    MAX of [N, n_d + 1] (maxima, flag); then each rank rescales its sums to the global
    max M (a rank whose max is M claims the row and keeps its argmax out; the others add
    it back: (1 + Z'_loc)·e^{m − M}) and SUM of [N, 2·n_d (+1 for reverse KL)] (those
    sums, the claim counts, b at the pivot)."""
    st = stats.to(torch.float64)
    dcols = [0] + ([1] if d.use_b else []) + ([2] if d.use_x else [])
    nd = len(dcols)
    loc_m, loc_z = st[:, dcols], st[:, [c + 4 for c in dcols]]
    mx = torch.cat([loc_m, st[:, 3:4]], 1)
    all_reduce(mx, "max", group)
    big_m = mx[:, :nd]
    bad = (mx[:, nd] > 0) | (big_m == -math.inf).any(-1)
    m_safe = torch.where(torch.isfinite(big_m), big_m, 0.0)
    claim = (loc_m == big_m) & torch.isfinite(big_m)
    lost = torch.where(loc_m == -math.inf, 0.0, loc_z + 1.0) * torch.exp(loc_m - m_safe)
    cols = [torch.where(claim, loc_z, lost), claim.to(torch.float64)]
    if code == REV_KL:  # b at the student's argmax, from the rank that holds it
        cols.append(torch.where(claim[:, :1], st[:, 7:8], 0.0))
    sm = torch.cat(cols, 1)
    all_reduce(sm, "sum", group)
    count = sm[:, nd:2 * nd]
    l1p = torch.log1p(sm[:, :nd] + (count - 1.0).clamp_min(0.0))
    lse = m_safe + l1p
    own = claim[:, 0] & (count[:, 0] == 1.0)  # one rank alone holds the row max
    norm = torch.zeros(stats.shape[0], N_NORM, dtype=torch.float64, device=stats.device)
    for i, c in enumerate(dcols):
        norm[:, 2 * c] = m_safe[:, i]
        norm[:, 2 * c + 1] = l1p[:, i]
    if d.use_b:
        b_ref = m_safe[:, 1]  # jsd / skew: log r relative to M_b
        if code == REV_KL:  # g = (a − M_a) − (b − b_{j*}): 0 at the pivot
            lse_b = lse[:, 1]
            b_j = torch.where(count[:, 0] == 1.0, sm[:, 2 * nd], lse_b)
            b_ref = torch.where(torch.isfinite(b_j), b_j, lse_b)
        norm[:, 6] = b_ref
    flags = bad.to(torch.int32) | (own.to(torch.int32) << 1)
    return Normalisers(lse, bad, flags, norm.to(stats.dtype))


def reduce_partials(part: torch.Tensor, prm: KDParams, d: Dists, nz: Normalisers, labels,
                    loss_out: torch.Tensor, group, parts=None) -> None:
    """The glue of phase 2, from the partials kernel's [N, 4]: the all-reduce SUM (float64),
    the per-row loss soft·max(Σ d, 0) + hard·(LSE_x − x_y) under the row policy into
    loss_out (its two addends into parts [N, 2] when given), and G', P into
    nz.norm[:, 7:9] for the gradient kernel."""
    part = part.to(torch.float64)
    all_reduce(part, "sum", group)
    loss = soft = prm.soft_w * part[:, 0].clamp_min(0.0)
    hard = torch.zeros_like(loss)
    if d.hard:
        lse_x = nz.lse[:, -1] if d.use_x else nz.lse[:, 0]  # (τ = 1: x = a)
        hard = prm.hard_w * (lse_x - part[:, 3])
        loss = loss + hard
    valid = labels != prm.ignore_index if labels is not None else None
    loss_out.copy_(row_policy(loss, nz.bad, valid))
    if parts is not None:
        parts[:, 0] = row_policy(soft, nz.bad, valid)
        parts[:, 1] = row_policy(hard, nz.bad, valid)
    nz.norm[:, 7:9] = part[:, 1:3].to(nz.norm.dtype)
