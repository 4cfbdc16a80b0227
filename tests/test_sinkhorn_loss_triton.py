"""The triton backend of `sinkhorn_loss` (kdkernels/sinkhorn/cost_triton.py) against the
float64 oracle and the torch path.

On a CUDA machine the tensors live on the GPU; elsewhere the kernels run under the
Triton interpreter (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err, requires_gpu

import kdkernels as K
from kdkernels._core import backend as B
from kdkernels._core.backend import BackendUnavailableError
from kdkernels.sinkhorn.ops import SINKHORN
from kdkernels.sinkhorn.reference import pairwise_cost_ref, sinkhorn_loss_ref

pytest.importorskip("triton")
CT = pytest.importorskip("kdkernels.sinkhorn.cost_triton")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and not B.triton_interpreting():
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def err(x, ref):
    return rel_err(x.detach().cpu(), ref.detach().cpu())


def _logits(*shape, std, dtype=torch.float32):
    return (torch.randn(*shape, dtype=torch.float64) * std).to(dtype).to(DEV)


def _loss_grad(s, t, backend, **kw):
    """(loss, ∂(0.75·loss)/∂s) of sinkhorn_loss, or of the oracle for backend=None."""
    if backend is None:
        s = s.detach().double().requires_grad_()
        loss = sinkhorn_loss_ref(s, t.detach().double(), **kw)
    else:
        s = s.detach().clone().requires_grad_()
        loss = K.sinkhorn_loss(s, t, backend=backend, **kw)
    (grad,) = torch.autograd.grad(loss * 0.75, s)
    return loss.detach(), grad


class _Spy:
    """Wraps a Triton kernel: records the PHASE keyword of every launch."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(kwargs.get("PHASE"))
            return self.kernel[grid](*args, **kwargs)

        return launch


# ---------------------------------------------------------------- against the oracle

CASES = [
    # lead, B, V, std, temperature, eps, n_iters, dtype
    ((), 5, 37, 30.0, 1.0, 0.1, 12, torch.float32),
    ((2,), 7, 301, 8.0, 2.0, 0.05, 9, torch.float64),
    ((2, 1), 3, 129, 30.0, 4.0, 0.2, 5, torch.float32),
    ((), 1, 11, 3.0, 0.5, 0.1, 3, torch.float64),
]


@pytest.mark.parametrize("grad", ["unrolled", "envelope"])
@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
@pytest.mark.parametrize("case", CASES)
def test_matches_oracle_and_torch(case, cost, grad):
    lead, b, v, std, temp, eps, iters, dtype = case
    s = _logits(*lead, b, v, std=std, dtype=dtype)
    t = _logits(*lead, b, v, std=std, dtype=dtype)
    t[..., : v // 3] = t[..., : v // 3].round()  # ties inside teacher rows
    if b > 2:
        s[..., 1, :] = t[..., 1, :]  # a student row equal to a teacher row: l1 signs at 0
    kw = dict(temperature=temp, cost=cost, epsilon=eps, n_iters=iters, grad=grad)
    loss, g = _loss_grad(s, t, "triton", **kw)
    ref, ref_g = _loss_grad(s, t, None, **kw)
    tl_loss, tl_g = _loss_grad(s, t, "torch", **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert g.dtype == dtype and g.shape == s.shape and torch.isfinite(g).all()
    assert err(loss, ref) <= (1e-6 if dtype == torch.float64 else 1e-5)
    assert err(g, ref_g) <= TOL[dtype]
    # and as close to the torch path as the two are to the oracle
    assert err(g, tl_g) <= 2 * TOL[dtype]
    assert err(loss, tl_loss) <= (1e-6 if dtype == torch.float64 else 1e-5)


def test_gpu_like_tiling_partial_tiles_and_vocabulary_chunks(monkeypatch):
    # small non-square tiles (B = 7 rows span two i-tiles and one j-tile with padding),
    # vocabulary tiles with a tail, and the backward split into several chunks whose
    # partial sums δ are added up: the code paths a GPU launch takes
    monkeypatch.setattr(CT, "pair_tiles", lambda b, cdt, on_cpu, backward=False:
                        (4, 8, 16, 4) if backward else (8, 4, 16, 4))
    monkeypatch.setattr(CT, "chunking", lambda n_tiles, v, bv, on_cpu: (32, math.ceil(v / 32)))
    for cost in ("l1", "sqeuclidean"):
        s = _logits(2, 7, 70, std=6.0, dtype=torch.float64)
        t = _logits(2, 7, 70, std=6.0, dtype=torch.float64)
        s[:, 2] = t[:, 2]
        kw = dict(temperature=1.5, cost=cost, epsilon=0.1, n_iters=4)
        loss, g = _loss_grad(s, t, "triton", **kw)
        ref, ref_g = _loss_grad(s, t, None, **kw)
        assert err(loss, ref) <= 1e-6 and err(g, ref_g) <= 1e-9


# --------------------------------------------------------- the kernels on their own


def test_row_statistics_and_cost_kernels(monkeypatch):
    monkeypatch.setattr(CT, "row_tile", lambda v, on_cpu, **kw: (16, 4))  # 7 tiles of 16
    n, v, b = 6, 100, 3
    s = _logits(n, v, std=20.0)
    t = _logits(n, v, std=20.0)
    s[0, 70] = s[0, 20] = s[0].max() + 1.0  # a tie for the mode across tiles: index 20
    s[1, 33] = s[1, 35] = s[1].max() + 1.0  # inside one tile: index 33
    s[2] = 1.5  # a constant row: uniform probabilities, mode 0
    s[3, :50] = float("-inf")  # a masked half
    for cost in ("l1", "sqeuclidean"):
        c, stats, mode = CT.cost_fwd(s, t, b, 0.5, cost)
        assert c.shape == (n // b, b, b) and c.dtype == torch.float32
        assert mode.tolist() == s.argmax(-1).tolist()
        assert mode[:4].tolist() == [20, 33, 0, s[3].argmax().item()]
        for k, z in ((0, s), (2, t)):
            lse = stats[k].double() + stats[k + 1].double()
            assert err(lse, torch.logsumexp(z.double() * 0.5, -1)) <= 1e-7
        ref = pairwise_cost_ref(s.double().view(2, b, v), t.double().view(2, b, v),
                                temperature=2.0, cost=cost)
        assert err(c, ref) <= 1e-6


def _plateau(v, cols, dtype):
    """A row whose softmax is exactly 1/k on k columns (its maxima) and 0 elsewhere:
    exp(0) = 1 and exp(−1000) = 0 leave no rounding to the normaliser, in any order."""
    z = torch.full((v,), -1000.0, dtype=dtype, device=DEV)
    z[list(cols)] = 5.0
    return z


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l1_sign_is_zero_at_partial_ties(dtype):
    # Student row 1 is uniform on columns {0, 1, 2}, teacher row 2 on {0, 1, 3}: their
    # probabilities agree exactly on columns 0 and 1 (1/3) and on every zero column, so
    # φ = sign(0) must be 0 there, as autograd's |·|. (A whole-row tie would not show a
    # wrong sign: it shifts G_i· by a constant, which the softmax Jacobian removes.)
    s = _logits(2, 4, 40, std=3.0, dtype=dtype)
    t = _logits(2, 4, 40, std=3.0, dtype=dtype)
    s[0, 1] = _plateau(40, (0, 1, 2), dtype)
    t[0, 2] = _plateau(40, (0, 1, 3), dtype)
    s[1, 3] = _plateau(40, (5, 6, 7, 8), dtype)
    t[1, 0] = _plateau(40, (5, 6, 30, 31), dtype)
    s[1, 2, 30:] = t[1, 2, 30:] = float("-inf")  # masked columns tie at 0 as well
    _, stats, mode = CT.cost_fwd(s.view(8, 40), t.view(8, 40), 4, 1.0, "l1")
    assert mode[1].item() == 0 and mode[7].item() == 5  # ties: the lowest index
    for r_s, r_t in ((1, 2), (7, 4)):  # the normalisers agree bitwise
        assert torch.equal(stats[:2, r_s], stats[2:, r_t])
    kw = dict(temperature=1.0, cost="l1", epsilon=0.2, n_iters=8)
    loss, g = _loss_grad(s, t, "triton", **kw)
    ref, ref_g = _loss_grad(s, t, None, **kw)
    assert err(loss, ref) <= 1e-6 and err(g, ref_g) <= TOL[dtype] / 10
    assert (g[0, 1, 3:] == 0).all() and (g[0, 1, :3] != 0).all()
    assert (g[1, 2, 30:] == 0).all()


@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
def test_masked_vocabulary_at_spread_30(cost):
    s = _logits(2, 6, 80, std=30.0)
    t = _logits(2, 6, 80, std=30.0)
    s[..., 5:9] = float("-inf")  # both sides
    t[..., 5:9] = float("-inf")
    t[..., 20:24] = float("-inf")  # the teacher only
    s[..., 40:42] = float("-inf")  # the student only
    kw = dict(temperature=1.0, cost=cost, epsilon=0.1, n_iters=15)
    loss, g = _loss_grad(s, t, "triton", **kw)
    ref, ref_g = _loss_grad(s, t, None, **kw)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert (g[..., 5:9] == 0).all() and (g[..., 40:42] == 0).all()
    assert (g[..., 20:24] != 0).any()
    assert err(loss, ref) <= 1e-5 and err(g, ref_g) <= 1e-4


# --------------------------------------------------- dtypes and the backward's buffers


@pytest.mark.parametrize("dtype, way", [
    (torch.float32, "in place"), (torch.bfloat16, "scratch"), (torch.bfloat16, "recompute"),
    (torch.float16, "scratch"),
])
@pytest.mark.parametrize("cost", ["l1", "sqeuclidean"])
def test_low_precision_and_the_three_backward_buffers(dtype, way, cost, monkeypatch):
    grad_k = _Spy(CT._skcost_grad_kernel)
    finish_k = _Spy(CT._skcost_finish_kernel)
    monkeypatch.setattr(CT, "_skcost_grad_kernel", grad_k)
    monkeypatch.setattr(CT, "_skcost_finish_kernel", finish_k)
    if way == "recompute":
        monkeypatch.setattr(CT, "SCRATCH_BYTES", 0)
    s = _logits(2, 5, 67, std=5.0, dtype=dtype)
    t = _logits(2, 5, 67, std=5.0, dtype=dtype)
    kw = dict(temperature=2.0, cost=cost, n_iters=10)
    loss, g = _loss_grad(s, t, "triton", **kw)
    ref, ref_g = _loss_grad(s, t, None, **kw)
    assert grad_k.calls == ([0, 1] if way == "recompute" else [0])
    assert len(finish_k.calls) == (0 if way == "recompute" else 1)
    assert g.dtype == dtype
    assert err(loss, ref) <= 1e-5
    if dtype == torch.float32:
        assert err(g, ref_g) <= 1e-5
    else:
        # element-wise: one rounding to the gradient's dtype (one ulp: the interpreter
        # truncates where a GPU rounds to nearest) of an accurate float32 value
        ref_g = ref_g.to(g.device)
        bound = torch.finfo(dtype).eps * ref_g.abs() + 1e-4 * ref_g.abs().max()
        assert ((g.double() - ref_g).abs() <= bound).all()


def test_recompute_pass_writes_what_the_scratch_pass_writes(monkeypatch):
    s = _logits(2, 4, 90, std=12.0, dtype=torch.bfloat16)
    t = _logits(2, 4, 90, std=12.0, dtype=torch.bfloat16)
    _, g_scratch = _loss_grad(s, t, "triton", cost="l1", n_iters=3)
    monkeypatch.setattr(CT, "SCRATCH_BYTES", 0)
    _, g_recompute = _loss_grad(s, t, "triton", cost="l1", n_iters=3)
    if DEV.type == "cpu":
        assert torch.equal(g_scratch, g_recompute)
    else:  # the compiler may contract the two kernels' arithmetic differently: one ulp
        torch.testing.assert_close(g_recompute, g_scratch, rtol=2**-7, atol=1e-30)


# -------------------------------------------------------------- SinKD, NaN, contract


def test_value_is_sinkd_kernel_domain_over_b():
    b, v, eps, iters, temp = 6, 53, 0.1, 12, 2.0
    s = _logits(2, b, v, std=6.0, dtype=torch.float64).requires_grad_()
    t = _logits(2, b, v, std=6.0, dtype=torch.float64)
    for cost in ("l1", "sqeuclidean"):
        c = pairwise_cost_ref(s, t, temperature=temp, cost=cost)
        vals = []
        for m in range(2):
            p = torch.exp(-c[m] / eps)
            for _ in range(iters):
                p = p / p.sum(1, keepdim=True)
                p = p / p.sum(0, keepdim=True)
            vals.append((p * c[m]).sum())
        sinkd = torch.stack(vals).mean()
        ours = K.sinkhorn_loss(s, t, temperature=temp, cost=cost, epsilon=eps, n_iters=iters,
                               backend="triton")
        assert err(ours * b, sinkd) <= 1e-6
        (g1,) = torch.autograd.grad(ours * b, s)
        (g2,) = torch.autograd.grad(sinkd, s)
        assert err(g1, g2) <= 1e-8


def test_nan_inputs_give_a_nan_loss_as_eager():
    s = _logits(2, 3, 23, std=4.0)
    t = _logits(2, 3, 23, std=4.0)
    for which in ("student", "teacher"):
        s2, t2 = s.clone(), t.clone()
        (s2 if which == "student" else t2)[1, 0, 4] = float("nan")
        for backend in ("triton", "torch"):
            assert math.isnan(K.sinkhorn_loss(s2, t2, n_iters=3, backend=backend).item())


def test_the_triton_kernels_and_the_dispatched_solver_ran():
    s = _logits(2, 4, 19, std=3.0).requires_grad_()
    t = _logits(2, 4, 19, std=3.0)
    want = "triton" if "triton" in SINKHORN.backends else "torch"
    assert CT.solver_backend(DEV) == want
    with B.recording() as calls:
        K.sinkhorn_loss(s, t, n_iters=3, backend="triton").backward()
    assert calls == [("sinkhorn_loss", "triton"), ("sinkhorn", want)]
    assert s.grad is not None and (s.grad != 0).any()


def test_without_a_triton_solver_the_torch_solver_runs(monkeypatch):
    table = SINKHORN
    monkeypatch.setattr(table, "impls", {"torch": table.impls["torch"]})
    assert CT.solver_backend(DEV) == "torch"
    s = _logits(2, 4, 29, std=8.0, dtype=torch.float64)
    t = _logits(2, 4, 29, std=8.0, dtype=torch.float64)
    kw = dict(cost="sqeuclidean", epsilon=0.3, n_iters=7)
    with B.recording() as calls:
        loss, g = _loss_grad(s, t, "triton", **kw)
    assert calls == [("sinkhorn_loss", "triton"), ("sinkhorn", "torch")]
    ref, ref_g = _loss_grad(s, t, None, **kw)
    assert err(loss, ref) <= 1e-6 and err(g, ref_g) <= 1e-9


def test_contract_inputs_teacher_and_double_backward():
    s = _logits(2, 3, 31, std=5.0).requires_grad_()
    t = _logits(2, 3, 31, std=5.0).requires_grad_()
    before = s.detach().clone(), t.detach().clone()
    out = K.sinkhorn_loss(s, t, n_iters=4, backend="triton")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, s, create_graph=True)
    out = K.sinkhorn_loss(s, t, n_iters=4, backend="triton")
    out.backward()
    assert torch.equal(s.detach(), before[0]) and torch.equal(t.detach(), before[1])
    assert t.grad is None and torch.isfinite(s.grad).all()


def test_fullgraph_compile_matches_eager():
    s = _logits(2, 3, 23, std=4.0)
    t = _logits(2, 3, 23, std=4.0)

    def run(fn):
        x = s.clone().requires_grad_()
        out = fn(x, t)
        out.backward()
        return out.detach(), x.grad

    def loss(a, b):
        return K.sinkhorn_loss(a, b, cost="sqeuclidean", n_iters=4, backend="triton")

    ref, ref_g = run(loss)
    got, got_g = run(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert err(got, ref) <= 1e-6 and err(got_g, ref_g) <= 1e-6


@pytest.mark.skipif(DEV.type == "cuda", reason="CPU tensors without the interpreter")
def test_explicit_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="sinkhorn_loss: backend='triton'"):
        K.sinkhorn_loss(torch.randn(2, 9), torch.randn(2, 9), backend="triton")


# ------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_shape_matches_oracle_and_launches_its_kernels(dtype):
    from _helpers import assert_launched

    s = _logits(2, 64, 4096, std=8.0, dtype=dtype)
    t = _logits(2, 64, 4096, std=8.0, dtype=dtype)
    for cost in ("l1", "sqeuclidean"):
        kw = dict(temperature=2.0, cost=cost, n_iters=10)
        loss, g = _loss_grad(s, t, "triton", **kw)
        ref, ref_g = _loss_grad(s, t, None, **kw)
        _, tl_g = _loss_grad(s, t, "torch", **kw)
        assert err(loss, ref) <= 1e-5
        assert err(g, ref_g) <= (1e-4 if dtype == torch.float32 else 2 * err(tl_g, ref_g) + 1e-3)
    assert_launched(lambda: _loss_grad(s, t, "triton", n_iters=3), "_skcost_stats_kernel",
                    "_skcost_pair_kernel", "_skcost_mode_kernel", "_skcost_grad_kernel",
                    "_skcost_finish_kernel")
