"""From k raw draws per row to the sparse estimate p̂: distinct ids and their weights.

Shared by both backends (O(N·k) work on the draws, plus a gather of the teacher's logits
at the drawn ids when the proposal differs from p). With c_i the number of draws of
class i (Σ c_i = k):

    proposal = p (τ_r = τ):   p̂_i = c_i / k                           (unbiased)
    proposal r = softmax(t/τ_r) ≠ p:
        p̂_i = c_i ρ_i / Σ_j c_j ρ_j,  ρ = p / r ∝ exp(t (1/τ − 1/τ_r))
    (self-normalised importance sampling: the normalisers of p and r cancel, so only the
    drawn logits are read; Σ p̂ = 1, biased by O(1/k), consistent as k → ∞).
"""

from __future__ import annotations

import torch

from .pytorch import BAD


def merge_draws(draws: torch.Tensor, x: torch.Tensor, inv_temp: float, inv_temp_r: float,
                width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, width] int32, weights [N, width] float32) from draws [N, k].

    draws: class ids, IGNORED (−1) in every slot of a skipped row, BAD (−2) in every slot
    of a row that is no distribution; x: [N, V] the teacher logits (read at the drawn ids
    only, for the importance weights). Distinct ids come ascending, then −1 with weight
    0; a skipped row is all padding; a BAD row is (0, NaN) then padding, so that a loss
    reading it is NaN (docs/spec.md, non-finite inputs)."""
    n, k = draws.shape
    d = draws.long()
    srt = torch.sort(d, dim=1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[:, 1:] = srt[:, 1:] != srt[:, :-1]
    run = first.long().cumsum(1) - 1  # the slot of each draw's class
    ids = torch.full_like(srt, -1).scatter_(1, run, srt)  # every draw of a run writes its id
    cnt = torch.zeros(n, k, dtype=torch.float64, device=d.device).scatter_add_(
        1, run, torch.ones_like(srt, dtype=torch.float64))
    ok = ids >= 0
    if inv_temp == inv_temp_r:
        w = torch.where(ok, cnt / k, 0.0)
    else:
        t = x.gather(1, ids.clamp_min(0)).double() * (inv_temp - inv_temp_r)
        lw = torch.where(ok, cnt.log() + t, float("-inf"))
        w = torch.where(ok.any(1, keepdim=True), torch.softmax(lw, 1), 0.0)
    bad = d[:, :1] == BAD
    ids = torch.where(bad, torch.where(first, 0, -1), ids)  # (0, -1, -1, ...)
    w = torch.where(bad, torch.where(first, torch.nan, 0.0), w)
    ids = torch.where(ok | bad, ids, -1)
    return ids[:, :width].to(torch.int32), w[:, :width].to(torch.float32)
