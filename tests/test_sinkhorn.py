"""docs/spec.md §4: `sinkhorn` and `sinkhorn_loss` against float64 plain-loop references."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err

from kdkernels import SinkhornLoss, sinkhorn, sinkhorn_loss
from kdkernels._core.backend import BackendUnavailableError
from kdkernels.sinkhorn.reference import pairwise_cost_ref, sinkhorn_loss_ref, sinkhorn_ref

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}


def err(x, ref):
    return rel_err(x.detach(), ref.detach())


def _marginal(*shape, dtype=torch.float64):
    w = torch.rand(*shape, dtype=dtype) + 0.05
    return w / w.sum(-1, keepdim=True)


def _logits(*shape, std, dtype):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(dtype)


# ----------------------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "lead,b1,b2,scale,eps,marg",
    [
        ((), 5, 7, 2.0, 0.1, "uniform"),
        ((3,), 6, 4, 30.0, 3.0, "given"),
        ((2, 2), 1, 9, 1.0, 0.05, "batched"),
        ((2,), 11, 3, 30.0, 0.5, "given"),
    ],
)
def test_sinkhorn_matches_loop(dtype, lead, b1, b2, scale, eps, marg):
    cost64 = torch.randn(*lead, b1, b2, dtype=torch.float64) * scale
    cost = cost64.to(dtype).requires_grad_()
    a = b = None
    if marg == "given":
        a, b = _marginal(b1), _marginal(b2)
    elif marg == "batched":
        a, b = _marginal(*lead, b1), _marginal(*lead, b2)
    if a is not None:
        a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    f, g = sinkhorn(cost, a, b, epsilon=eps, n_iters=17)
    assert f.shape == (*lead, b1) and g.shape == (*lead, b2)
    assert f.dtype == g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    ref_in = [x.detach().double().requires_grad_() if x is not None else None for x in (cost, a, b)]
    fr, gr = sinkhorn_ref(ref_in[0], ref_in[1], ref_in[2], epsilon=eps, n_iters=17)
    assert err(f, fr) <= TOL[dtype] and err(g, gr) <= TOL[dtype]

    wf, wg = torch.randn_like(fr), torch.randn_like(gr)
    ins = [x for x in (cost, a, b) if x is not None]
    ins_r = [x for x in ref_in if x is not None]
    got = torch.autograd.grad((f * wf.to(f.dtype)).sum() + (g * wg.to(g.dtype)).sum(), ins)
    want = torch.autograd.grad((fr * wf).sum() + (gr * wg).sum(), ins_r)
    for x, y, inp in zip(got, want, ins):
        assert x.dtype == inp.dtype
        assert err(x, y) <= TOL[dtype]


def test_sinkhorn_only_g_used():
    # the reverse pass must handle an unused output (grad_f is None)
    cost = (torch.rand(4, 6, dtype=torch.float64) * 3).requires_grad_()
    _, g = sinkhorn(cost, epsilon=0.2, n_iters=9)
    (got,) = torch.autograd.grad(g.square().sum(), cost)
    c2 = cost.detach().requires_grad_()
    _, gr = sinkhorn_ref(c2, epsilon=0.2, n_iters=9)
    (want,) = torch.autograd.grad(gr.square().sum(), c2)
    assert err(got, want) <= 1e-10


def test_sinkhorn_converges_to_pot():
    ot = pytest.importorskip("ot")
    cost = torch.rand(3, 7, 5, dtype=torch.float64) * 4
    a, b = _marginal(3, 7), _marginal(3, 5)
    eps = 0.2
    f, g = sinkhorn(cost, a, b, epsilon=eps, n_iters=5000, tol=1e-13)
    plan = torch.exp((f.unsqueeze(-1) + g.unsqueeze(-2) - cost) / eps)
    for m in range(3):
        p_pot, log = ot.bregman.sinkhorn_log(
            a[m].numpy(), b[m].numpy(), cost[m].numpy(), eps, numItermax=100000,
            stopThr=1e-14, log=True,
        )
        assert err(plan[m], torch.from_numpy(p_pot)) <= 1e-6
        # potentials agree up to the (f + c, g − c) gauge
        fu = torch.from_numpy(log["log_u"]) * eps
        gv = torch.from_numpy(log["log_v"]) * eps
        assert err(f[m] - f[m].mean(), fu - fu.mean()) <= 1e-6
        assert err(g[m] - g[m].mean(), gv - gv.mean()) <= 1e-6


def test_sinkhorn_tol_stops_early_and_differentiates_the_run():
    cost = (torch.rand(2, 6, 8, dtype=torch.float64) * 2).requires_grad_()
    eps, tol = 0.3, 1e-5
    f, g = sinkhorn(cost, epsilon=eps, n_iters=1000, tol=tol)

    def row_err(ff, gg):
        plan = torch.exp((ff.unsqueeze(-1) + gg.unsqueeze(-2) - cost.detach()) / eps)
        return (plan.sum(-1) - 1.0 / 6).abs().sum(-1).max().item()

    assert row_err(f.detach(), g.detach()) < tol
    # it stopped at the first k whose error is below tol: find k with the loop reference
    c2 = cost.detach().requires_grad_()
    k = next(
        k for k in range(1, 1000)
        if row_err(*(x.detach() for x in sinkhorn_ref(c2, epsilon=eps, n_iters=k))) < tol
    )
    assert k < 1000
    fr, gr = sinkhorn_ref(c2, epsilon=eps, n_iters=k)
    assert err(f, fr) <= 1e-12 and err(g, gr) <= 1e-12
    w = torch.randn_like(fr)
    (got,) = torch.autograd.grad((f * w).sum() + g.sum(), cost)
    (want,) = torch.autograd.grad((fr * w).sum() + gr.sum(), c2)
    assert err(got, want) <= 1e-10


# ------------------------------------------------------------------------ sinkhorn_loss


CASES = [
    # lead, B, V, std, temperature, eps, n_iters
    ((), 5, 37, 30.0, 1.0, 0.1, 20),
    ((2,), 7, 301, 8.0, 2.0, 0.05, 13),
    ((2, 1), 3, 129, 30.0, 4.0, 0.2, 7),
    ((), 1, 11, 3.0, 1.0, 0.1, 3),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grad", ["unrolled", "envelope"])
@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
@pytest.mark.parametrize("case", CASES)
def test_sinkhorn_loss_matches_reference(case, cost, grad, dtype):
    lead, b, v, std, temp, eps, iters = case
    s = _logits(*lead, b, v, std=std, dtype=dtype)
    t = _logits(*lead, b, v, std=std, dtype=dtype)
    t[..., : v // 3] = t[..., : v // 3].round()  # ties in the teacher
    if b > 2:
        s[..., 1, :] = t[..., 1, :]  # a student row equal to a teacher row: |x − y| at 0
    s.requires_grad_()
    kw = dict(temperature=temp, cost=cost, epsilon=eps, n_iters=iters, grad=grad)
    loss = sinkhorn_loss(s, t, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    s64 = s.detach().double().requires_grad_()
    ref = sinkhorn_loss_ref(s64, t.double(), **kw)
    assert err(loss, ref) <= TOL[dtype]
    (got,) = torch.autograd.grad(loss * 0.75, s)
    (want,) = torch.autograd.grad(ref * 0.75, s64)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    assert err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
def test_sinkhorn_loss_low_precision_gradient(cost):
    # bfloat16 gradients cannot store G: the second pass recomputes it
    s = _logits(2, 5, 67, std=5.0, dtype=torch.bfloat16).requires_grad_()
    t = _logits(2, 5, 67, std=5.0, dtype=torch.bfloat16)
    loss = sinkhorn_loss(s, t, cost=cost, temperature=2.0, n_iters=10)
    (got,) = torch.autograd.grad(loss, s)
    assert got.dtype == torch.bfloat16
    s64 = s.detach().double().requires_grad_()
    ref = sinkhorn_loss_ref(s64, t.double(), cost=cost, temperature=2.0, n_iters=10)
    (want,) = torch.autograd.grad(ref, s64)
    assert err(loss, ref) <= 1e-5
    assert err(got, want) <= 1e-2


def test_sinkhorn_loss_is_sinkd_kernel_domain_over_b():
    # SinKD: K = exp(−C/ε), alternately normalise rows and columns to 1, loss Σ P C.
    b, v, eps, iters, temp = 6, 53, 0.1, 20, 2.0
    s = _logits(3, b, v, std=6.0, dtype=torch.float64).requires_grad_()
    t = _logits(3, b, v, std=6.0, dtype=torch.float64)
    for cost in ("l1", "sqeuclidean"):
        c = pairwise_cost_ref(s, t, temperature=temp, cost=cost)
        vals = []
        for m in range(3):
            p = torch.exp(-c[m] / eps)
            for _ in range(iters):
                p = p / p.sum(1, keepdim=True)
                p = p / p.sum(0, keepdim=True)
            vals.append((p * c[m]).sum())
        sinkd = torch.stack(vals).mean()
        ours = sinkhorn_loss(s, t, temperature=temp, cost=cost, epsilon=eps, n_iters=iters)
        assert err(ours * b, sinkd) <= 1e-6
        (g1,) = torch.autograd.grad(ours * b, s)
        (g2,) = torch.autograd.grad(sinkd, s)
        assert err(g1, g2) <= 1e-6


def test_sinkhorn_loss_masked_vocabulary_and_teacher_constant():
    s = _logits(4, 40, std=30.0, dtype=torch.float32)
    t = _logits(4, 40, std=30.0, dtype=torch.float32)
    s[:, 5:9] = float("-inf")
    t[:, 5:9] = float("-inf")
    s.requires_grad_()
    t.requires_grad_()
    loss = sinkhorn_loss(s, t, n_iters=30)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all() and (s.grad[:, 5:9] == 0).all()
    assert t.grad is None
    ref = sinkhorn_loss_ref(s.detach().double(), t.detach().double(), n_iters=30)
    assert err(loss, ref) <= 1e-4


def test_sinkhorn_loss_module_and_empty_batch():
    s = _logits(2, 3, 17, std=4.0, dtype=torch.float32)
    t = _logits(2, 3, 17, std=4.0, dtype=torch.float32)
    mod = SinkhornLoss(cost="sqeuclidean", epsilon=0.3, n_iters=5)
    assert "sqeuclidean" in repr(mod)
    assert mod(s, t) == sinkhorn_loss(s, t, cost="sqeuclidean", epsilon=0.3, n_iters=5)
    empty = torch.zeros(0, 3, 17, requires_grad=True)
    out = sinkhorn_loss(empty, empty.detach())
    out.backward()
    assert out.item() == 0.0 and empty.grad.shape == empty.shape


# --------------------------------------------------------------------------- validation


def test_sinkhorn_validation():
    c = torch.rand(3, 4)
    with pytest.raises(ValueError, match="cost"):
        sinkhorn(torch.rand(4), epsilon=0.1, n_iters=3)
    with pytest.raises(TypeError, match="cost"):
        sinkhorn(torch.ones(3, 4, dtype=torch.long), epsilon=0.1, n_iters=3)
    with pytest.raises(ValueError, match="cost"):
        sinkhorn(torch.rand(0, 4), epsilon=0.1, n_iters=3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(c, epsilon=0.0, n_iters=3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(c, epsilon=math.nan, n_iters=3)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn(c, epsilon=0.1, n_iters=0)
    with pytest.raises(TypeError, match="n_iters"):
        sinkhorn(c, epsilon=0.1, n_iters=2.5)
    with pytest.raises(ValueError, match="tol"):
        sinkhorn(c, epsilon=0.1, n_iters=3, tol=-1.0)
    with pytest.raises(ValueError, match="^a "):
        sinkhorn(c, torch.rand(4), epsilon=0.1, n_iters=3)
    with pytest.raises(ValueError, match="^b "):
        sinkhorn(torch.rand(2, 3, 4), None, torch.rand(3, 4), epsilon=0.1, n_iters=3)
    with pytest.raises(ValueError, match="^a "):
        sinkhorn(c, torch.rand(2, 3), epsilon=0.1, n_iters=3)
    with pytest.raises(ValueError, match="^a must be non-negative"):
        sinkhorn(c, torch.tensor([0.5, -0.1, 0.6]), epsilon=0.1, n_iters=3)
    with pytest.raises(TypeError, match="^b "):
        sinkhorn(c, None, [0.25] * 4, epsilon=0.1, n_iters=3)
    with pytest.raises(ValueError, match="a is on meta"):
        sinkhorn(c, torch.rand(3, device="meta"), epsilon=0.1, n_iters=3)


def test_sinkhorn_loss_validation():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="same shape"):
        sinkhorn_loss(s, torch.randn(4, 11))
    with pytest.raises(ValueError, match="same shape"):
        sinkhorn_loss(s, torch.randn(5, 10))
    with pytest.raises(ValueError, match="student_logits"):
        sinkhorn_loss(torch.randn(10), torch.randn(10))
    with pytest.raises(TypeError, match="teacher_logits"):
        sinkhorn_loss(s, t.long())
    with pytest.raises(ValueError, match="temperature"):
        sinkhorn_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="cost"):
        sinkhorn_loss(s, t, cost="l2")
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_loss(s, t, epsilon=-1.0)
    with pytest.raises(ValueError, match="n_iters"):
        sinkhorn_loss(s, t, n_iters=0)
    with pytest.raises(ValueError, match="grad"):
        sinkhorn_loss(s, t, grad="implicit")
    with pytest.raises(ValueError, match="backend"):
        sinkhorn_loss(s, t, backend="fast")
    with pytest.raises(BackendUnavailableError, match="sinkhorn_loss"):
        sinkhorn_loss(s, t, backend="cuda")
    with pytest.raises(ValueError, match="B >= 1"):
        sinkhorn_loss(torch.randn(0, 10), torch.randn(0, 10))
