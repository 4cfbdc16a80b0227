"""docs/spec.md §5 (graph half): `topk_logit_graph`, `graph_on_logits_loss` against brute force
(dense adjacency, all-pairs Gromov-Wasserstein) in float64."""

from __future__ import annotations

import pytest
import torch
from _helpers import rel_err

from kdkernels import GraphOnLogitsLoss, graph_on_logits_loss, topk_logit_graph
from kdkernels._core.backend import BackendUnavailableError
from kdkernels.graph.pytorch import gw_sorted_cost
from kdkernels.graph.reference import (
    graph_on_logits_loss_ref,
    gw_1d_ref,
    topk_logit_graph_ref,
    topk_rows_ref,
)
from kdkernels.select.pytorch import top_indices as topk_lower_index

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def err(x, ref):
    return rel_err(x.detach(), ref.detach())


def _logits(*shape, std, dtype=torch.float64):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(dtype)


# ------------------------------------------------------------------- building blocks


def test_topk_ties_by_lower_index():
    z = torch.randint(-3, 3, (37, 23)).double()
    z[5, :] = 1.0  # all tied
    z[7, 4:] = float("-inf")  # fewer finite entries than k
    z[9, ::2] = float("-inf")
    for k in (1, 3, 6, 23):
        idx = topk_lower_index(z, k)
        _, want = topk_rows_ref(z, k)
        got = torch.zeros_like(want).scatter(1, idx, True)
        assert torch.equal(got, want)


@pytest.mark.parametrize("trial", range(12))
def test_gw_closed_form_matches_all_pairs(trial):
    g = torch.Generator().manual_seed(trial)
    n_s, n_t = (int(v) for v in torch.randint(1, 12, (2,), generator=g))
    scale = float(torch.rand((), generator=g) * 30 + 0.01)
    xs = (torch.rand(n_s, generator=g, dtype=torch.float64) * scale).sort(descending=True).values
    ys = (torch.rand(n_t, generator=g, dtype=torch.float64) * scale).sort(descending=True).values
    if trial % 3 == 0:
        ys = ys.round()  # ties
    n = max(n_s, n_t)
    width = n + 3
    x = torch.zeros(1, width, dtype=torch.float64)
    y = torch.zeros(1, width, dtype=torch.float64)
    x[0, :n_s], y[0, :n_t] = xs, ys
    x.requires_grad_()
    got = gw_sorted_cost(x, y, torch.tensor([n]))
    xr = x.detach()[0, :n].clone().requires_grad_()
    want = gw_1d_ref(xr, y[0, :n])
    assert err(got[0], want) <= 1e-10
    (gx,) = torch.autograd.grad(got.sum(), x)
    (gr,) = torch.autograd.grad(want, xr)
    assert err(gx[0, :n], gr) <= 1e-9 and (gx[0, n:] == 0).all()


def test_gw_picks_reversal():
    x = torch.tensor([[3.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64)  # gaps (2, 1) vs x's (1, 2)
    n = torch.tensor([3])
    assert gw_sorted_cost(x, y, n).item() == pytest.approx(0.0, abs=1e-12)
    assert gw_1d_ref(x[0], y[0]).item() == pytest.approx(0.0, abs=1e-12)
    ident = ((x[0, :, None] - x[0]).square() - (y[0, :, None] - y[0]).square()).square().sum()
    assert ident.item() > 1.0
    # the gradient follows the chosen (reversed) pairing
    xp = torch.tensor([[3.0, 2.3, 0.4]], dtype=torch.float64, requires_grad=True)
    got = gw_sorted_cost(xp, y, n)
    xr = xp.detach()[0].clone().requires_grad_()
    want = gw_1d_ref(xr, y[0])
    rev = ((xr[:, None] - xr).square() - (y[0].flip(0)[:, None] - y[0].flip(0)).square())
    assert err(want, rev.square().sum() / 9) <= 1e-12
    assert err(got[0], want) <= 1e-12
    assert err(torch.autograd.grad(got.sum(), xp)[0][0], torch.autograd.grad(want, xr)[0]) <= 1e-12


# ------------------------------------------------------------------ topk_logit_graph


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masked", [False, True])
def test_topk_logit_graph_matches_dense(dtype, masked):
    t_len, v, k = 13, 57, 5
    z = _logits(t_len, v, std=30.0, dtype=dtype)
    z[:4, :20] = z[:4, :20].round()  # ties
    z[3, :] = z[2, :]  # equal rows
    z[:, 40:44] = float("-inf")
    z.requires_grad_()
    mask = (torch.rand(t_len) > 0.4) if masked else None
    nodes, adjacency = topk_logit_graph(z, k, temperature=3.0, mask=mask)
    z64 = z.detach().double().requires_grad_()
    nodes_r, adjacency_r = topk_logit_graph_ref(z64, k, temperature=3.0, mask=mask)
    assert nodes.dtype == torch.long and torch.equal(nodes, nodes_r)
    assert adjacency.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.allclose(adjacency, adjacency.transpose(0, 1))
    assert err(adjacency, adjacency_r) <= TOL[dtype]
    w = torch.randn_like(adjacency_r)
    (got,) = torch.autograd.grad((adjacency * w.to(adjacency.dtype)).sum(), z)
    (want,) = torch.autograd.grad((adjacency_r * w).sum(), z64)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert err(got, want) <= TOL[dtype]


def test_topk_logit_graph_all_masked():
    z = _logits(4, 9, std=2.0)
    nodes, adjacency = topk_logit_graph(z, 2, mask=torch.zeros(4, dtype=torch.bool))
    assert nodes.shape == (0,) and adjacency.shape == (0, 0)


# --------------------------------------------------------------- graph_on_logits_loss


CASES = [
    # G, T, V_s, V_t, k, std, temperature, mask fraction
    (3, 9, 41, 29, 4, 3.0, 1.5, 0.3),
    (2, 7, 33, 33, 3, 30.0, 1.0, 0.0),
    (4, 5, 19, 61, 7, 30.0, 4.0, 0.5),
    (1, 11, 8, 13, 8, 8.0, 0.7, 0.2),
    (2, 3, 50, 17, 1, 10.0, 2.0, 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_graph_loss_matches_brute_force(case, dtype):
    g, t_len, v_s, v_t, k, std, temp, frac = case
    s = _logits(g, t_len, v_s, std=std, dtype=dtype)
    t = _logits(g, t_len, v_t, std=std, dtype=dtype)
    t[..., : v_t // 2] = t[..., : v_t // 2].round()  # ties in the teacher
    t[:, 0, :] = t[:, 1, :]
    s[:, :, 1] = float("-inf")  # a masked class of the student
    mask = torch.rand(g, t_len) >= frac
    mask[0, 0] = True
    s.requires_grad_()
    loss = graph_on_logits_loss(s, t, k, temperature=temp, mask=mask)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    s64 = s.detach().double().requires_grad_()
    ref = graph_on_logits_loss_ref(s64, t.double(), k, temperature=temp, mask=mask)
    assert err(loss, ref) <= TOL[dtype]
    (got,) = torch.autograd.grad(loss * 1.25, s)
    (want,) = torch.autograd.grad(ref * 1.25, s64)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert err(got, want) <= TOL[dtype]
    assert (got[~mask] == 0).all()


def test_graph_loss_few_finite_logits_and_empty_groups():
    # rows with fewer finite logits than k select -inf classes (zero weight); a fully
    # masked group is left out of the mean
    s = _logits(3, 6, 12, std=5.0)
    t = _logits(3, 6, 15, std=5.0)
    s[0, 2, 3:] = float("-inf")
    t[1, 4, 2:] = float("-inf")
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2] = False
    mask[0, 5] = False
    s.requires_grad_()
    loss = graph_on_logits_loss(s, t, 5, mask=mask.to(torch.int64))
    s64 = s.detach().requires_grad_()
    ref = graph_on_logits_loss_ref(s64, t, 5, mask=mask)
    assert err(loss, ref) <= 1e-6
    (got,) = torch.autograd.grad(loss, s)
    (want,) = torch.autograd.grad(ref, s64)
    assert err(got, want) <= 1e-6 and torch.isfinite(got).all()
    assert (got[2] == 0).all()


def test_graph_loss_of_a_model_with_itself_is_zero():
    for dtype in (torch.float64, torch.float32):
        s = _logits(3, 8, 45, std=30.0, dtype=dtype).requires_grad_()
        mask = torch.rand(3, 8) > 0.3
        loss = graph_on_logits_loss(s, s.detach(), 6, temperature=2.0, mask=mask)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, s)
        assert (grad == 0).all()
        # a different model is not at distance 0
        other = _logits(3, 8, 45, std=30.0, dtype=dtype)
        assert graph_on_logits_loss(s, other, 6, temperature=2.0).item() > 0.0


def test_graph_loss_all_masked_teacher_constant_module_low_precision():
    s = _logits(2, 4, 21, std=4.0, dtype=torch.bfloat16).requires_grad_()
    t = _logits(2, 4, 17, std=4.0, dtype=torch.bfloat16).requires_grad_()
    out = graph_on_logits_loss(s, t, 3, mask=torch.zeros(2, 4, dtype=torch.bool))
    out.backward()
    assert out.item() == 0.0 and (s.grad == 0).all() and t.grad is None
    mod = GraphOnLogitsLoss(3, temperature=2.0)
    assert "k=3" in repr(mod)
    loss = mod(s, t)
    assert loss == graph_on_logits_loss(s, t, 3, temperature=2.0)
    (got,) = torch.autograd.grad(loss, s)
    assert got.dtype == torch.bfloat16
    s64 = s.detach().double().requires_grad_()
    ref = graph_on_logits_loss_ref(s64, t.detach().double(), 3, temperature=2.0)
    (want,) = torch.autograd.grad(ref, s64)
    assert err(loss, ref) <= 1e-5 and err(got, want) <= 1e-2


# ------------------------------------------------------------------------ validation


def test_graph_validation():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 12)
    with pytest.raises(ValueError, match="student_logits must be"):
        graph_on_logits_loss(torch.randn(3, 10), t, 2)
    with pytest.raises(ValueError, match="teacher_logits must be"):
        graph_on_logits_loss(s, torch.randn(1, 2, 3, 12), 2)
    with pytest.raises(ValueError, match="share"):
        graph_on_logits_loss(s, torch.randn(2, 4, 12), 2)
    with pytest.raises(TypeError, match="student_logits"):
        graph_on_logits_loss(s.long(), t, 2)
    with pytest.raises(ValueError, match="^k "):
        graph_on_logits_loss(s, t, 0)
    with pytest.raises(ValueError, match="^k must be <= min"):
        graph_on_logits_loss(s, t, 11)
    with pytest.raises(TypeError, match="^k "):
        graph_on_logits_loss(s, t, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        graph_on_logits_loss(s, t, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="^mask must have shape"):
        graph_on_logits_loss(s, t, 2, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="^mask "):
        graph_on_logits_loss(s, t, 2, mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="^mask "):
        graph_on_logits_loss(s, t, 2, mask=[[1, 1, 1]] * 2)
    with pytest.raises(ValueError, match="mask is on meta"):
        graph_on_logits_loss(s, t, 2, mask=torch.ones(2, 3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="backend"):
        graph_on_logits_loss(s, t, 2, backend="gpu")
    with pytest.raises(BackendUnavailableError, match="graph_on_logits_loss"):
        graph_on_logits_loss(s, t, 2, backend="cuda")
    with pytest.raises(ValueError, match="logits must be"):
        topk_logit_graph(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match="^k must be <= V"):
        topk_logit_graph(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="^mask must have shape"):
        topk_logit_graph(torch.randn(3, 4), 2, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="logits"):
        topk_logit_graph([[1.0, 2.0]], 1)
