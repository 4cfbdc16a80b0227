"""`topk_logit_graph` and `graph_on_logits_loss` (SPEC §5, after InfiGFusion's GLD).

Per model and group of T positions: a_t keeps the top-k entries of softmax(z_t/τ);
the graph's nodes U are the classes in any valid position's top-k and its adjacency is
A = Σ_t a_t a_tᵀ on U. The loss compares the two graphs through their node strengths

    d_u = Σ_v A_uv = Σ_t a_{t,u} m_t,      m_t = Σ_v a_{t,v}  (the top-k mass)

sorted descending (x: student, y: teacher), the shorter padded with zeros to
n = max(|U_s|, |U_t|), by the 1-D Gromov-Wasserstein cost with squared distances

    GW(σ) = (1/n²) Σ_{i,j} ((x_i − x_j)² − (y_σ(i) − y_σ(j))²)²,   σ ∈ {identity, reversal}

taking the smaller (identity on ties); loss = mean over groups with a valid position.

Closed form. (x_i − x_j)² − (y_i − y_j)² = (e_i − e_j)(s_i − s_j) with e = x − y and
s = x + y, and both are translation invariant, so with e, s centred over the n entries
(Σe = Σs = 0):

    Σ_{i,j} (e_i − e_j)²(s_i − s_j)² = 2n Σe²s² + 2 Σe² Σs² + 4 (Σes)²
                                       − 4 Σe²s Σs − 4 Σes² Σe

(the last two vanish up to rounding and are kept for exactness). Every remaining term is
non-negative, so the value keeps its relative accuracy even when the two graphs are
nearly equal, unlike the expansion in powers of x and y. O(n) after the O(n log n) sort.

Gradient: autograd through the closed form, the sort (order fixed), the scatter of
strengths (selection fixed) and the top-k softmax entries (`TopkSoftmaxFunction`).
The strengths live in a dense [G, V] vector (zero off U), so no data-dependent shapes
and no host sync are needed; n is counted on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import resolve_backend
from .._validate import check_float_tensor, check_int, check_number, check_same_device
from .topk import TopkSoftmaxFunction


def _compute_dtype(x: torch.Tensor):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_mask(mask, shape, device):
    """Bool mask of `shape` (bool or integer input, nonzero = valid), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"mask must be a bool or integer tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def topk_logit_graph(logits, k, *, temperature=1.0, mask=None):
    """The top-k logit graph of one group (SPEC §5).

    Args:
        logits: [T, V] float tensor (one group of T positions).
        k: entries kept per position, 1 <= k <= V (ties by lower class index).
        temperature: τ > 0; a_t = top-k entries of softmax(logits_t / τ), zero elsewhere.
        mask: optional [T] bool (or 0/1 integer) tensor of valid positions.

    Returns:
        (nodes [n] int64, the classes in any valid position's top-k, ascending;
         adjacency [n, n] = Σ_t a_t a_tᵀ on those nodes, float32 (float64 for float64
         logits), differentiable w.r.t. logits).
    """
    z = check_float_tensor("logits", logits, min_dim=2)
    if z.dim() != 2:
        raise ValueError(f"logits must be [T, V], got shape {tuple(z.shape)}")
    t_len, v = z.shape
    k = check_int("k", k, lo=1)
    if k > v:
        raise ValueError(f"k must be <= V = {v}, got {k}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    valid = _check_mask(mask, (t_len,), z.device)
    cdt = _compute_dtype(z)
    zz = z if z.stride(-1) == 1 else z.contiguous()
    vals, idx = TopkSoftmaxFunction.apply(zz, k, 1.0 / temperature, cdt)
    if valid is not None:
        vals, idx = vals[valid], idx[valid]
    nodes, inv = torch.unique(idx, sorted=True, return_inverse=True)
    rows = torch.zeros(vals.shape[0], nodes.numel(), dtype=cdt, device=z.device)
    rows = rows.scatter(1, inv.reshape(vals.shape), vals)  # a_t restricted to U: [T', n]
    return nodes, rows.transpose(0, 1) @ rows


def _strengths(z, k: int, inv_temp: float, valid):
    """Dense node strengths d [G, V] (float64, zero off U) and node counts |U| [G].

    z: [G, T, V]; valid: [G, T] bool.
    """
    g, t_len, v = z.shape
    cdt = _compute_dtype(z)
    zz = z.reshape(g * t_len, v)
    zz = zz if zz.stride(-1) == 1 else zz.contiguous()
    vals, idx = TopkSoftmaxFunction.apply(zz, k, inv_temp, cdt)
    a = vals.reshape(g, t_len, k).double() * valid.unsqueeze(-1)
    mass = a.sum(-1, keepdim=True)  # m_t
    idx = idx.reshape(g, t_len * k)
    d = torch.zeros(g, v, dtype=torch.float64, device=z.device)
    d = d.scatter_add(1, idx, (a * mass).reshape(g, t_len * k))
    hits = torch.zeros(g, v, dtype=torch.int32, device=z.device)
    hits.scatter_add_(1, idx, valid.to(torch.int32).repeat_interleave(k, dim=1))
    return d, (hits > 0).sum(-1)


def _sorted_padded(d, width: int):
    """Strengths sorted descending (stable: ties by lower class index), cut or zero-padded
    to `width` columns: [G, width]."""
    x = torch.sort(d, dim=-1, descending=True, stable=True).values
    if x.shape[1] >= width:
        return x[:, :width]
    return F.pad(x, (0, width - x.shape[1]))


def _pair_sum(e, s, n):
    """Σ_{i,j} (e_i − e_j)²(s_i − s_j)² over the first n entries, e, s [G, W] zero beyond."""
    sum_ = lambda u: u.sum(-1)
    e2, s2 = e * e, s * s
    return (
        2 * n * sum_(e2 * s2)
        + 2 * sum_(e2) * sum_(s2)
        + 4 * sum_(e * s).square()
        - 4 * sum_(e2 * s) * sum_(s)
        - 4 * sum_(e * s2) * sum_(e)
    )


def gw_sorted_cost(x, y, n):
    """min over σ ∈ {id, reversal} of (1/n²) Σ_{i,j}((x_i − x_j)² − (y_σi − y_σj)²)²: [G].

    x, y: [G, W] float64 sorted descending, zero beyond n (the pad); n: [G] int (0 -> 0).
    """
    w = x.shape[1]
    pos = torch.arange(w, device=x.device)
    inside = pos < n.unsqueeze(-1)
    nf = n.clamp_min(1).to(x.dtype).unsqueeze(-1)
    y_rev = y.gather(1, (n.unsqueeze(-1) - 1 - pos).clamp_min(0)) * inside

    def cost(yy):
        e, s = (x - yy) * inside, (x + yy) * inside
        e = (e - e.sum(-1, keepdim=True) / nf) * inside
        s = (s - s.sum(-1, keepdim=True) / nf) * inside
        return _pair_sum(e, s, nf.squeeze(-1))

    c_id, c_rev = cost(y), cost(y_rev)
    best = torch.where(c_rev < c_id, c_rev, c_id)
    return best / nf.squeeze(-1).square()


def graph_on_logits_loss(
    student_logits, teacher_logits, k, *, temperature=1.0, mask=None, backend="auto"
):
    """Graph-on-logits distillation loss (SPEC §5, after InfiGFusion's GLD).

    Args:
        student_logits: [G, T, V_s] float tensor; gets the gradient.
        teacher_logits: [G, T, V_t] float tensor (V_t may differ from V_s); a constant.
        k: top-k entries per position, 1 <= k <= min(V_s, V_t).
        temperature: τ > 0.
        mask: optional [G, T] bool (or 0/1 integer) tensor of valid positions.
        backend: 'auto' | 'torch'.

    Returns:
        float32 scalar: the mean over groups with at least one valid position (0 if none)
        of the better of the identity / reversal 1-D GW costs between the sorted node
        strengths of the two top-k logit graphs.
    """
    s = check_float_tensor("student_logits", student_logits)
    t = check_float_tensor("teacher_logits", teacher_logits)
    device = check_same_device(student_logits=s, teacher_logits=t)
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if x.dim() != 3:
            raise ValueError(f"{name} must be [G, T, V], got shape {tuple(x.shape)}")
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            "student_logits and teacher_logits must share [G, T], got "
            f"{tuple(s.shape[:2])} and {tuple(t.shape[:2])}"
        )
    g, t_len, v_s = s.shape
    v_t = t.shape[2]
    k = check_int("k", k, lo=1)
    if k > min(v_s, v_t):
        raise ValueError(f"k must be <= min(V_s, V_t) = {min(v_s, v_t)}, got {k}")
    temperature = check_number("temperature", temperature, lo=0.0, lo_open=True)
    valid = _check_mask(mask, (g, t_len), device)
    resolve_backend(backend, device, op="graph_on_logits_loss", supported=("torch",))
    if valid is None:
        valid = torch.ones(g, t_len, dtype=torch.bool, device=device)
    if g == 0 or t_len == 0:
        return s.new_zeros((), dtype=torch.float32) + 0.0 * s.sum()
    inv_temp = 1.0 / temperature
    d_s, n_s = _strengths(s, k, inv_temp, valid)
    with torch.no_grad():
        d_t, n_t = _strengths(t.detach(), k, inv_temp, valid)
    width = max(min(v_s, t_len * k), min(v_t, t_len * k))
    x = _sorted_padded(d_s, width)
    y = _sorted_padded(d_t, width)
    n = torch.maximum(n_s, n_t)
    per_group = gw_sorted_cost(x, y, n)
    groups = valid.any(-1)
    total = torch.where(groups, per_group, 0.0).sum()
    return (total / groups.sum().clamp_min(1)).float()
