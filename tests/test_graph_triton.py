"""The Triton graph-on-logits kernels (kdkernels/graph/triton.py) against the float64 oracle
and the torch path.

On a CPU they run under the Triton interpreter (conftest.py), at small shapes; the
`small_tiles` fixture shrinks the group stage's tiles so that runs of classes cross tile
boundaries, `small_row_tiles` also the row tiles, so that the top-k and the log-sum-exp
stream several column tiles. On a GPU the same tests run the compiled kernels on CUDA
tensors (and the GPU-only test at real vocabulary sizes).
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err

from kdkernels import graph_on_logits_loss, topk_logit_graph
from kdkernels._core.backend import BackendUnavailableError, recording
from kdkernels.graph import ops as graph_ops
from kdkernels.graph.reference import graph_on_logits_loss_ref, topk_logit_graph_ref

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The rule of the low-precision tests (tests/_helpers.py), against the float64 oracle of
# the dtype-rounded inputs: at most twice the torch path's error (its top-k softmax is
# float32 too) plus a floor; the norm-wise floors: loss and gradient. bfloat16 gradients
# are stored in bfloat16 (the interpreter truncates where a GPU rounds to nearest).
FLOOR = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-6, 8e-3)}
CAP = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (1e-4, 2e-2)}  # and never above these


@pytest.fixture
def small_tiles(monkeypatch):
    """16-entry group tiles: runs of classes cross tile boundaries."""
    from kdkernels.graph import triton as graph_triton

    monkeypatch.setattr(graph_triton, "GROUP_BLOCK", 16)


@pytest.fixture
def small_row_tiles(monkeypatch, small_tiles):
    """And 16-column row tiles: the top-k and the log-sum-exp stream several tiles."""
    from kdkernels.graph import triton as graph_triton

    monkeypatch.setattr(graph_triton, "GPU_TILE", 16)
    monkeypatch.setattr(graph_triton, "CPU_TILE", 16)


def _logits(*shape, std):
    return torch.randn(*shape, dtype=torch.float64) * std


def _run(s, t, k, dtype, backend="triton", mask=None, **kw):
    """Loss and the student's gradient of 1.25·loss (CPU tensors)."""
    x = s.to(DEV, dtype).requires_grad_()
    m = mask.to(DEV) if mask is not None else None
    with recording() as calls:
        loss = graph_on_logits_loss(x, t.to(DEV, dtype), k, mask=m, backend=backend, **kw)
        (loss * 1.25).backward()
    assert ("graph_on_logits_loss", backend) in calls
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert x.grad.dtype == dtype
    return loss.detach().cpu(), x.grad.cpu()


def _oracle(s, t, k, dtype, mask=None, **kw):
    """float64 loss and gradient of the dtype-rounded inputs."""
    x = s.to(dtype).double().requires_grad_()
    ref = graph_on_logits_loss_ref(x, t.to(dtype).double(), k, mask=mask, **kw)
    (ref * 1.25).backward()
    return ref.detach(), x.grad


def _check(s, t, k, dtype, mask=None, **kw):
    loss, grad = _run(s, t, k, dtype, mask=mask, **kw)
    ref, ref_grad = _oracle(s, t, k, dtype, mask=mask, **kw)
    loss_t, grad_t = _run(s, t, k, dtype, backend="torch", mask=mask, **kw)
    (floor, g_floor), (cap, g_cap) = FLOOR[dtype], CAP[dtype]
    err, g_err = rel_err(loss, ref), rel_err(grad, ref_grad)
    assert err <= min(cap, 2 * rel_err(loss_t, ref) + floor), (loss.item(), ref.item())
    assert g_err <= min(g_cap, 2 * rel_err(grad_t, ref_grad) + g_floor), g_err
    assert torch.isfinite(grad).all()
    if mask is not None:
        assert (grad[~mask] == 0).all()
    return loss, grad


CASES = [
    # G, T, V_s, V_t, k, std, temperature, masked fraction
    (3, 5, 41, 29, 4, 3.0, 1.5, 0.3),
    (2, 6, 33, 33, 3, 30.0, 1.0, 0.0),
    (4, 3, 19, 61, 7, 30.0, 4.0, 0.5),
    (2, 3, 50, 17, 1, 10.0, 2.0, 0.0),
]


def _case_inputs(case):
    g, t_len, v_s, v_t, k, std, temp, frac = case
    s = _logits(g, t_len, v_s, std=std)
    t = _logits(g, t_len, v_t, std=std)
    t[..., : v_t // 2] = t[..., : v_t // 2].round()  # ties in the teacher
    t[:, 0, :] = t[:, 1, :]  # equal positions
    s[..., 5:9] = s[..., 5:6]  # ties in the student (order by lower index)
    s[:, :, 1] = -math.inf  # a class the student masks
    t[:, :, -2:] = -math.inf
    mask = torch.rand(g, t_len) >= frac
    mask[0, 0] = True
    if g > 2:
        mask[-1] = False  # a group without a valid position: left out of the mean
    return s, t, k, temp, mask


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_the_oracle(case, small_tiles):
    s, t, k, temp, mask = _case_inputs(case)
    _check(s, t, k, torch.float32, mask=mask, temperature=temp)


def test_row_tiles_bf16_and_k32(small_row_tiles):
    s, t, k, temp, mask = _case_inputs((3, 3, 45, 37, 5, 30.0, 1.3, 0.25))
    _check(s, t, k, torch.bfloat16, mask=mask, temperature=temp)
    s, t, k, temp, mask = _case_inputs((1, 3, 40, 48, 32, 8.0, 0.7, 0.2))
    _check(s, t, k, torch.float32, mask=mask, temperature=temp)


def test_runs_cross_group_tiles(small_tiles):
    """Few classes and many positions: each class's run of entries spans several 16-entry
    tiles (the binary search for a run that began in an earlier tile); no mask."""
    s = _logits(2, 8, 9, std=2.0)
    t = _logits(2, 8, 11, std=2.0)
    _check(s, t, 6, torch.float32)
    # every class in every position: one run per class, 8 entries long
    _check(s[..., :6], t[..., :7], 6, torch.float32, temperature=3.0)


def test_strength_ties_go_to_the_lower_class(small_tiles):
    """Classes 3 and 10 hold the same logit at every position: their strengths are equal
    term by term and must tie exactly (then the lower class pairs first), so their
    gradients follow the oracle's pairing, which differs between the two."""
    g, t_len, v = 2, 4, 24
    s = _logits(g, t_len, v, std=1.5)
    s[..., 10] = s[..., 3]
    s[..., 3] += 3.0  # both in every position's top-k
    s[..., 10] = s[..., 3]
    s[1, :, 17] = s[1, :, 3]  # a third one in group 1
    t = _logits(g, t_len, v, std=4.0)
    loss, grad = _check(s, t, 5, torch.float32)
    _, ref_grad = _oracle(s, t, 5, torch.float32)
    assert (ref_grad[..., 3] - ref_grad[..., 10]).abs().max() > 1e-3  # the pairing matters
    assert torch.allclose(grad[..., [3, 10, 17]], ref_grad[..., [3, 10, 17]].float(),
                          rtol=1e-4, atol=1e-6)
    # one position per group: ties among the top-k logits are ties among strengths (a
    # tie of three and one of two among 7 distinct-gapped strengths: the better pairing
    # is not itself a tie, which rounding would decide)
    s1 = _logits(3, 1, 30, std=0.5)
    s1[..., [2, 5, 11]] = 4.0
    s1[..., [7, 20]] = 3.0
    t1 = _logits(3, 1, 30, std=3.0)
    _check(s1, t1, 7, torch.float32)
    _, g1 = _run(s1, t1, 7, torch.float32)
    assert (g1[..., 2] != g1[..., 5]).any() and (g1[..., 7] != g1[..., 20]).any()


def test_a_model_against_itself_is_zero():
    s = _logits(2, 4, 30, std=30.0)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    x = s.float().to(DEV).requires_grad_()
    loss = graph_on_logits_loss(x, x.detach(), 5, mask=mask.to(DEV), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and (x.grad == 0).all()
    other = _logits(2, 4, 30, std=30.0).float().to(DEV)
    assert graph_on_logits_loss(x, other, 5, backend="triton").item() > 0.0


def test_masked_positions_never_matter(small_tiles):
    s, t, k, temp, mask = _case_inputs((3, 4, 30, 26, 4, 5.0, 1.0, 0.4))
    loss, grad = _run(s, t, k, torch.float32, mask=mask)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = torch.where(torch.rand_like(s2[~mask]) < 0.5, math.nan, 1e30).double()
    t2[~mask] = math.inf
    loss2, grad2 = _run(s2, t2, k, torch.float32, mask=mask)
    assert torch.equal(loss2, loss) and torch.equal(grad2, grad)
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


def test_nonfinite_inputs_give_nan_as_eager(small_tiles):
    """A NaN or +inf in a valid position (either model), or a position without a finite
    logit: the loss is NaN and that group's gradient rows are NaN, as on the torch path;
    the other groups' gradients are unchanged and masked positions stay 0."""
    s, t, k, temp, mask = _case_inputs((4, 3, 30, 26, 4, 5.0, 1.0, 0.0))
    mask[:3, 0] = False
    clean_loss, clean_grad = _run(s, t, k, torch.float32, mask=mask)
    s2, t2 = s.clone(), t.clone()
    s2[0, 2, 7] = math.nan  # group 0: the student
    t2[1, 1, 4] = math.inf  # group 1: the teacher
    s2[2, 1] = -math.inf  # group 2: a position without a finite logit
    loss, grad = _run(s2, t2, k, torch.float32, mask=mask)
    eager_loss, eager_grad = _run(s2, t2, k, torch.float32, backend="torch", mask=mask)
    assert math.isnan(loss) and math.isnan(eager_loss) and not math.isnan(clean_loss)
    for gi in range(3):
        valid = mask[gi]
        assert grad[gi][valid].isnan().all() and eager_grad[gi][valid].isnan().all()
        assert (grad[gi][~valid] == 0).all()  # a masked position never matters
    assert torch.equal(grad[3], clean_grad[3])


def test_topk_logit_graph():
    t_len, v, k = 9, 40, 5
    z = _logits(t_len, v, std=30.0)
    z[:4, :20] = z[:4, :20].round()  # ties
    z[3, :] = z[2, :]
    z[:, 30:33] = -math.inf
    z[5, 6:] = -math.inf  # fewer finite logits than k
    for mask, dtype in ((None, torch.float32), (torch.rand(t_len) > 0.4, torch.bfloat16)):
        x = z.to(DEV, dtype).requires_grad_()
        m = mask.to(DEV) if mask is not None else None
        with recording() as calls:
            nodes, adjacency = topk_logit_graph(x, k, temperature=2.5, mask=m,
                                                backend="triton")
        assert ("topk_logit_graph", "triton") in calls
        z64 = z.to(dtype).double().requires_grad_()
        nodes_r, adjacency_r = topk_logit_graph_ref(z64, k, temperature=2.5, mask=mask)
        assert nodes.dtype == torch.long and torch.equal(nodes.cpu(), nodes_r)
        assert adjacency.dtype == torch.float32
        assert rel_err(adjacency.detach().cpu(), adjacency_r.detach()) <= 1e-5
        w = torch.randn_like(adjacency_r)
        (got,) = torch.autograd.grad((adjacency * w.to(DEV, torch.float32)).sum(), x)
        (want,) = torch.autograd.grad((adjacency_r * w).sum(), z64)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert rel_err(got.cpu(), want) <= CAP[dtype][1]
        if mask is not None:
            assert (got.cpu()[~mask] == 0).all()


def test_topk_logit_graph_nan_row_as_eager():
    z = _logits(5, 20, std=3.0).float()
    z[2, 4] = math.nan
    nodes, adjacency = topk_logit_graph(z.to(DEV), 3, backend="triton")
    nodes_t, adjacency_t = topk_logit_graph(z, 3, backend="torch")
    assert torch.equal(nodes.cpu(), nodes_t)
    assert torch.equal(adjacency.isnan().cpu(), adjacency_t.isnan())
    assert adjacency.isnan().any() and not adjacency.isnan().all()
    ok = ~adjacency_t.isnan()
    assert rel_err(adjacency.cpu()[ok], adjacency_t[ok]) <= 1e-5


def test_refused_inputs_name_the_torch_backend():
    s, t = torch.randn(2, 3, 300, device=DEV), torch.randn(2, 3, 300, device=DEV)
    with pytest.raises(BackendUnavailableError, match="backend='torch'"):
        graph_on_logits_loss(s.double(), t, 2, backend="triton")
    with pytest.raises(BackendUnavailableError, match="k <= 256"):
        graph_on_logits_loss(s, t, 257, backend="triton")
    with pytest.raises(BackendUnavailableError, match="topk_logit_graph: backend='triton'"):
        topk_logit_graph(s[0].double(), 2, backend="triton")
    from kdkernels.select.triton import MAX_K

    assert graph_ops.TRITON_MAX_K == MAX_K


# ----------------------------------------------------- the contract (test_contract.py)


def _contract_inputs():
    s = (torch.randn(3, 3, 23) * 4).to(DEV)
    t = (torch.randn(3, 3, 23) * 4).to(DEV)
    mask = (torch.arange(9).view(3, 3) % 4 != 0).to(DEV)
    return s, t, mask


def _loss(s, t, mask):
    return graph_on_logits_loss(s, t, 4, mask=mask, backend="triton")


def test_fullgraph_compile_matches_eager():
    s, t, mask = _contract_inputs()
    x = s.clone().requires_grad_()
    ref = _loss(x, t, mask)
    ref.backward()
    fn = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    y = s.clone().requires_grad_()
    out = fn(y, t, mask)
    out.backward()
    assert rel_err(out.detach(), ref.detach()) <= 1e-6
    assert rel_err(y.grad, x.grad) <= 1e-6


def test_double_backward_refused_inputs_kept_teacher_without_gradient():
    s, t, mask = _contract_inputs()
    x = s.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(_loss(x, t, mask), x, create_graph=True)
    tt = t.clone().requires_grad_()
    before = (s.clone(), t.clone(), mask.clone())
    out = _loss(x, tt, mask)
    out.backward()
    assert torch.equal(x.detach(), before[0]) and torch.equal(tt.detach(), before[1])
    assert torch.equal(mask, before[2])
    assert tt.grad is None and x.grad is not None and torch.isfinite(x.grad).all()
    empty = torch.zeros(0, 3, 23, device=DEV, requires_grad=True)
    out = graph_on_logits_loss(empty, torch.zeros(0, 3, 23, device=DEV), 4, backend="triton")
    out.backward()
    assert out.item() == 0.0 and empty.grad.shape == empty.shape


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_gradient_work_without_autograd(mode, monkeypatch):
    from kdkernels.graph import triton as graph_triton

    real = graph_triton.graph_loss_forward
    seen = []

    def spy(*args):
        out = real(*args)
        seen.append((args[-1], out[6].numel(), out[7].numel()))
        return out

    monkeypatch.setattr(graph_triton, "graph_loss_forward", spy)
    s, t, mask = _contract_inputs()
    x = s.clone().requires_grad_()
    with getattr(torch, mode)():
        out = _loss(x, t, mask)
    assert not out.requires_grad
    assert seen == [(False, 0, 0)]
    ref = graph_on_logits_loss(s, t, 4, mask=mask, backend="torch")
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("v, k", [(32000, 32), (151936, 256)])
def test_gpu_vocabularies_match_the_float64_path(v, k):
    """At real vocabulary sizes: bf16 logits, the kernels (each of them launched) against
    the float64 torch path on the same (rounded) inputs."""
    from _helpers import assert_launched

    g, t_len = 2, 48
    s = (torch.randn(g, t_len, v, device=DEV) * 4).bfloat16()
    t = (torch.randn(g, t_len, v, device=DEV) * 4).bfloat16()
    t[..., -100:] = -math.inf
    mask = torch.rand(g, t_len, device=DEV) > 0.1
    x = s.clone().requires_grad_()
    out = []

    def run():
        loss = graph_on_logits_loss(x, t, k, mask=mask, backend="triton")
        loss.backward()
        out.append(loss.detach())

    assert_launched(run, "_rows_fwd_kernel", "_runs_kernel", "_gw_kernel", "_finish_kernel",
                    "_rows_bwd_kernel")
    x64 = s.double().requires_grad_()
    ref = graph_on_logits_loss(x64, t.double(), k, mask=mask, backend="torch")
    ref.backward()
    assert rel_err(out[0], ref.detach()) <= 1e-3
    assert rel_err(x.grad, x64.grad) <= 2e-2 and (x.grad[~mask] == 0).all()
