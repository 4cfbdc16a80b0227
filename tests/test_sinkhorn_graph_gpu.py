"""The CUDA Sinkhorn solver and graph-on-logits kernels on a GPU (skipped without one).

Values and gradients against the float64 torch paths, the tol early exit (the torch
path's iteration, decided on the device), both solver plans (fused and tiled), float64
costs, masked groups, ties, std-30 spreads, NaN propagation.
"""

from __future__ import annotations

import pytest
import torch

import kdkernels
from kdkernels.graph.pytorch import topk_logit_graph_torch
from kdkernels.sinkhorn.pytorch import sinkhorn_iterate, sinkhorn_torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = torch.device("cuda")


def _problem(m, b1, b2, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    cost = (torch.rand(m, b1, b2, generator=gen, dtype=torch.float64) * scale)
    wa = torch.rand(m, b1, generator=gen, dtype=torch.float64) + 0.1
    wb = torch.rand(m, b2, generator=gen, dtype=torch.float64) + 0.1
    a, b = wa / wa.sum(-1, keepdim=True), wb / wb.sum(-1, keepdim=True)
    return cost.to(DEV, dtype), a.to(DEV, dtype), b.to(DEV, dtype)


def _run(cost, a, b, eps, n_iters, tol, backend):
    c = cost.clone().requires_grad_(True)
    f, g = kdkernels.sinkhorn(c, a, b, epsilon=eps, n_iters=n_iters, tol=tol, backend=backend)
    gen = torch.Generator().manual_seed(1)
    wf = torch.randn(f.shape, generator=gen, dtype=torch.float64).to(DEV, f.dtype)
    wg = torch.randn(g.shape, generator=gen, dtype=torch.float64).to(DEV, g.dtype)
    ((f * wf).sum() + (g * wg).sum()).backward()
    return f.detach(), g.detach(), c.grad


def _plan(b1, b2, dtype):
    from kdkernels.sinkhorn import cuda as sk_cuda

    return sk_cuda._plan(b1, b2, dtype == torch.float64, torch.cuda.current_device())["fused"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(4, 7, 9), (2, 64, 48), (1, 300, 260), (3, 1, 5), (2, 1030, 70)])
@pytest.mark.parametrize("tol", [None, 1e-4])
def test_sinkhorn_cuda_matches_float64_torch(dtype, shape, tol):
    cost, a, b = _problem(*shape, dtype)
    want = _run(cost.double(), a.double(), b.double(), 0.05, 30, tol, "torch")
    got = _run(cost, a, b, 0.05, 30, tol, "cuda")
    tol_ = 1e-10 if dtype == torch.float64 else 5e-4
    for w, g_ in zip(want, got):
        assert g_.dtype == dtype
        torch.testing.assert_close(g_.double(), w, rtol=tol_, atol=tol_)


def test_sinkhorn_cuda_both_plans_are_exercised():
    assert _plan(8, 8, torch.float32)
    assert not _plan(1030, 1030, torch.float32)


@pytest.mark.parametrize("shape", [(4, 9, 11), (2, 700, 600)])
def test_sinkhorn_cuda_tol_stops_at_the_torch_iteration(shape):
    from kdkernels.sinkhorn.cuda import sinkhorn_fwd_cuda

    cost, a, b = _problem(*shape, torch.float64, seed=3)
    la, lb = a.log(), b.log()
    for n_iters, tol in ((200, 1e-7), (40, 1e-4), (3, 1e-12)):
        _, _, phis, _ = sinkhorn_iterate(cost / 0.1, la, lb, n_iters, tol, history=True)
        f, g, rh, lh, iters = sinkhorn_fwd_cuda(cost, la, lb, 0.1, n_iters, tol, True)
        assert int(iters) == phis.shape[0]
        torch.testing.assert_close(f / 0.1, phis[-1])


def test_sinkhorn_cuda_small_epsilon_and_nan():
    cost, a, b = _problem(2, 16, 16, torch.float32, scale=30.0)
    f, g = kdkernels.sinkhorn(cost, a, b, epsilon=0.01, n_iters=50, backend="cuda")
    fw, gw = sinkhorn_torch(cost.double(), a.double().log(), b.double().log(), 0.01, 50, None)
    torch.testing.assert_close(f.double(), fw, rtol=1e-4, atol=1e-4)
    cost[0, 3, 4] = float("nan")
    f, g = kdkernels.sinkhorn(cost, a, b, epsilon=0.1, n_iters=5, backend="cuda")
    fw, gw = kdkernels.sinkhorn(cost, a, b, epsilon=0.1, n_iters=5, backend="torch")
    assert torch.equal(f.isnan(), fw.isnan()) and torch.equal(g.isnan(), gw.isnan())


def test_sinkhorn_cuda_compiles_fullgraph():
    cost, a, b = _problem(2, 8, 8, torch.float32)
    fn = torch.compile(lambda c: kdkernels.sinkhorn(c, epsilon=0.1, n_iters=5, backend="cuda"),
                       fullgraph=True)
    f, g = fn(cost)
    fw, gw = kdkernels.sinkhorn(cost, epsilon=0.1, n_iters=5, backend="torch")
    torch.testing.assert_close(f, fw, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- graph


def _graph_inputs(g, t_len, v_s, v_t, std=3.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(g, t_len, v_s, generator=gen) * std
    t = torch.randn(g, t_len, v_t, generator=gen) * std
    return s.to(DEV, dtype), t.to(DEV, dtype)


def _graph_both(s, t, k, tau, valid):
    out = []
    for be in ("torch", "cuda"):
        x = (s.double() if be == "torch" else s).clone().requires_grad_(True)
        loss = kdkernels.graph_on_logits_loss(x, t.double() if be == "torch" else t, k,
                                              temperature=tau, mask=valid, backend=be)
        loss.backward(torch.tensor(0.7, device=DEV))
        out.append((loss.double(), x.grad.double()))
    return out


@pytest.mark.parametrize("std", [1.0, 30.0])
@pytest.mark.parametrize("k", [1, 8, 256])
def test_graph_loss_cuda_matches_float64_torch(std, k):
    s, t = _graph_inputs(3, 17, 4099, 3001, std=std)
    (lw, gw), (lc, gc) = _graph_both(s, t, k, 0.7, None)
    torch.testing.assert_close(lc, lw, rtol=2e-4, atol=1e-7)
    scale = gw.abs().max().clamp_min(1e-30)
    assert ((gc - gw).abs().max() / scale) < 2e-4


def test_graph_loss_cuda_masked_groups_and_ties():
    s, t = _graph_inputs(4, 9, 500, 500)
    s, t = s.round(), t.round()  # many equal logits: ties at the k-th entry
    valid = torch.ones(4, 9, dtype=torch.bool, device=DEV)
    valid[1] = False
    valid[3, ::2] = False
    s[3, 0] = float("nan")  # a masked position is never read
    (lw, gw), (lc, gc) = _graph_both(s, t, 6, 1.0, valid)
    torch.testing.assert_close(lc, lw, rtol=2e-4, atol=1e-7)
    torch.testing.assert_close(gc, torch.nan_to_num(gw), rtol=2e-4, atol=1e-7)
    assert (gc[1] == 0).all() and (gc[3, ::2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_graph_loss_cuda_half_inputs(dtype):
    s, t = _graph_inputs(2, 8, 1000, 1000, dtype=dtype)
    (lw, gw), (lc, gc) = _graph_both(s, t, 16, 1.0, None)
    torch.testing.assert_close(lc, lw, rtol=1e-3, atol=1e-6)


def test_topk_logit_graph_cuda_matches_torch():
    z, _ = _graph_inputs(1, 12, 2000, 10)
    z = z[0]
    valid = torch.ones(12, dtype=torch.bool, device=DEV)
    valid[4] = False
    zw = z.double().clone().requires_grad_(True)
    nodes_w, adj_w = topk_logit_graph_torch(zw, 7, 1.0, valid)
    w = torch.randn(adj_w.shape, dtype=torch.float64, device=DEV)
    (adj_w * w).sum().backward()
    zc = z.clone().requires_grad_(True)
    nodes, adj = kdkernels.topk_logit_graph(zc, 7, mask=valid, backend="cuda")
    (adj * w.float()).sum().backward()
    assert torch.equal(nodes, nodes_w)
    torch.testing.assert_close(adj.double(), adj_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(zc.grad.double(), zw.grad, rtol=1e-4, atol=1e-7)


def test_graph_loss_cuda_nan_row_makes_nan():
    s, t = _graph_inputs(2, 4, 100, 100)
    s[0, 1, 5] = float("nan")
    loss = kdkernels.graph_on_logits_loss(s, t, 4, backend="cuda")
    assert loss.isnan()
