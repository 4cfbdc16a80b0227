"""Random-sampling KD (kdkernels/sampled): the sampler's draws, its estimate p̂ and the loss.

- The loss against the float64 oracle (the literal KL(p̂ ‖ q) + CE with autograd) on the
  torch and triton backends (the Triton interpreter on a CPU), spreads up to std 30.
- The sampler: reproducible per seed, draws distributed as the proposal (chi-square and
  per-class binomial bounds), −inf classes never drawn, ignored rows never read,
  duplicates merged; the importance weights against the formula.
- The estimator: over many draws the sampled-KD gradient averages to the full
  forward-KL gradient q − p, within 5 standard deviations of the mean of the draws.
- The fused loss equals the unfused one on the same samples.
Statistical tests use fixed seeds; their bounds come from the variance of the estimate.
"""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import rel_err

import kdkernels as K
from kdkernels._core.backend import BackendUnavailableError, recording
from kdkernels.sampled import triton as sampled_triton
from kdkernels.sampled.merge import merge_draws
from kdkernels.sampled.reference import estimate_ref, proposal_ref, sampled_kd_loss_ref

IGNORE = -100
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SAMPLERS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
LOSS_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
# a float32-stored weight p̂ = c/k carries a rounding of at most 2⁻²⁴ relative: the floor of
# every statistical bound below (a class whose probability is ~0 has no variance)
W_ROUND = 2.0**-24


@pytest.fixture
def small_tiles(monkeypatch):
    """16 columns a tile, at most 64 draws a group, 2 tiles a pick step on the interpreter:
    every loop of the sampler crosses blocks."""
    pytest.importorskip("triton")
    monkeypatch.setattr(sampled_triton, "CPU_BLOCK_V", 16)
    monkeypatch.setattr(sampled_triton, "CPU_BLOCK_K", 64)
    monkeypatch.setattr(sampled_triton, "CPU_BLOCK_T", 2)


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _teacher(n, v, std, *, masked=0):
    """Teacher logits with row spreads std, std/3, std/10 and `masked` −inf classes per row."""
    spread = std / torch.tensor([1.0, 3.0, 10.0]).repeat(n)[:n, None]
    t = torch.randn(n, v) * spread
    for i in range(n):
        if masked:
            t[i, torch.randperm(v)[:masked]] = -math.inf
    return t.to(DEV)


def _counts(smp, v):
    """Dense draw counts [N, V] of a record drawn from p itself (p̂ = c / k)."""
    n, k = smp.indices.shape
    c = torch.zeros(n, v + 1, dtype=torch.float64, device=smp.indices.device)
    ids = smp.indices.long().clamp_min(-1) % (v + 1)  # padding into a spare column
    c.scatter_add_(1, ids, smp.weights.double() * smp.draws)
    return c[:, :v].round()


# -------------------------------------------------------------------- the loss vs the oracle


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
@pytest.mark.parametrize("std", [5.0, 30.0])
@pytest.mark.parametrize("tau, hard", [(1.0, 0.0), (1.0, 0.4), (2.0, 0.0), (0.7, 0.4)])
def test_loss_and_gradient_match_the_float64_oracle(backend, std, tau, hard):
    n, v, k = 9, 37, 12
    t = _teacher(n, v, std)
    y = torch.randint(0, v, (n,), device=DEV)
    y[::4] = IGNORE
    smp = K.sample_teacher(t, k, labels=y, temperature=tau, generator=_gen(1))
    s = (torch.randn(n, v, device=DEV) * std / torch.tensor([1.0, 3.0, 10.0], device=DEV)
         .repeat(3)[:, None]).requires_grad_(True)
    g_up = torch.rand(n, device=DEV) + 0.5
    for reduction in ("none", "mean"):
        with recording() as ran:
            out = K.sampled_kd_loss(s, smp, y, temperature=tau, hard_label_weight=hard,
                                    reduction=reduction, backend=backend)
        assert {be for _, be in ran} == {backend}
        s64 = s.detach().double().requires_grad_(True)
        ref = sampled_kd_loss_ref(s64, smp.indices, smp.weights, y, temperature=tau,
                                  hard_label_weight=hard, reduction=reduction)
        up = g_up if reduction == "none" else torch.tensor(1.7, device=DEV)
        (g,) = torch.autograd.grad(out, s, up)
        (g_ref,) = torch.autograd.grad(ref, s64, up.double())
        assert out.dtype == torch.float32
        assert rel_err(out, ref) <= 1e-5
        assert rel_err(g, g_ref) <= 1e-5


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_gradient_is_q_minus_p_hat_at_tau_1(backend):
    """The bucket tail holds no teacher mass: ∂L/∂s = q − p̂ over the whole vocabulary."""
    n, v, k = 6, 29, 10
    smp = K.sample_teacher(_teacher(n, v, 4.0), k, generator=_gen(2))
    s = (torch.randn(n, v, device=DEV, dtype=torch.float64) * 4).requires_grad_(True)
    K.sampled_kd_loss(s, smp, reduction="sum", backend=backend).backward()
    p_hat = torch.zeros(n, v + 1, dtype=torch.float64, device=DEV).scatter_add_(
        1, smp.indices.long() % (v + 1), smp.weights.double())[:, :v]
    want = torch.softmax(s.detach(), -1) - p_hat
    assert (s.grad - want).abs().max() <= 1e-6  # p̂ stored in float32: ≤ k·2⁻²⁴ off in Σ


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_ignored_rows_with_nan_never_matter(backend):
    n, v, k = 7, 23, 8
    y = torch.randint(0, v, (n,), device=DEV)
    y[1::3] = IGNORE
    t = _teacher(n, v, 6.0)
    t[y == IGNORE] = math.nan
    smp = K.sample_teacher(t, k, labels=y, generator=_gen(3))
    ign = y == IGNORE
    assert (smp.indices[ign] == -1).all() and (smp.weights[ign] == 0).all()
    assert torch.isfinite(smp.weights[~ign]).all()
    s = torch.randn(n, v, device=DEV) * 6
    s[ign] = math.nan
    s.requires_grad_(True)
    out = K.sampled_kd_loss(s, smp, y, hard_label_weight=0.3, reduction="none",
                            backend=backend)
    out.sum().backward()
    assert (out[ign] == 0).all() and torch.isfinite(out).all()
    assert (s.grad[ign] == 0).all() and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_counted_nan_teacher_row_makes_its_loss_nan(sampler):
    n, v = 4, 19
    t = _teacher(n, v, 3.0)
    t[2, 5] = math.nan
    t[3] = -math.inf  # no finite entry: no distribution either
    smp = K.sample_teacher(t, 6, generator=_gen(4), backend=sampler)
    out = K.sampled_kd_loss(torch.randn(n, v, device=DEV), smp, reduction="none")
    assert torch.isfinite(out[:2]).all() and out[2:].isnan().all()


# -------------------------------------------------------------------- the sampler


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_is_reproducible_per_seed(sampler, small_tiles):
    t = _teacher(6, 45, 2.0)
    a = K.sample_teacher(t, 20, generator=_gen(7), backend=sampler)
    b = K.sample_teacher(t, 20, generator=_gen(7), backend=sampler)
    c = K.sample_teacher(t, 20, generator=_gen(8), backend=sampler)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.indices, c.indices)
    torch.manual_seed(5)  # generator=None: the default generator, seeded by manual_seed
    d = K.sample_teacher(t, 20, backend=sampler)
    torch.manual_seed(5)
    e = K.sample_teacher(t, 20, backend=sampler)
    assert torch.equal(d.indices, e.indices)


def _wilson_hilferty(dof: int, z: float) -> float:
    """The chi-square quantile whose upper tail is the normal's above z (z = 5: ~3e-7)."""
    h = 2.0 / (9.0 * dof)
    return dof * (1.0 - h + z * math.sqrt(h)) ** 3


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_draw_frequencies_match_the_distribution(sampler, tau, small_tiles):
    """N rows of one teacher row: N·k independent draws from p = softmax(t/τ); a chi-square
    test over the classes expected >= 5 times (pooled below) and a 5σ binomial bound per
    class; −inf classes are never drawn. (A 1% error in τ moves the chi-square of the
    torch sampler's 5·10⁵ draws far past the bound; the interpreter affords 10⁴.)"""
    v, k = 40, 512
    n = 1000 if sampler == "torch" else 24
    row = torch.randn(v) * 3.0
    row[[3, 17, 31]] = -math.inf
    t = row.to(DEV).expand(n, v)
    smp = K.sample_teacher(t, k, temperature=tau, generator=_gen(11), backend=sampler)
    assert smp.unbiased and smp.draws == k
    obs = _counts(smp, v).sum(0)
    assert obs.sum() == n * k
    p = proposal_ref(row, tau).to(DEV)
    assert (obs[p == 0] == 0).all()
    expect = n * k * p
    sd = torch.sqrt(n * k * p * (1 - p))
    assert ((obs - expect).abs() <= 5 * sd + 1e-9).all()
    big = expect >= 5
    o = torch.cat([obs[big], obs[~big].sum(0, keepdim=True)])
    e = torch.cat([expect[big], expect[~big].sum(0, keepdim=True)])
    keep = e > 0
    chi2 = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    assert chi2 <= _wilson_hilferty(int(keep.sum()) - 1, 5.0), chi2


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_records_hold_merged_duplicates(sampler, small_tiles):
    n, v, k = 8, 21, 30  # k > V: at most V distinct ids, the record keeps min(k, V) slots
    smp = K.sample_teacher(_teacher(n, v, 1.0, masked=2), k, generator=_gen(12),
                           backend=sampler)
    assert smp.indices.shape == (n, v) and smp.indices.dtype == torch.int32
    for ids, w in zip(smp.indices, smp.weights):
        ok = ids >= 0
        u = ids[ok]
        assert ok.sum() >= 1 and (ok[: int(ok.sum())]).all()  # ids first, then padding
        assert (u[1:] > u[:-1]).all()  # distinct, ascending
        assert (w[~ok] == 0).all() and (w[ok] > 0).all()
        c = w[ok].double() * k
        assert torch.allclose(c, c.round(), atol=1e-4) and int(c.round().sum()) == k


def test_merge_counts_duplicates_and_forms_the_importance_weights():
    """merge_draws against the literal formulas: p̂ = c/k (τ_r = τ) and the
    self-normalised c·(p/r) / Σ c·(p/r) with p, r formed over the full vocabulary."""
    v, k = 11, 9
    x = torch.randn(4, v, dtype=torch.float64) * 3
    draws = torch.tensor([[3, 3, 7, 0, 3, 10, 7, 7, 7], [5] * 9, [-1] * 9, [-2] * 9],
                         dtype=torch.int32)
    counts = torch.zeros(2, v, dtype=torch.float64).scatter_add_(
        1, draws[:2].long(), torch.ones(2, k, dtype=torch.float64))
    for tau, tau_r in ((1.0, 1.0), (1.0, 1.7), (2.0, 0.8)):
        ids, w = merge_draws(draws, x, 1 / tau, 1 / tau_r, v)
        assert ids[0, :4].tolist() == [0, 3, 7, 10] and (ids[0, 4:] == -1).all()
        assert ids[1, 0] == 5 and (ids[1, 1:] == -1).all()
        assert (ids[2] == -1).all() and (w[2] == 0).all()  # a skipped row: padding
        assert ids[3, 0] == 0 and w[3, 0].isnan() and (ids[3, 1:] == -1).all()
        want = estimate_ref(counts, x[:2], tau, tau_r)
        got = torch.zeros(2, v + 1, dtype=torch.float64).scatter_add_(
            1, ids[:2].long() % (v + 1), w[:2].double())[:, :v]
        assert (got - want).abs().max() <= 4 * W_ROUND


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_proposal_temperature_weights(sampler):
    """With τ_r ≠ τ the weights are the self-normalised importance weights of the draws;
    every drawn id keeps its count."""
    n, v, k = 5, 17, 40
    t = _teacher(n, v, 3.0)
    smp = K.sample_teacher(t, k, temperature=1.0, proposal_temperature=2.0,
                           generator=_gen(13), backend=sampler)
    assert not smp.unbiased and smp.proposal_temperature == 2.0
    sums = smp.weights.double().sum(-1)
    assert (sums - 1).abs().max() <= k * W_ROUND
    ok = smp.indices >= 0
    # w_i = c_i ρ_i / Z with ρ ∝ exp(t_i (1/τ − 1/τ_r)) = exp(t_i / 2): the draw counts
    # c_i = k · (w_i/ρ_i) / Σ_j (w_j/ρ_j) come back as integers >= 1 summing to k
    log_rho = t.double().gather(1, smp.indices.long().clamp_min(0)) * 0.5
    lw = torch.where(ok, smp.weights.double().log() - log_rho, -math.inf)
    c = k * torch.softmax(lw, -1)
    assert (c[ok] >= 1 - 1e-4).all() and (c - c.round()).abs().max() <= 1e-4
    assert ((c.sum(-1) - k).abs() <= 1e-9).all()


# -------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_expected_gradient_is_the_full_forward_kl_gradient(sampler, small_tiles):
    """M independent records of one row: the mean of the sampled-KD gradients q − p̂_m
    is q − p within 5σ per class, σ² = p(1 − p) / (k·M) (the variance of the mean of the
    multinomial frequencies), plus the float32 rounding of the stored p̂."""
    v, k = 30, 64
    m = 2000 if sampler == "torch" else 150
    t_row = torch.randn(v) * 3.0
    t_row[4] = -math.inf
    t = t_row.to(DEV).expand(m, v)
    smp = K.sample_teacher(t, k, generator=_gen(21), backend=sampler)
    s_row = (torch.randn(v, dtype=torch.float64) * 3.0).to(DEV)
    s = s_row.expand(m, v).clone().requires_grad_(True)
    K.sampled_kd_loss(s, smp, reduction="mean").backward()
    g_mean = s.grad.sum(0)  # mean over the M records of q − p̂_m
    p = proposal_ref(t_row, 1.0).to(DEV)
    q = torch.softmax(s_row, -1)
    sigma = torch.sqrt(p * (1 - p) / (k * m))
    err = (g_mean - (q - p)).abs()
    assert (err <= 5 * sigma + W_ROUND).all(), (err / (sigma + 1e-300)).max()
    assert err.max() > 0  # the estimate is random: an exact match would be suspicious


# -------------------------------------------------------------------- the fused form


@pytest.mark.parametrize("tau, hard, cap", [(1.0, 0.3, None), (2.0, 0.3, 5.0), (0.5, 0.0, None)])
def test_fused_equals_unfused_on_the_same_samples(tau, hard, cap):
    n, h, v, k = 10, 12, 33, 9
    hs = torch.randn(n, h, dtype=torch.float64, device=DEV).requires_grad_(True)
    ws = (torch.randn(v, h, dtype=torch.float64, device=DEV) * 1.5).requires_grad_(True)
    y = torch.randint(0, v, (n,), device=DEV)
    y[::3] = IGNORE
    smp = K.sample_teacher(_teacher(n, v, 5.0), k, labels=y, temperature=tau,
                           generator=_gen(31))
    fused = K.fused_linear_sampled_kd_loss(hs, ws, smp, y, temperature=tau,
                                           hard_label_weight=hard, student_softcap=cap,
                                           student_logit_scale=0.9, chunk_size=4)
    g_h, g_w = torch.autograd.grad(fused, (hs, ws))
    logits = hs @ ws.T * 0.9
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    plain = K.sampled_kd_loss(logits, smp, y, temperature=tau, hard_label_weight=hard)
    r_h, r_w = torch.autograd.grad(plain, (hs, ws))
    # With τ ≠ 1 and a hard label the fused loss makes two passes (the cross-entropy
    # untempered), the unfused one a single pass: the float32 loss rounds differently,
    # and the float32 p̂ (Σp̂ = 1 to ~1e-7, the bucket tail's mass) enters the gradient
    # once instead of twice. Otherwise both are the same computation.
    two_pass = tau != 1.0 and hard != 0.0
    assert rel_err(fused, plain) <= (2.5e-7 if two_pass else 1e-10)
    tol = 1e-7 if two_pass else 1e-10
    assert rel_err(g_h, r_h) <= tol and rel_err(g_w, r_w) <= tol


def test_modules():
    n, v = 6, 20
    smp = K.sample_teacher(_teacher(n, v, 2.0), 5, generator=_gen(41))
    s = torch.randn(n, v, device=DEV)
    mod = K.SampledKDLoss(temperature=1.0, reduction="sum")
    assert rel_err(mod(s, smp), K.sampled_kd_loss(s, smp, reduction="sum")) == 0
    hs, ws = torch.randn(n, 4, device=DEV), torch.randn(v, 4, device=DEV)
    fmod = K.FusedLinearSampledKDLoss(chunk_size=2)
    assert rel_err(fmod(hs, ws, smp), K.fused_linear_sampled_kd_loss(hs, ws, smp,
                                                                     chunk_size=2)) == 0


# -------------------------------------------------------------------- records and errors


def test_record_round_trips_through_the_topk_file_format(tmp_path):
    smp = K.sample_teacher(_teacher(5, 30, 3.0).cpu(), 7, temperature=1.5,
                           proposal_temperature=1.2, generator=torch.Generator().manual_seed(3))
    rec = smp.as_topk({"model": "teacher"})
    assert isinstance(rec, K.TeacherTopK) and rec.values_kind == "logprobs"
    rec.save(tmp_path / "s.pt")
    back = K.TeacherSamples.from_topk(K.TeacherTopK.load(tmp_path / "s.pt"))
    assert torch.equal(back.indices, smp.indices)
    assert (back.weights - smp.weights).abs().max() <= 4 * W_ROUND
    assert (back.temperature, back.proposal_temperature, back.draws) == (1.5, 1.2, 7)


def test_bad_arguments_raise_before_any_kernel():
    t = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k must be"):
        K.sample_teacher(t, 0)
    with pytest.raises(ValueError, match="proposal_temperature"):
        K.sample_teacher(t, 4, proposal_temperature=0.0)
    with pytest.raises(TypeError, match="generator"):
        K.sample_teacher(t, 4, generator=3)
    with pytest.raises(TypeError, match="teacher_logits"):
        K.sample_teacher(t.long(), 4)
    with pytest.raises(BackendUnavailableError, match="sample_teacher"):
        K.sample_teacher(t, 4, backend="cuda")
    smp = K.sample_teacher(t, 4)
    with pytest.raises(TypeError, match="TeacherSamples"):
        K.sampled_kd_loss(torch.randn(3, 10), (smp.indices, smp.weights))
    with pytest.raises(ValueError, match="vocabulary of 10"):
        K.sampled_kd_loss(torch.randn(3, 11), smp)
    with pytest.raises(ValueError, match="leading shape"):
        K.sampled_kd_loss(torch.randn(4, 10), smp)
    with pytest.raises(ValueError, match="needs labels"):
        K.sampled_kd_loss(torch.randn(3, 10), smp, temperature=2.0, hard_label_weight=1.0)
    with pytest.raises(ValueError, match="repeat"):
        K.TeacherSamples(torch.tensor([[1, 1]]), torch.tensor([[0.5, 0.5]]), 5)
    with pytest.raises(ValueError, match="sum to at most 1"):
        K.TeacherSamples(torch.tensor([[1, 2]]), torch.tensor([[0.9, 0.5]]), 5)
    with pytest.raises(TypeError, match="float32"):
        K.TeacherSamples(torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.5]]).double(), 5)
