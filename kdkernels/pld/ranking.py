"""The ranking step of the PLD kernels (shared by the triton and cuda backends).

The order π of a row (pytorch.py): the label first (when labels are given and the row
is not ignored), then every other class by descending teacher logit, ties by lower class
index. The kernels need only its first K positions, and, for the unranked tail, a way to
tell whether a class is ranked without a list: every ranked class but the label is a
prefix of the teacher order, so class v is ranked iff

    v == label  or  (t_v, −v) ≥ (t_thr, −thr)   (lexicographic; −0.0 ties +0.0)

where thr is the last teacher-ordered class of the ranking (−1 when there is none).

Ranking source: the backend's own `topk_select` kernel where it takes the input (K <= 256,
16/32-bit floats); otherwise `topk_select`'s PyTorch order: torch.topk over unique int64
keys, or for K >= V/4 (up to a full ranking, K = V) a library sort of those keys
(torch.sort: a segmented radix sort on a GPU). The caller passes row blocks so that the
[R, V] key temporaries stay bounded.
"""

from __future__ import annotations

import torch

from ..select.ops import TOPK
from ..select.pytorch import top_indices


def _label_first(top: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Put y[r] first in top[r] (moved if present, else prepended and the last dropped).

    top: [R, K] ranking prefix of all classes; y: [R] int64 -> [R, K].
    """
    r, k = top.shape
    j = torch.arange(k, device=top.device).expand(r, k)
    hit = top == y.unsqueeze(1)
    pos = torch.where(hit, j, k).amin(1, keepdim=True)  # position of y in top, or k
    src = torch.where(j <= pos, j - 1, j).clamp_min(0)
    out = top.gather(1, src)
    out[:, 0] = y
    return out


def rank_rows(t: torch.Tensor, labels: torch.Tensor | None, k: int, ignore_index: int,
              backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """(rank [R, K] int64, thr [R] int64) for teacher rows t [R, V].

    rank[r] = the first K classes of row r's PLD order; thr[r] = the last class of
    rank[r] that is there by teacher order (not as the label), −1 if none. Ignored rows
    (labels == ignore_index) keep the plain teacher order.
    """
    r = t.shape[0]
    if backend != "torch" and TOPK.reason(backend, t.device, {"dtype": t.dtype, "k": k}) is None:
        top = torch.empty(r, k, dtype=torch.int64, device=t.device)
        TOPK(backend, t, k, torch.empty(r, k, dtype=t.dtype, device=t.device), top)
    else:  # torch.topk over unique keys, or a sort of them when K is a sizeable part of V
        top = top_indices(t, k)
    if labels is None:
        return top, top[:, -1].clone()
    y = labels.long()
    y = torch.where(y == ignore_index, top[:, 0], y)
    rank = _label_first(top, y)
    last = rank[:, -1]
    return rank, torch.where(last == y, -1, last)
