"""The Triton Sinkhorn solver (kdkernels/sinkhorn/triton.py) against the float64 oracle and
the torch path.

On a CPU it runs under the Triton interpreter (conftest.py), at small shapes; on a GPU the
same tests run the compiled kernels on CUDA tensors. `path` runs each test twice: the fused
path (one program per problem, every iteration in one launch) and the tiled path (one
launch per half-iteration), forced by shrinking the fused limit and the tiles so that
several row and column tiles are streamed.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err

from kdkernels import sinkhorn
from kdkernels._core.backend import recording
from kdkernels.sinkhorn.reference import sinkhorn_ref

pytest.importorskip("triton")
from kdkernels.sinkhorn import triton as sk  # noqa: E402  (after the importorskip)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEV.type == "cpu"


@pytest.fixture(params=["fused", "tiled"])
def path(request, monkeypatch):
    if request.param == "tiled":
        monkeypatch.setattr(sk, "CPU_FUSED_TILE", 0)
        monkeypatch.setattr(sk, "GPU_FUSED_TILE", {4: 0, 8: 0})
        monkeypatch.setattr(sk, "CPU_TILE", (4, 8))
        monkeypatch.setattr(sk, "GPU_TILE", {4: (4, 8), 8: (4, 8)})
    return request.param


def _check_path(path, b1, b2, dtype=torch.float32):
    size = torch.empty((), dtype=dtype).element_size()
    assert (sk.fused_blocks(b1, b2, size, ON_CPU) is None) == (path == "tiled")


def _marginal(*shape):
    w = torch.rand(*shape, dtype=torch.float64) + 0.05
    return w / w.sum(-1, keepdim=True)


def _solve(backend, dtype, cost, a, b, weights, **kw):
    """(f, g, ∂/∂cost, ∂/∂a, ∂/∂b) of Σ wf·f + Σ wg·g, inputs cast to dtype on DEV."""
    ins = [x.to(DEV, dtype).requires_grad_() if x is not None else None for x in (cost, a, b)]
    f, g = sinkhorn(*ins, backend=backend, **kw)
    wf, wg = (w.to(DEV, f.dtype) for w in weights)
    used = [x for x in ins if x is not None]
    grads = torch.autograd.grad((f * wf).sum() + (g * wg).sum(), used)
    for x, gx in zip(used, grads):
        assert gx.dtype == x.dtype
    return [f.detach(), g.detach(), *grads]


def _oracle(cost, a, b, weights, **kw):
    ins = [x.double().requires_grad_() if x is not None else None for x in (cost, a, b)]
    f, g = sinkhorn_ref(*ins, **kw)
    used = [x for x in ins if x is not None]
    grads = torch.autograd.grad((f * weights[0]).sum() + (g * weights[1]).sum(), used)
    return [f.detach(), g.detach(), *grads]


def _compare(got, low, ref, floor=1e-6):
    """Each output within 2× the torch path's float32 error of the float64 oracle."""
    names = ["f", "g", "dcost", "da", "db"]
    for name, x, y, r in zip(names, got, low, ref):
        e, e_torch = rel_err(x.cpu(), r), rel_err(y.cpu(), r)
        assert e <= 2 * e_torch + floor, f"{name}: {e:.3g} vs torch {e_torch:.3g}"


CASES = [
    # lead, B1, B2, cost std, ε, marginals, n_iters
    ((), 5, 7, 2.0, 0.1, "uniform", 9),
    ((3,), 6, 4, 30.0, 3.0, "given", 7),  # wide spread, large ε
    ((2, 2), 1, 9, 1.0, 0.05, "batched", 8),  # a single row, small ε
    ((2,), 11, 3, 30.0, 0.05, "given", 6),  # Ce spread ~600
]


@pytest.mark.parametrize("case", CASES)
def test_matches_the_oracle_and_the_torch_path(case, path):
    lead, b1, b2, std, eps, marg, iters = case
    _check_path(path, b1, b2)
    cost = torch.randn(*lead, b1, b2, dtype=torch.float64) * std
    a = b = None
    if marg == "given":
        a, b = _marginal(b1), _marginal(b2)
    elif marg == "batched":
        a, b = _marginal(*lead, b1), _marginal(*lead, b2)
    weights = (torch.randn(*lead, b1, dtype=torch.float64),
               torch.randn(*lead, b2, dtype=torch.float64))
    kw = dict(epsilon=eps, n_iters=iters)
    with recording() as calls:
        got = _solve("triton", torch.float32, cost, a, b, weights, **kw)
    assert calls == [("sinkhorn", "triton")]
    assert got[0].dtype == torch.float32 and got[0].shape == (*lead, b1)
    low = _solve("torch", torch.float32, cost, a, b, weights, **kw)
    _compare(got, low, _oracle(cost, a, b, weights, **kw))


def test_float64_kernels(path):
    lead, b1, b2 = (2,), 7, 9
    _check_path(path, b1, b2, torch.float64)
    cost = torch.randn(*lead, b1, b2, dtype=torch.float64) * 5.0
    a, b = _marginal(*lead, b1), _marginal(b2)
    weights = (torch.randn(*lead, b1, dtype=torch.float64),
               torch.randn(*lead, b2, dtype=torch.float64))
    kw = dict(epsilon=0.05, n_iters=12)
    got = _solve("triton", torch.float64, cost, a, b, weights, **kw)
    assert got[0].dtype == torch.float64
    for x, r in zip(got, _oracle(cost, a, b, weights, **kw)):
        assert rel_err(x.cpu(), r) <= 1e-12


def test_non_contiguous_cost_and_unused_output(path):
    """A transposed cost view; only g is used (the upstream f̄ is None)."""
    cost = (torch.rand(2, 8, 6, dtype=torch.float64) * 4).transpose(-1, -2)
    c = cost.to(DEV, torch.float32).requires_grad_()
    _, g = sinkhorn(c, epsilon=0.2, n_iters=9, backend="triton")
    (got,) = torch.autograd.grad(g.square().sum(), c)
    c64 = cost.clone().requires_grad_()
    _, gr = sinkhorn_ref(c64, epsilon=0.2, n_iters=9)
    (want,) = torch.autograd.grad(gr.square().sum(), c64)
    c32 = cost.float().requires_grad_()
    _, gt = sinkhorn(c32, epsilon=0.2, n_iters=9, backend="torch")
    (low,) = torch.autograd.grad(gt.square().sum(), c32)
    assert rel_err(g.detach().cpu(), gr.detach()) <= 2 * rel_err(gt.detach(), gr.detach()) + 1e-6
    assert rel_err(got.cpu(), want) <= 2 * rel_err(low, want) + 1e-6


# ------------------------------------------------------------------------------- tol


def _row_errors(cost, eps, iters):
    """max over problems of Σ_i |Σ_j P_ij − a_i| after each iteration (float64 oracle)."""
    out = []
    b1 = cost.shape[-2]
    for k in range(1, iters + 1):
        f, g = sinkhorn_ref(cost, epsilon=eps, n_iters=k)
        plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)
        out.append((plan.sum(-1) - 1.0 / b1).abs().sum(-1))
    return torch.stack(out)  # [iters, M]


def test_tol_stops_at_the_torch_paths_iteration(path, monkeypatch):
    """The stopping rule is global over the problems (max over m), decided on the device:
    three problems that converge at different speeds stop together at the first iteration
    where the slowest is below tol, as in the torch path (a per-problem rule would stop
    the fast ones earlier and give other values)."""
    monkeypatch.setattr(sk, "SEGMENT", 4)  # several fused launches before the stop
    eps, n_iters = 0.25, 16
    cost = torch.rand(3, 6, 8, dtype=torch.float64)
    cost *= torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64).view(3, 1, 1)
    errs = _row_errors(cost, eps, 14)
    worst = errs.max(1).values
    k_stop = 10
    # a tol between iterations k_stop − 1 and k_stop, far from both in float32 terms
    tol = math.sqrt(worst[k_stop - 1].item() * worst[: k_stop - 1].min().item())
    assert (worst[: k_stop - 1] > 1.2 * tol).all() and worst[k_stop - 1] < tol / 1.2
    fast = int((errs[:, 0] < tol).nonzero()[0, 0]) + 1
    assert fast < k_stop  # the fast problem alone would have stopped earlier

    c = cost.to(DEV, torch.float32)
    log_a = torch.full((3, 6), -math.log(6), device=DEV)
    log_b = torch.full((3, 8), -math.log(8), device=DEV)
    f, g, _, _, iters = sk.sinkhorn_fwd_triton(c, log_a, log_b, eps, n_iters, tol, False)
    assert int(iters) == k_stop
    from kdkernels.sinkhorn.pytorch import sinkhorn_iterate

    _, _, phis, _ = sinkhorn_iterate(c.cpu() / eps, log_a.cpu(), log_b.cpu(), n_iters, tol,
                                     history=True)
    assert phis.shape[0] == k_stop  # the torch path's count

    # the public call: values and the unrolled gradient of the iterations that ran
    w = torch.randn(3, 6, dtype=torch.float64)
    ins = c.clone().requires_grad_()
    fo, go = sinkhorn(ins, epsilon=eps, n_iters=n_iters, tol=tol, backend="triton")
    (grad,) = torch.autograd.grad((fo * w.to(DEV, torch.float32)).sum() + go.sum(), ins)
    assert torch.equal(fo, f) and torch.equal(go, g)
    for k, close in ((k_stop, True), (k_stop - 1, False), (k_stop + 1, False)):
        c64 = cost.clone().requires_grad_()
        fr, gr = sinkhorn_ref(c64, epsilon=eps, n_iters=k)
        (want,) = torch.autograd.grad((fr * w).sum() + gr.sum(), c64)
        near = rel_err(fo.detach().cpu(), fr.detach()) <= 1e-5 and rel_err(grad.cpu(), want) <= 1e-4
        assert near == close, k


def test_tol_never_reached_is_the_plain_run(path, monkeypatch):
    monkeypatch.setattr(sk, "SEGMENT", 3)
    cost = torch.rand(2, 5, 7, device=DEV) * 3
    la = torch.log(_marginal(2, 5)).float().to(DEV)
    lb = torch.log(_marginal(2, 7)).float().to(DEV)
    plain = sk.sinkhorn_fwd_triton(cost, la, lb, 0.1, 8, None, True)
    tol = sk.sinkhorn_fwd_triton(cost, la, lb, 0.1, 8, 1e-30, True)
    assert int(tol[4]) == 8
    for x, y in zip(plain[:4], tol[:4]):
        assert torch.equal(x, y)  # same kernels, same arithmetic


def test_converges_to_pot(monkeypatch):
    ot = pytest.importorskip("ot")
    monkeypatch.setattr(sk, "SEGMENT", 64)  # (fewer launches under the interpreter)
    cost = torch.rand(2, 7, 5, dtype=torch.float64) * 4
    a, b = _marginal(2, 7), _marginal(2, 5)
    eps = 0.2
    f, g = sinkhorn(cost.to(DEV), a.to(DEV), b.to(DEV), epsilon=eps, n_iters=400, tol=1e-11,
                    backend="triton")
    f, g = f.cpu(), g.cpu()
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)
    for m in range(2):
        p_pot, log = ot.bregman.sinkhorn_log(
            a[m].numpy(), b[m].numpy(), cost[m].numpy(), eps, numItermax=100000,
            stopThr=1e-14, log=True,
        )
        assert rel_err(plan[m], torch.from_numpy(p_pot)) <= 1e-6
        fu = torch.from_numpy(log["log_u"]) * eps  # the same potentials up to a constant
        gv = torch.from_numpy(log["log_v"]) * eps
        assert rel_err(f[m] - f[m].mean(), fu - fu.mean()) <= 1e-6
        assert rel_err(g[m] - g[m].mean(), gv - gv.mean()) <= 1e-6


# ------------------------------------------------------------------- special inputs


def test_nan_in_cost_gives_nan_as_eager(path):
    cost = torch.rand(2, 5, 6) * 3
    cost[0, 2, 3] = float("nan")
    outs = {}
    for be in ("torch", "triton"):
        c = cost.to(DEV).requires_grad_()
        f, g = sinkhorn(c, epsilon=0.3, n_iters=4, backend=be)
        (grad,) = torch.autograd.grad(f.sum() + g.sum(), c)
        outs[be] = [x.detach().cpu() for x in (f, g, grad)]
    for x, y in zip(outs["triton"], outs["torch"]):
        assert torch.equal(x.isnan(), y.isnan())
        assert x[0].isnan().any() and not x[1].isnan().any()
        assert rel_err(x[1], y[1]) <= 1e-5


def test_zero_marginal_entries(path):
    """a_i = 0 makes φ_i = −inf (that row carries no mass), as in the torch path; the
    reverse pass stays finite."""
    cost = torch.rand(2, 5, 6, dtype=torch.float64) * 2
    a = _marginal(2, 5)
    a[:, 1] = 0.0
    a /= a.sum(-1, keepdim=True)
    outs = {}
    for be in ("torch", "triton"):
        c = cost.to(DEV, torch.float32).requires_grad_()
        f, g = sinkhorn(c, a.to(DEV, torch.float32), epsilon=0.3, n_iters=6, backend=be)
        (grad,) = torch.autograd.grad(g.sum(), c)
        outs[be] = [x.detach().cpu() for x in (f, g, grad)]
    (f, g, grad), (ft, gt, gradt) = outs["triton"], outs["torch"]
    assert (f[:, 1] == -math.inf).all() and torch.equal(f[:, 1], ft[:, 1])
    assert torch.isfinite(g).all()
    assert torch.isfinite(grad).all()
    assert rel_err(g, gt) <= 1e-5 and rel_err(grad, gradt) <= 1e-5


def test_no_grad_keeps_no_history_and_gives_the_same_values(path):
    cost = torch.rand(3, 6, 5, device=DEV) * 2
    with torch.no_grad():
        f0, g0 = sinkhorn(cost, epsilon=0.4, n_iters=7, backend="triton")
    c = cost.clone().requires_grad_()
    f1, g1 = sinkhorn(c, epsilon=0.4, n_iters=7, backend="triton")
    assert torch.equal(f0, f1.detach()) and torch.equal(g0, g1.detach())
    la = torch.full((3, 6), -math.log(6), device=DEV)
    lb = torch.full((3, 5), -math.log(5), device=DEV)
    out = sk.sinkhorn_fwd_triton(cost, la, lb, 0.4, 7, None, False)
    assert out[2].shape == (0, 2, 3, 6) and out[3].shape == (0, 2, 3, 5)


def test_double_backward_is_refused():
    c = torch.rand(2, 4, 5, device=DEV, requires_grad=True)
    f, _ = sinkhorn(c, epsilon=0.3, n_iters=3, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(f.sum(), c, create_graph=True)


def test_empty_batch():
    c = torch.rand(0, 3, 4, device=DEV, requires_grad=True)
    f, g = sinkhorn(c, epsilon=0.5, n_iters=3, backend="triton")
    assert f.shape == (0, 3) and g.shape == (0, 4)
    (f.sum() + g.sum()).backward()
    assert c.grad.shape == c.shape


def test_fullgraph_compile_matches_eager():
    cost = torch.rand(2, 5, 4, device=DEV) * 2

    def fn(c):
        f, g = sinkhorn(c, epsilon=0.5, n_iters=5, tol=1e-3, backend="triton")
        return f.square().sum() + 2 * g.sum()

    x = cost.clone().requires_grad_()
    ref = fn(x)
    ref.backward()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = cost.clone().requires_grad_()
    out = compiled(y)
    out.backward()
    assert torch.equal(out.detach(), ref.detach()) and torch.equal(y.grad, x.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_launches_the_kernels():
    from _helpers import assert_launched

    def run(b, tol):
        c = torch.rand(2, b, b, device="cuda", requires_grad=True)
        f, g = sinkhorn(c, epsilon=0.3, n_iters=5, tol=tol, backend="triton")
        (f.sum() + g.sum()).backward()

    assert_launched(lambda: run(32, None), "_sk_fused_fwd_kernel", "_sk_fused_bwd_kernel",
                    absent=("_sk_row_kernel", "_sk_check_kernel"))
    assert_launched(lambda: run(200, 1e-3), "_sk_row_kernel", "_sk_col_kernel",
                    "_sk_check_kernel", "_sk_final_kernel", "_sk_bwd_col_kernel",
                    "_sk_bwd_row_kernel", absent=("_sk_fused",))
