"""The descending orders ULD reads (shared by the torch and triton backends).

Student: values and class indices of its K largest logits, descending, **equal values by
lower class index**. The order decides which class receives which sorted position's
sign in the gradient (the loss itself does not depend on it), so every backend uses
this one rule, the order of a stable descending sort (the float64 oracle's).
Teacher: values only (the loss reads its sorted values, never its classes).

Logits are sorted, not probabilities: softmax(x/τ) is increasing in x, so the order is
the probabilities' order, and sorting the input dtype (bf16: 16-bit keys) is cheaper.

Where it comes from (`student_order`):
- K = V: `torch.sort` (on a GPU a segmented radix sort, stable at no extra cost);
- K < V: the backend's own `topk_select` kernel where it takes the input (K <= 256,
  16/32-bit floats), else `topk_select`'s PyTorch order (`torch.topk` over unique int64
  keys, or a sort of them for K >= V/4).
On the CPU a stable sort costs twice an unstable one and the keys' top-k ten times
`torch.topk` over the values, so there a fast order comes first (`exact=False`): NumPy's
vectorised sorts for K = V (a third of `torch.sort`'s time for the teacher's values,
two thirds for the student's argsort; rows split over `torch.get_num_threads()` threads,
NumPy releasing the GIL), `torch.topk` for K < V. Then `stable_order` redoes only the
rows where the order among equal values could change the gradient (`ambiguous_rows`):
equal student values at sorted positions of different signs, or at position K with an
equal value left outside the top K. (float32 logits of a 128k vocabulary hold a hundred
equal pairs per row; equal pairs whose positions share a sign, almost all of them, need
nothing.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..select.ops import TOPK
from ..select.pytorch import top_indices

_NEG_INF = float("-inf")
_POOL: dict[int, ThreadPoolExecutor] = {}


def _numpy_rows(fn, x: torch.Tensor) -> np.ndarray:
    """fn (a NumPy row-wise op keeping the shape) applied to the CPU tensor x [R, V], its
    rows split over torch.get_num_threads() threads."""
    a = (x if x.dtype in (torch.float32, torch.float64) else x.float()).detach().numpy()
    workers = min(torch.get_num_threads(), a.shape[0])
    if workers <= 1:
        return fn(a)
    pool = _POOL.get(workers) or _POOL.setdefault(workers, ThreadPoolExecutor(workers))
    cuts = np.linspace(0, a.shape[0], workers + 1).astype(int)
    parts = list(pool.map(lambda i: fn(a[cuts[i]:cuts[i + 1]]), range(workers)))
    return np.concatenate(parts)


def _cpu_fast_sort(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending (values, indices) of x [R, V] on the CPU, any order among equal values."""
    asc = _numpy_rows(lambda a: np.argsort(a, axis=1), x)
    idx = torch.from_numpy(asc).flip(1)  # (NaN, last ascending, comes first)
    return x.gather(1, idx), idx


def _finite_ties(vals: torch.Tensor) -> torch.Tensor:
    """[R] rows of the sorted vals [R, K] holding two equal finite neighbours."""
    if vals.shape[1] < 2:
        return torch.zeros(vals.shape[0], dtype=torch.bool, device=vals.device)
    same = vals[:, 1:] == vals[:, :-1]
    return (same & (vals[:, 1:] > _NEG_INF)).any(1)


def _cpu_full_sort(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact order (K = V) on the CPU: an unstable sort, rows with ties sorted again."""
    vals, idx = torch.sort(x, dim=1, descending=True)
    rows = _finite_ties(vals).nonzero()[:, 0]
    if rows.numel():  # (-inf ties carry no mass: their order changes nothing)
        vals[rows], idx[rows] = torch.sort(x[rows], dim=1, descending=True, stable=True)
    return vals, idx


def _cpu_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact order (K < V) on the CPU: torch.topk, rows with ties by the int64 keys."""
    vals, idx = torch.topk(x, k, dim=1, sorted=True)
    thr = vals[:, -1:]
    outside = (x == thr).sum(1) > (vals == thr).sum(1)  # the K-th value also left out
    rows = (_finite_ties(vals) | outside).nonzero()[:, 0]
    if rows.numel():
        fix = top_indices(x[rows], k)
        idx[rows] = fix
        vals[rows] = x[rows].gather(1, fix)
    return vals, idx


def student_order(x: torch.Tensor, k: int, backend: str = "torch", *, exact: bool = True):
    """(values [R, k] in x's dtype, indices [R, k] int64) of the k largest entries of each
    row of x [R, V], descending, equal values by lower index (module docstring).

    backend: whose `topk_select` kernel may serve K < V (where it takes the input).
    exact=False (CPU): equal values in the library's own order; the caller repairs the
    rows where that matters (ambiguous_rows, stable_order)."""
    v = x.shape[1]
    on_cpu = x.device.type == "cpu"
    if k == v:
        if on_cpu and not exact:
            return _cpu_fast_sort(x)
        if on_cpu:
            return _cpu_full_sort(x)
        return torch.sort(x, dim=1, descending=True, stable=True)
    if backend != "torch" and TOPK.reason(backend, x.device, {"dtype": x.dtype, "k": k}) is None:
        vals = torch.empty(x.shape[0], k, dtype=x.dtype, device=x.device)
        idx = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
        TOPK(backend, x, k, vals, idx)
        return vals, idx
    if on_cpu and not exact:
        return torch.topk(x, k, dim=1, sorted=True)
    if on_cpu:
        return _cpu_topk(x, k)
    return stable_order(x, k)


def stable_order(x: torch.Tensor, k: int):
    """student_order's rule by the library's exact means (a stable sort, or the int64 keys)."""
    if k == x.shape[1]:
        return torch.sort(x, dim=1, descending=True, stable=True)
    idx = top_indices(x, k)
    return x.gather(1, idx), idx


def ambiguous_rows(x: torch.Tensor, vals: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Rows (int64 [R']) whose gradient could depend on the order among equal values.

    x: [R, V] logits; vals: [R, K] their K largest, descending, in any order among equal
    values; g: [R, K] the sign each sorted position gives its class. Equal values take
    equal probabilities, so swapping two of them changes nothing unless their positions'
    signs differ; at position K, an equal value left outside the top K has sign 0."""
    same = (vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] > _NEG_INF)  # (-inf: no mass)
    bad = (same & (g[:, 1:] != g[:, :-1])).any(1)
    if vals.shape[1] < x.shape[1]:
        last = vals[:, -1:]
        outside = (x == last).sum(1) > (vals == last).sum(1)
        bad |= outside & ((vals == last) & (g != 0)).any(1)
    return bad.nonzero()[:, 0]


def teacher_sorted(t: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest entries of each row of t [R, V], descending (values only)."""
    if k == t.shape[1]:
        if t.device.type == "cpu":
            return torch.from_numpy(_numpy_rows(lambda a: np.sort(a, axis=1), t)).flip(1)
        return torch.sort(t, dim=1, descending=True).values
    return torch.topk(t, k, dim=1, sorted=True).values
