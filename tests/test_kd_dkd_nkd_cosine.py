"""kd_loss's dkd, nkd and cosine divergences (docs/spec.md §1, docs/kd_loss.md).

The published formulas are written out literally here (Decoupled KD's and Normalized KD's
reference code, Liger-Kernel's fused cosine-similarity loss), apart from the float64
oracle in kdkernels/kd/reference.py; both CPU backends run (Triton under
TRITON_INTERPRET=1, set by conftest.py). test_kd.py, test_nonfinite.py, test_fuzz.py and
test_precision.py run these divergences too, through kdkernels.DIVERGENCES.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_launched, rel_err, requires_gpu, run_ranks

import kdkernels as K
from kdkernels._core.backend import recording
from kdkernels.kd.reference import kd_loss_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
NEW = ("dkd", "nkd", "cosine")
F64 = torch.float64


# --- the published formulas, literally ------------------------------------------------

def dkd_paper(s, t, y, alpha, beta, tau):
    """Decoupled KD (Zhao et al., CVPR 2022), as the authors' code computes it per row,
    without its τ² factor: α·KL(b_t‖b_s) + β·KL(p̂_t‖p̂_s), the binary [target, rest]
    probabilities and the non-target classes (the target pushed down by 1000)."""
    gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, y[:, None], True)
    ps, pt = F.softmax(s / tau, 1), F.softmax(t / tau, 1)

    def binary(p):
        return torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)

    tckd = F.kl_div(binary(ps).log(), binary(pt), reduction="none").sum(1)
    nckd = F.kl_div(F.log_softmax(s / tau - 1000.0 * gt, 1),
                    F.softmax(t / tau - 1000.0 * gt, 1), reduction="none").sum(1)
    return alpha * tckd + beta * nckd


def nkd_paper(s, t, y, gamma, tau):
    """Normalized KD (Yang et al., ICCV 2023), the authors' code per row without τ²:
    −t_y log s_y at temperature 1, and −γ Σ_{i≠y} T_i log S_i with T, S the softmaxes
    of the non-target logits at temperature τ."""
    n = s.shape[0]
    s_y = F.log_softmax(s, 1).gather(1, y[:, None])[:, 0]
    t_y = F.softmax(t, 1).gather(1, y[:, None])[:, 0]
    keep = torch.ones_like(s, dtype=torch.bool).scatter_(1, y[:, None], False)
    log_s = F.log_softmax(s[keep].reshape(n, -1) / tau, 1)
    p_t = F.softmax(t[keep].reshape(n, -1) / tau, 1)
    return -t_y * s_y - gamma * (p_t * log_s).sum(1)


def cosine_liger(s, t, beta, tau):
    """Liger-Kernel's fused cosine-similarity distillation loss per row:
    β·(1 − cos(normalize(s/τ), normalize(t/τ)))."""
    sn = F.normalize(s / tau, p=2, dim=-1)
    tn = F.normalize(t / tau, p=2, dim=-1)
    return beta * (1 - F.cosine_similarity(sn, tn, dim=-1))


def _grad(fn, s, *args, **kw):
    x = s.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    out.sum().backward()
    return out.detach(), x.grad


def _case(n, v, std, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=F64) * std
    t = torch.randn(n, v, generator=g, dtype=F64) * std
    y = torch.randint(0, v, (n,), generator=g)
    return s.to(dtype), t.to(dtype), y


def _tol(backend):
    """Gradients: the torch path computes float64 inputs in float64, the kernels in
    float32. Losses come back in float32 (loss_tol)."""
    return 1e-10 if backend == "torch" else 1e-5


def loss_tol(backend):
    return 2e-7 if backend == "torch" else 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 8.0), (0.5, 2.0), (0.0, 1.0), (2.0, 0.0)])
def test_dkd_is_the_papers_formula(backend, tau, weights):
    al, be = weights
    s, t, y = _case(10, 37, 3.0)
    y[3] = s[3].argmax()  # the label at the student's argmax
    y[4] = t[4].argmax()
    got, g = _grad(K.kd_loss, s, t, y, divergence="dkd", dkd_alpha=al, dkd_beta=be,
                   temperature=tau, reduction="none", backend=backend)
    ref, g_ref = _grad(dkd_paper, s, t, y, al, be, tau)
    assert rel_err(got, ref) <= loss_tol(backend) and rel_err(g, g_ref) <= _tol(backend)
    # the paper's τ² is soft_label_weight = τ²
    scaled = K.kd_loss(s, t, y, divergence="dkd", dkd_alpha=al, dkd_beta=be, temperature=tau,
                       soft_label_weight=tau**2, reduction="none", backend=backend)
    assert rel_err(scaled, ref * tau**2) <= loss_tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("gamma", [1.5, 0.4, 0.0])
def test_nkd_is_the_papers_formula(backend, tau, gamma):
    s, t, y = _case(10, 37, 3.0, seed=1)
    y[2] = s[2].argmax()
    kw = dict(divergence="nkd", temperature=tau, reduction="none", backend=backend)
    got, g = _grad(K.kd_loss, s, t, y, nkd_gamma=gamma, **kw)
    ref, g_ref = _grad(nkd_paper, s, t, y, gamma, tau)
    assert rel_err(got, ref) <= loss_tol(backend) and rel_err(g, g_ref) <= _tol(backend)
    # the paper's γ·τ² on the non-target term alone: nkd_gamma = γ·τ²
    exact = K.kd_loss(s, t, y, nkd_gamma=gamma * tau**2, **kw)
    paper = nkd_paper(s, t, y, gamma * tau**2, tau)
    assert rel_err(exact, paper) <= loss_tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_cosine_is_ligers_formula(backend, tau):
    s, t, _ = _case(9, 41, 5.0, seed=2)
    t[:3] = s[:3] * 2.0 + 0.01 * t[:3]  # nearly parallel rows
    got, g = _grad(K.kd_loss, s, t, None, divergence="cosine", temperature=tau,
                   reduction="none", backend=backend)
    ref, g_ref = _grad(cosine_liger, s, t, 1.0, tau)
    assert rel_err(got, ref) <= loss_tol(backend) and rel_err(g, g_ref) <= _tol(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_cosine_is_ligers_fused_loss(backend):
    """LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=h, weight_soft_loss=w,
    beta=β, temperature=τ) is fused_linear_kd_loss(divergence='cosine',
    soft_label_weight=w·β, hard_label_weight=h, temperature=τ): both sum over the
    non-ignored rows and divide by their count."""
    g = torch.Generator().manual_seed(3)
    n, hid, v = 12, 16, 45
    hs = torch.randn(n, hid, generator=g, dtype=F64)
    ws = torch.randn(v, hid, generator=g, dtype=F64)
    ht = torch.randn(n, hid, generator=g, dtype=F64)
    wt = torch.randn(v, hid, generator=g, dtype=F64)
    y = torch.randint(0, v, (n,), generator=g)
    y[[1, 6]] = -100
    w_hard, w_soft, beta, tau = 0.3, 0.7, 0.5, 2.0

    def liger(h, w):
        sl, tl = h @ w.T, ht @ wt.T
        valid = y != -100
        n_valid = valid.sum().clamp_min(1)
        hard = F.cross_entropy(sl, y, ignore_index=-100, reduction="sum") / n_valid
        soft = cosine_liger(sl, tl, beta, tau).masked_fill(~valid, 0.0).sum() / n_valid
        return w_hard * hard + w_soft * soft

    h1, w1 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ours = K.fused_linear_kd_loss(h1, w1, ht, wt, y, divergence="cosine", temperature=tau,
                                  soft_label_weight=w_soft * beta, hard_label_weight=w_hard,
                                  backend=backend)
    ours.backward()
    h2, w2 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ref = liger(h2, w2)
    ref.backward()
    tol = _tol(backend)
    assert abs(ours.item() - ref.item()) <= loss_tol(backend) * abs(ref.item())
    assert rel_err(h1.grad, h2.grad) <= tol and rel_err(w1.grad, w2.grad) <= tol


# --- against the float64 oracle at wide spreads ----------------------------------------

def _hard_rows(v, seed):
    """Rows where float32 needs the pivot and the tail forms: std 30, the student's
    argmax far above the rest, teacher and student peaking together at the label or
    at the same non-target class, a teacher sure of the label (1 − p_y ≈ e⁻⁴⁰)."""
    g = torch.Generator().manual_seed(seed)
    n = 8
    s = torch.randn(n, v, generator=g, dtype=F64) * 30
    t = torch.randn(n, v, generator=g, dtype=F64) * 30
    y = torch.randint(0, v, (n,), generator=g)
    for r in range(n):
        j = int(s[r].argmax())
        s[r, j] = s[r].topk(2).values[1] + 25.0
    t[0] = s[0] + torch.randn(v, generator=g, dtype=F64) * 0.5
    y[0] = s[0].argmax()  # both peak at the label
    t[1] = s[1] + torch.randn(v, generator=g, dtype=F64) * 0.5
    y[1] = s[1].topk(2).indices[1]  # both peak at the same non-target class
    t[2, y[2]] = t[2].max() + 40.0  # the teacher sure of the label
    y[3] = s[3].argmax()
    t[4] = torch.randn(v, generator=g, dtype=F64)  # a spread teacher
    y[6] = -100
    return s, t, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
@pytest.mark.parametrize("tau", [1.0, 0.7, 2.0])
def test_wide_spreads_against_the_oracle(backend, divergence, tau):
    s, t, y = _hard_rows(300, seed=5)
    kw = dict(divergence=divergence, temperature=tau, reduction="none",
              hard_label_weight=0.3)
    go = torch.linspace(-2.0, 3.0, s.shape[0], dtype=F64)
    x = s.float().clone().requires_grad_(True)
    loss = K.kd_loss(x, t.float(), y, backend=backend, **kw)
    loss.backward(go.float())
    xr = s.float().double().clone().requires_grad_(True)
    ref = kd_loss_ref(xr, t.float().double(), y, **kw)
    ref.backward(go)
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5 and rel_err(x.grad, xr.grad) <= 1e-5
    assert (loss[6] == 0) and (x.grad[6] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
def test_row_views_and_float64(backend, divergence):
    """A [B, T-1, V] slice of [B, T, V] (rows at two strides, no copy) and float64
    inputs, against the oracle."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 5, 70, generator=g, dtype=F64) * 8
    t = torch.randn(2, 5, 70, generator=g, dtype=F64) * 8
    y = torch.randint(0, 70, (2, 4), generator=g)
    y[1, 2] = -100
    kw = dict(divergence=divergence, temperature=1.5, hard_label_weight=0.2)
    x = s.clone().requires_grad_(True)
    K.kd_loss(x[:, :-1], t[:, :-1], y, backend=backend, **kw).backward()
    xr = s.clone().requires_grad_(True)
    kd_loss_ref(xr[:, :-1], t[:, :-1], y, **kw).backward()
    assert (x.grad[:, -1] == 0).all()
    assert rel_err(x.grad, xr.grad) <= (1e-10 if backend == "torch" else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
@pytest.mark.parametrize("scaling", ["none", "tau_squared"])
def test_teacher_temperature_and_tau_squared(backend, divergence, scaling):
    """The teacher's own temperature (b = t/τ_t; nkd's target term stays at 1) and the
    τ² factor on the soft term, against the oracle."""
    s, t, y = _case(7, 60, 6.0, seed=8, dtype=torch.float32)
    y[1] = -100
    kw = dict(divergence=divergence, temperature=1.6, teacher_temperature=0.8,
              temperature_scaling=scaling, hard_label_weight=0.3, reduction="none")
    got, g = _grad(K.kd_loss, s, t, y, backend=backend, **kw)
    ref, g_ref = _grad(kd_loss_ref, s.double(), t.double(), y, **kw)
    assert rel_err(got, ref) <= 1e-5 and rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_kernels_ran(backend):
    s, t, y = _case(4, 50, 2.0, dtype=torch.float32)
    for div in NEW:
        with recording() as calls:
            K.kd_loss(s, t, y, divergence=div, backend=backend)
        assert calls == [("kd_loss", backend)]


# --- masks, non-finite inputs, degenerate rows -----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_minus_inf_in_both_rows_is_a_masked_class(backend):
    s, t, _ = _case(6, 30, 3.0, dtype=torch.float32)
    s2, t2 = s.clone(), t.clone()
    s2[:, [4, 9]] = -math.inf
    t2[:, [4, 9]] = -math.inf
    keep = [c for c in range(30) if c not in (4, 9)]
    kw = dict(divergence="cosine", reduction="none", backend=backend)
    got, g = _grad(K.kd_loss, s2, t2, None, **kw)
    ref, g_ref = _grad(K.kd_loss, s[:, keep], t[:, keep], None, **kw)
    assert rel_err(got, ref) <= 1e-6 and rel_err(g[:, keep], g_ref) <= 1e-6
    assert (g[:, [4, 9]] == 0).all()
    s2[2, 7] = -math.inf  # −inf in one row only: that row is NaN (as F.normalize gives)
    got, g = _grad(K.kd_loss, s2, t2, None, **kw)
    assert math.isnan(got[2]) and torch.isnan(g[2]).all()
    assert torch.isfinite(got[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_zero_rows(backend):
    """A zero row has cosine 0 (as Liger's normalisation gives): D = 1, gradient 0."""
    s, t, _ = _case(4, 20, 3.0, dtype=torch.float32)
    s[1] = 0.0
    t[2] = 0.0
    got, g = _grad(K.kd_loss, s, t, None, divergence="cosine", reduction="none",
                   backend=backend)
    assert got[1] == 1.0 and got[2] == 1.0 and (g[1] == 0).all() and (g[2] == 0).all()
    assert rel_err(got[[0, 3]], cosine_liger(s[[0, 3]].double(), t[[0, 3]].double(), 1.0,
                                             1.0)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["dkd", "nkd"])
def test_masked_label_and_masked_rest(backend, divergence):
    """−inf masks around the label: a student that masks the label the teacher puts mass
    on gives +inf (as forward KL); a row whose only finite class is the label gives 0;
    V = 1 gives 0. Each as the oracle."""
    s, t, y = _case(4, 12, 2.0, dtype=torch.float32)
    y[:] = torch.tensor([3, 5, 0, 7])
    s[0, 3] = -math.inf  # student masks the label
    s[1, [c for c in range(12) if c != 5]] = -math.inf  # only the label is finite
    t[1, [c for c in range(12) if c != 5]] = -math.inf
    kw = dict(divergence=divergence, reduction="none")
    got = K.kd_loss(s, t, y, backend=backend, **kw)
    ref = kd_loss_ref(s.double(), t.double(), y, **kw)
    assert got[0] == math.inf and ref[0] == math.inf
    assert got[1] == 0 and ref[1] == 0
    assert rel_err(got[2:], ref[2:]) <= 1e-6
    one, g = _grad(K.kd_loss, torch.randn(4, 1), torch.randn(4, 1),
                   torch.zeros(4, dtype=torch.long), backend=backend, **kw)
    assert (one == 0).all() and (g == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
def test_nan_policy_and_ignored_rows(backend, divergence):
    s, t, y = _case(6, 25, 3.0, dtype=torch.float32)
    s[1, 4] = math.nan
    t[3, 0] = math.inf
    s[5] = math.nan  # ignored below: it never matters
    y[5] = -100
    got, g = _grad(K.kd_loss, s, t, y, divergence=divergence, reduction="none",
                   hard_label_weight=0.2, backend=backend)
    assert math.isnan(got[1]) and math.isnan(got[3])
    assert torch.isnan(g[1]).all() and torch.isnan(g[3]).all()
    assert got[5] == 0 and (g[5] == 0).all()
    assert torch.isfinite(got[[0, 2, 4]]).all() and torch.isfinite(g[[0, 2, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
def test_launchers_write_the_two_addends(backend, divergence):
    """parts[n] = (soft_w·D_n, hard_w·CE_n) (return_components' buffer): NaN in a bad
    row, 0 in an ignored one, their sum the loss."""
    from kdkernels.kd.ops import KD_FWD
    from kdkernels.kd.params import _CODES, KDParams

    s, t, y = _case(6, 30, 4.0, dtype=torch.float32)
    y[2] = -100
    s[4, 3] = math.nan
    prm = KDParams(_CODES[divergence], 1 / 1.5, 0.8, 1.3, 0.4, -100)
    loss, parts = torch.empty(6), torch.empty(6, 2)
    KD_FWD(backend, s, t, y, torch.tensor(1.0), loss, s.new_empty(0), prm, 30, parts=parts)
    ce = F.cross_entropy(s.double(), torch.where(y < 0, 0, y), reduction="none")
    ok = [0, 1, 3, 5]
    assert torch.allclose(parts[:, 1][ok].double(), 0.4 * ce[ok], rtol=1e-6)
    assert torch.allclose(parts.sum(1)[ok], loss[ok], rtol=1e-6)
    assert (parts[ok, 0] > 0).all()
    assert torch.isnan(parts[4]).all() and (parts[2] == 0).all()


# --- arguments ----------------------------------------------------------------------

def test_arguments():
    s, t, y = _case(3, 8, 1.0, dtype=torch.float32)
    for div in ("dkd", "nkd"):
        with pytest.raises(ValueError, match="needs labels"):
            K.kd_loss(s, t, divergence=div)
    with pytest.raises(ValueError, match="dkd_alpha=2 has no effect"):
        K.kd_loss(s, t, y, divergence="nkd", dkd_alpha=2.0)
    with pytest.raises(ValueError, match="nkd_gamma=1 has no effect"):
        K.kd_loss(s, t, y, divergence="forward_kl", nkd_gamma=1.0)
    with pytest.raises(ValueError, match="beta=0.3 has no effect"):
        K.kd_loss(s, t, y, divergence="dkd", beta=0.3)
    with pytest.raises(ValueError, match="dkd_beta must be in"):
        K.kd_loss(s, t, y, divergence="dkd", dkd_beta=-1.0)
    with pytest.raises(ValueError, match="nkd_gamma must be finite"):
        K.kd_loss(s, t, y, divergence="nkd", nkd_gamma=math.inf)
    # the defaults themselves may be passed to any divergence
    K.kd_loss(s, t, y, divergence="jsd", dkd_alpha=1.0, dkd_beta=8.0, nkd_gamma=1.5)
    # α = β = 0: the soft term is identically 0 (the hard label remains)
    zero = K.kd_loss(s, t, y, divergence="dkd", dkd_alpha=0.0, dkd_beta=0.0,
                     hard_label_weight=0.5)
    ce = K.kd_loss(s, t, y, divergence="forward_kl", soft_label_weight=0.0,
                   hard_label_weight=0.5)
    assert torch.equal(zero, ce)
    mod = K.KDLoss(divergence="dkd", dkd_alpha=0.5, dkd_beta=2.0)
    assert torch.equal(mod(s, t, y), K.kd_loss(s, t, y, divergence="dkd", dkd_alpha=0.5,
                                                 dkd_beta=2.0))
    with pytest.raises(ValueError, match="needs labels"):
        K.FusedLinearKDLoss(divergence="nkd")(s, torch.randn(8, 8), s, torch.randn(8, 8))


@pytest.mark.interpreter
@pytest.mark.parametrize("divergence", NEW)
def test_vocab_parallel_triton_refuses_before_any_collective(divergence):
    s, t, y = _case(3, 8, 1.0, dtype=torch.float32)
    with pytest.raises(K.BackendUnavailableError, match="backend='torch' only"):
        K.kd_loss(s[:, :4], t[:, :4], y, divergence=divergence, backend="triton",
                  vocab_parallel=K.VocabParallel(0, 4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", NEW)
def test_fused_equals_kd_loss_on_the_logits(backend, divergence):
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(2, 5, 12, generator=g)
    ws, wt = torch.randn(40, 12, generator=g), torch.randn(40, 9, generator=g)
    ht = torch.randn(2, 5, 9, generator=g)
    y = torch.randint(0, 40, (2, 5), generator=g)
    y[0, 1] = -100
    kw = dict(divergence=divergence, temperature=1.7, hard_label_weight=0.4,
              backend=backend)
    h1 = hs.clone().requires_grad_()
    K.fused_linear_kd_loss(h1, ws, ht, wt, y, chunk_size=3, **kw).backward()
    h2 = hs.clone().requires_grad_()
    K.kd_loss(h2 @ ws.T, ht @ wt.T, y, **kw).backward()
    assert rel_err(h1.grad, h2.grad) <= 1e-5


# --- vocabulary parallelism (torch two-phase path) on 2 gloo ranks ---------------------

VP_V, VP_N = 29, 10
VP_BOUNDS = [(0, 17), (17, VP_V)]


def _vp_inputs(std, gen):
    s = torch.randn(VP_N, VP_V, generator=gen, dtype=F64) * std
    t = torch.randn(VP_N, VP_V, generator=gen, dtype=F64) * std
    t[:3] = s[:3] + torch.randn(3, VP_V, generator=gen, dtype=F64) * 0.5  # same peaks
    y = torch.randint(0, VP_V, (VP_N,), generator=gen)
    y[0] = s[0].argmax()  # the label at the pivot
    y[1] = s[1].topk(2).indices[1]  # the non-target pivot where both peak
    y[4], y[5] = 3, VP_V - 2  # one label on each rank
    y[7] = -100
    s[8, 20] = -math.inf  # a masked class (both models)
    t[8, 20] = -math.inf
    return s, t, y


def _vp_cases(rank, out):
    import torch.distributed as dist

    a, b = VP_BOUNDS[rank]
    gen = torch.Generator().manual_seed(11)
    worst = {}
    for div in NEW:
        for tau, hw, std in ((1.0, 0.0, 3.0), (2.0, 0.3, 30.0), (0.7, 0.5, 10.0)):
            s, t, y = _vp_inputs(std, gen)
            kw = dict(divergence=div, temperature=tau, hard_label_weight=hw,
                      reduction="none")
            full = s.clone().requires_grad_()
            ref = K.kd_loss(full, t, y, **kw)
            ref.sum().backward()
            loc = s[:, a:b].clone().requires_grad_()
            got = K.kd_loss(loc, t[:, a:b], y, vocab_parallel=K.VocabParallel(a, b), **kw)
            got.sum().backward()
            pad = torch.zeros(VP_N, 17, dtype=F64)
            pad[:, : b - a] = loc.grad
            parts = [torch.empty_like(pad) for _ in VP_BOUNDS]
            dist.all_gather(parts, pad)
            grad = torch.cat([p[:, : e - f] for p, (f, e) in zip(parts, VP_BOUNDS)], 1)
            key = div
            worst[key] = max(worst.get(key, 0.0), rel_err(got, ref),
                             rel_err(grad, full.grad))
    # a NaN on rank 1 makes its row NaN on every rank; an ignored row stays 0
    s, t, y = _vp_inputs(3.0, gen)
    s[2, 20] = math.nan
    s[7, 2] = math.nan  # y[7] is ignored
    nan_ok = []
    for div in NEW:
        loc = s[:, a:b].clone().requires_grad_()
        got = K.kd_loss(loc, t[:, a:b], y, divergence=div, reduction="none",
                        hard_label_weight=0.2, vocab_parallel=K.VocabParallel(a, b))
        got.sum().backward()
        nan_ok.append(bool(got[2].isnan()) and bool(loc.grad[2].isnan().all())
                      and got[7] == 0 and bool((loc.grad[7] == 0).all())
                      and bool(got[[0, 1, 3, 4, 5, 6, 8, 9]].isfinite().all()))
    out["nan_ok"] = nan_ok
    # the launcher's (soft, hard) addends (return_components' buffer)
    from kdkernels.kd.parallel import kd_fwd_vocab_parallel
    from kdkernels.kd.params import _CODES, KDParams
    from kdkernels.parallel import Shards

    s, t, y = _vp_inputs(3.0, gen)
    ce = F.cross_entropy(s, torch.where(y < 0, 0, y), reduction="none")
    valid = y != -100
    parts_ok = []
    for div in NEW:
        prm = KDParams(_CODES[div], 1 / 1.5, 0.8, 1.3, 0.4, -100)
        loss, parts = torch.empty(VP_N), torch.empty(VP_N, 2)
        kd_fwd_vocab_parallel(s[:, a:b], torch.tensor(1.0), loss, s.new_empty(0), "torch", y,
                              t[:, a:b], prm, Shards(a, b, VP_V, 17, None), parts)
        parts_ok.append(bool(torch.allclose(parts.sum(1), loss))
                        and bool(torch.allclose(parts[valid, 1].double(), 0.4 * ce[valid]))
                        and bool((parts[~valid] == 0).all()))
    out["parts_ok"] = parts_ok
    # fused: vocabulary-parallel heads
    hs = torch.randn(6, 8, generator=gen, dtype=F64)
    ws = torch.randn(VP_V, 8, generator=gen, dtype=F64) * 2
    wt = torch.randn(VP_V, 8, generator=gen, dtype=F64) * 2
    y = torch.randint(0, VP_V, (6,), generator=gen)
    for div in NEW:
        h1 = hs.clone().requires_grad_()
        ref = K.fused_linear_kd_loss(h1, ws, hs, wt, y, divergence=div, temperature=1.3)
        ref.backward()
        h2 = hs.clone().requires_grad_()
        got = K.fused_linear_kd_loss(h2, ws[a:b], hs, wt[a:b], y, divergence=div,
                                     temperature=1.3, vocab_parallel=K.VocabParallel(a, b))
        got.backward()
        worst["fused_" + div] = max(rel_err(got, ref), rel_err(h2.grad, h1.grad))
    out["errors"] = worst


def test_vocab_parallel_matches_one_process(tmp_path):
    for res in run_ranks([_vp_cases], 2, tmp_path):
        for key, err in res["errors"].items():
            assert err <= 1e-10, (key, err)
        assert res["nan_ok"] == [True] * len(NEW)
        assert res["parts_ok"] == [True] * len(NEW)


# --- GPU (skipped without one) -----------------------------------------------------------

@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend, kernel", [("triton", "_kd_fwd_kernel_"),
                                             ("cuda", "kdk::kd_fwd_kernel_")])
@pytest.mark.parametrize("plan", ["auto", "stream", "smem:2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", NEW)
def test_gpu_backends_match_the_oracle(backend, kernel, plan, dtype, divergence, monkeypatch):
    if backend == "triton" and plan != "auto":
        pytest.skip("the plans are the CUDA kernel's")
    monkeypatch.setenv("KDKERNELS_CUDA_KD_PLAN", plan)
    v = 151936 if plan != "smem:2" else 32000
    g = torch.Generator(device="cuda").manual_seed(v)
    s = (torch.randn(24, v, device="cuda", generator=g) * 10).to(dtype)
    t = (torch.randn(24, v, device="cuda", generator=g) * 10).to(dtype)
    y = torch.randint(0, v, (24,), device="cuda", generator=g)
    y[3] = s[3].argmax()
    y[5] = -100
    kw = dict(divergence=divergence, temperature=1.5, hard_label_weight=0.2,
              reduction="none")
    x = s.clone().requires_grad_(True)
    out = []

    def call():
        loss = K.kd_loss(x, t, y, backend=backend, **kw)
        loss.sum().backward()
        out.append(loss.detach())

    name = kernel + ("cosine" if divergence == "cosine" else "decoupled")
    assert_launched(call, name)
    xr = s.double().clone().requires_grad_(True)
    ref = kd_loss_ref(xr, t.double(), y, **kw)
    ref.sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out[0], ref) <= tol and rel_err(x.grad, xr.grad) <= tol
