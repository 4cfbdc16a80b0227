"""teacher_temperature, temperature_scaling and return_components (docs/kd_loss.md) of
kd_loss, fused_linear_kd_loss and (temperature_scaling) the top-k losses: against the
float64 oracle on both CPU-runnable backends (Triton under TRITON_INTERPRET=1, set by
conftest.py), the components against separate calls, the vocabulary-parallel paths on
2 gloo ranks against the single-process ones; the cuda backend where a GPU exists."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from _helpers import kd_params, rel_err, requires_gpu, run_ranks

import kdkernels as K
from kdkernels import DIVERGENCES, fused_linear_kd_loss, kd_loss
from kdkernels._core.backend import recording
from kdkernels.fused_linear.reference import fused_linear_kd_loss_ref
from kdkernels.kd.reference import kd_loss_ref

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


def make_case(n, v, *, std=30.0, masked=0.1, ignored=0.3, dtype=torch.float32):
    """Logits whose row spreads cycle through std, std/3, std/10, std/30; -inf entries
    shared by both models; ~30% ignored labels (as tests/test_kd.py)."""
    spread = std / torch.tensor([1.0, 3.0, 10.0, 30.0], dtype=torch.float64).repeat(n)[:n, None]
    s = torch.randn(n, v, dtype=torch.float64) * spread
    t = torch.randn(n, v, dtype=torch.float64) * spread + torch.randn(n, 1, dtype=torch.float64)
    mask = torch.rand(n, v) < masked
    mask[:, 0] = False  # every row keeps a finite entry
    s[mask] = -math.inf
    t[mask] = -math.inf
    labels = torch.randint(0, v, (n,))
    labels = torch.where(torch.isinf(s.gather(1, labels[:, None]))[:, 0], 0, labels)
    labels[torch.rand(n) < ignored] = -100
    labels[1] = 5  # at least one counted row
    return s.to(dtype), t.to(dtype), labels


def run(fn, s, t, labels, go=None, **kw):
    """Loss and gradient w.r.t. the student logits, upstream gradient `go` (default 1)."""
    s = s.detach().clone().requires_grad_(True)
    out = fn(s, t, labels, **kw)
    out.backward(torch.ones_like(out) if go is None else go)
    return out.detach(), s.grad


# ------------------------------------------------------------------ teacher_temperature


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temps", [(2.0, 0.5), (0.7, 3.0)])
def test_teacher_temperature_matches_oracle(backend, divergence, temps):
    """p = softmax(t/τ_t), q = softmax(s/τ): std 30, -inf masks, ignored rows, hard label
    on the untempered student, a random upstream gradient."""
    tau, tau_t = temps
    n = 12
    s, t, labels = make_case(n, 300)
    go = torch.randn(n) * 3
    kw = dict(divergence=divergence, temperature=tau, teacher_temperature=tau_t,
              reduction="none", hard_label_weight=0.25, soft_label_weight=0.8,
              **kd_params(divergence))
    loss, grad = run(kd_loss, s, t, labels, go, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    ignored = labels == -100
    assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
    same = kd_loss(s, t, labels, backend=backend, **{**kw, "teacher_temperature": tau})
    if divergence == "cosine":  # 1 − cos(a, b) does not see a row's scale
        assert rel_err(same, loss) <= 1e-6
    else:  # the teacher's temperature is not the student's
        assert rel_err(same, loss) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_temperature_defaults_to_the_students(backend):
    """None and τ_t = τ are the same computation as before: bit for bit."""
    s, t, labels = make_case(8, 200, std=10.0)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.7, hard_label_weight=0.4,
              backend=backend)
    base, base_g = run(kd_loss, s, t, labels, **kw)
    for tt in (None, 1.7, torch.tensor(1.7, dtype=torch.float64)):
        got, got_g = run(kd_loss, s, t, labels, teacher_temperature=tt, **kw)
        assert torch.equal(got, base) and torch.equal(got_g, base_g), tt


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_teacher_temperature_equals_the_number(backend):
    s, t, labels = make_case(6, 150, std=8.0)
    kw = dict(divergence="taid", taid_t=0.4, temperature=torch.tensor(1.5),
              hard_label_weight=0.2, backend=backend)
    want, want_g = run(kd_loss, s, t, labels, teacher_temperature=0.625, **kw)
    got, got_g = run(kd_loss, s, t, labels, teacher_temperature=torch.tensor(0.625), **kw)
    assert torch.equal(got, want) and torch.equal(got_g, want_g)


def test_tensor_teacher_temperature_compiles_once():
    """Four values of a 0-dim teacher_temperature under torch.compile: one graph."""
    torch._dynamo.reset()
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    s, t, labels = make_case(6, 40, std=8.0)

    def f(x, tt):
        return kd_loss(x, t, labels, divergence="reverse_kl", temperature=2.0,
                       teacher_temperature=tt, hard_label_weight=0.3)

    compiled = torch.compile(f, fullgraph=True, backend=count)
    for tt in (0.5, 1.25, 2.0, 3.5):
        got, got_g = run(lambda x, _t, _y, v=tt: compiled(x, torch.tensor(v)), s, t, labels)
        want, want_g = run(lambda x, _t, _y, v=tt: f(x, v), s, t, labels)
        assert torch.equal(got, want) and torch.equal(got_g, want_g), tt
    assert len(graphs) == 1


@pytest.mark.parametrize(
    "value,exc,match",
    [(0.0, ValueError, "teacher_temperature"), (-1.0, ValueError, "teacher_temperature"),
     (math.nan, ValueError, "teacher_temperature"), ("2", TypeError, "teacher_temperature"),
     (torch.tensor(-0.5), ValueError, "teacher_temperature"),
     (torch.tensor([1.0]), ValueError, "0-dim"), (torch.tensor(True), TypeError, "real")],
)
def test_bad_teacher_temperature_raises(value, exc, match):
    s, t, labels = make_case(4, 30)
    with pytest.raises(exc, match=match):
        kd_loss(s, t, labels, teacher_temperature=value)


# ------------------------------------------------------------------ temperature_scaling


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "taid", "tvd"])
def test_tau_squared_matches_oracle(backend, divergence):
    """tau_squared: the soft term times τ² (the student's τ, also with a teacher τ_t);
    the hard-label term is not scaled."""
    s, t, labels = make_case(10, 257)
    go = torch.randn(10) * 2
    kw = dict(divergence=divergence, temperature=2.5, teacher_temperature=1.5,
              temperature_scaling="tau_squared", reduction="none", hard_label_weight=0.7,
              soft_label_weight=0.6, **kd_params(divergence))
    loss, grad = run(kd_loss, s, t, labels, go, backend=backend, **kw)
    ref, ref_grad = run(kd_loss_ref, s.double(), t.double(), labels, go.double(), **kw)
    assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5
    # the same as folding τ² into soft_label_weight by hand
    kw.pop("temperature_scaling")
    by_hand = kd_loss(s, t, labels, backend=backend, **{**kw, "soft_label_weight": 0.6 * 6.25})
    assert rel_err(by_hand, loss) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_squared_with_a_tensor_temperature(backend):
    """A 0-dim temperature's τ² is applied inside the op, as a number's."""
    s, t, labels = make_case(6, 100, std=8.0)
    kw = dict(divergence="reverse_kl", temperature_scaling="tau_squared",
              hard_label_weight=0.5, backend=backend)
    want, want_g = run(kd_loss, s, t, labels, temperature=1.5, **kw)
    got, got_g = run(kd_loss, s, t, labels, temperature=torch.tensor(1.5), **kw)
    assert torch.equal(got, want) and torch.equal(got_g, want_g)
    plain = kd_loss(s, t, labels, temperature=1.5, divergence="reverse_kl",
                    hard_label_weight=0.5, backend=backend)
    assert rel_err(got, plain) > 1e-3


def test_bad_temperature_scaling_raises():
    s, t, labels = make_case(4, 30)
    with pytest.raises(ValueError, match="temperature_scaling"):
        kd_loss(s, t, labels, temperature_scaling="tau")


@pytest.mark.parametrize("values", ["logits", "logprobs"])
def test_topk_tau_squared(values):
    """topk_kd_loss / fused_linear_topk_kd_loss: the soft term times τ², the hard one not."""
    s, _, labels = make_case(6, 64, std=5.0)
    k = 8
    idx = torch.randn(6, 64).topk(k, -1).indices
    vals = torch.randn(6, k) * 3
    vals = vals.log_softmax(-1) if values == "logprobs" else vals
    tau = 1.0 if values == "logprobs" else 2.0
    kw = dict(values=values, temperature=tau, hard_label_weight=0.3)
    got = K.topk_kd_loss(s, idx, vals, labels, temperature_scaling="tau_squared", **kw)
    want = K.topk_kd_loss(s, idx, vals, labels, soft_label_weight=tau * tau, **kw)
    assert torch.equal(got, want)
    hs, ws = torch.randn(6, 7), torch.randn(64, 7) * 2
    got = K.fused_linear_topk_kd_loss(hs, ws, idx, vals, labels,
                                      temperature_scaling="tau_squared", **kw)
    want = K.fused_linear_topk_kd_loss(hs, ws, idx, vals, labels,
                                       soft_label_weight=tau * tau, **kw)
    assert torch.equal(got, want)


# ------------------------------------------------------------------ return_components


def _separate(fn, *args, **kw):
    """(soft only, hard only): the two separate calls return_components replaces."""
    with torch.no_grad():
        soft = fn(*args, **{**kw, "soft_label_weight": 1.0, "hard_label_weight": 0.0})
        hard = fn(*args, **{**kw, "soft_label_weight": 0.0, "hard_label_weight": 1.0})
    return soft, hard


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "normalizer"])
def test_components_equal_separate_calls(backend, divergence, reduction):
    """(total, soft, hard) from one call: total and its gradient are those of the plain
    call (bit for bit), soft and hard those of the separate calls, reduced alike."""
    n = 10
    s, t, labels = make_case(n, 200)
    kw = dict(divergence=divergence, temperature=1.5, teacher_temperature=0.8,
              temperature_scaling="tau_squared", hard_label_weight=0.3, soft_label_weight=0.9,
              reduction="mean" if reduction == "normalizer" else reduction,
              normalizer=torch.tensor(17.0) if reduction == "normalizer" else None,
              backend=backend, **kd_params(divergence))
    x = s.clone().requires_grad_(True)
    total, soft, hard = kd_loss(x, t, labels, return_components=True, **kw)
    assert not soft.requires_grad and not hard.requires_grad
    total.backward(torch.ones_like(total))
    plain, plain_g = run(kd_loss, s, t, labels, **kw)
    assert torch.equal(total.detach(), plain) and torch.equal(x.grad, plain_g)
    want_soft, want_hard = _separate(kd_loss, s, t, labels, **kw)
    assert soft.shape == hard.shape == total.shape
    assert rel_err(soft, want_soft) <= 1e-6 and rel_err(hard, want_hard) <= 1e-6
    assert rel_err(0.9 * soft + 0.3 * hard, total.detach()) <= 1e-6
    ref_kw = {k: v for k, v in kw.items() if k != "backend"}
    ref_soft = kd_loss_ref(s.double(), t.double(), labels,
                           **{**ref_kw, "soft_label_weight": 1.0, "hard_label_weight": 0.0})
    assert rel_err(soft, ref_soft) <= 1e-5
    if reduction == "none":
        ignored = labels == -100
        assert (soft[ignored] == 0).all() and (hard[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_with_a_zero_weight(backend):
    """A part whose weight is 0 is not in the total but is still returned (one extra
    gradient-free pass); without labels the hard part is 0."""
    s, t, labels = make_case(8, 120, std=6.0)
    kw = dict(divergence="jsd", beta=0.4, backend=backend)
    for sw, hw in ((0.0, 0.5), (0.8, 0.0)):
        total, soft, hard = kd_loss(s, t, labels, soft_label_weight=sw, hard_label_weight=hw,
                                    return_components=True, **kw)
        assert torch.equal(total, kd_loss(s, t, labels, soft_label_weight=sw,
                                          hard_label_weight=hw, **kw))
        want_soft, want_hard = _separate(kd_loss, s, t, labels, **kw)
        assert rel_err(soft, want_soft) <= 1e-6 and rel_err(hard, want_hard) <= 1e-6
        assert soft > 0 and hard > 0
    total, soft, hard = kd_loss(s, t, return_components=True, **kw)
    assert torch.equal(soft, total) and hard.item() == 0.0


def test_components_nonfinite_and_module():
    """A NaN row is NaN in every part; KDLoss(return_components=True) returns the tuple."""
    s, t, labels = make_case(6, 50, std=4.0, ignored=0.0)
    s[2, 7] = math.nan
    total, soft, hard = kd_loss(s, t, labels, hard_label_weight=0.5, reduction="none",
                                return_components=True)
    for x in (total, soft, hard):
        assert x[2].isnan() and torch.isfinite(x[torch.arange(6) != 2]).all()
    mod = K.KDLoss(hard_label_weight=0.5, return_components=True)
    out = mod(s[3:], t[3:], labels[3:])
    assert isinstance(out, tuple) and len(out) == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_of_shifted_logits(backend):
    """[B, T-1, V] slices of [B, T, V] (rows at two strides, read in place): the parts
    come back shaped like the loss, each row's as the 2-D call's."""
    s, t, labels = make_case(12, 60, std=6.0)
    s3, t3, y3 = s.view(3, 4, 60), t.view(3, 4, 60), labels.view(3, 4)
    kw = dict(divergence="tvd", temperature=1.3, hard_label_weight=0.4, reduction="none",
              backend=backend)
    got = kd_loss(s3[:, :-1], t3[:, :-1], y3[:, 1:], return_components=True, **kw)
    flat = kd_loss(s3[:, :-1].reshape(9, 60), t3[:, :-1].reshape(9, 60),
                   y3[:, 1:].reshape(9), return_components=True, **kw)
    for g, f in zip(got, flat):
        assert g.shape == (3, 3) and torch.equal(g.reshape(9), f)


def test_return_components_must_be_a_bool():
    s, t, labels = make_case(4, 30)
    with pytest.raises(TypeError, match="return_components"):
        kd_loss(s, t, labels, return_components=1)


# ------------------------------------------------------------------ the fused loss


def _heads(n, h_s, h_t, v, std=20.0):
    g = torch.Generator().manual_seed(7)
    hs = torch.randn(n, h_s, generator=g)
    ws = torch.randn(v, h_s, generator=g) * (std / h_s**0.5)
    ht = torch.randn(n, h_t, generator=g)
    wt = torch.randn(v, h_t, generator=g) * (std / h_t**0.5)
    y = torch.randint(0, v, (n,), generator=g)
    y[::3] = -100
    return hs, ws, ht, wt, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "taid"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_agrees_with_unfused(backend, divergence, reduction):
    """fused_linear_kd_loss with all three keywords against the float64 oracle on the
    materialised logits and against kd_loss's components; chunks of 4 rows."""
    hs, ws, ht, wt, y = _heads(11, 6, 5, 90)
    kw = dict(divergence=divergence, temperature=1.8, teacher_temperature=0.6,
              temperature_scaling="tau_squared", hard_label_weight=0.4,
              soft_label_weight=0.7, reduction=reduction, **kd_params(divergence))
    x, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    total, soft, hard = fused_linear_kd_loss(x, w, ht, wt, y, chunk_size=4, backend=backend,
                                             return_components=True, **kw)
    go = torch.randn_like(total) + 2
    total.backward(go)
    x64, w64 = hs.double().requires_grad_(True), ws.double().requires_grad_(True)
    ref = fused_linear_kd_loss_ref(x64, w64, ht.double(), wt.double(), y, **kw)
    ref.backward(go.double())
    assert rel_err(total.detach(), ref.detach()) <= 1e-5
    assert rel_err(x.grad, x64.grad) <= 1e-5 and rel_err(w.grad, w64.grad) <= 1e-5
    with torch.no_grad():
        s_log, t_log = hs @ ws.t(), ht @ wt.t()
        _, u_soft, u_hard = kd_loss(s_log, t_log, y, return_components=True, **kw)
    assert rel_err(soft, u_soft) <= 1e-5 and rel_err(hard, u_hard) <= 1e-5
    plain = fused_linear_kd_loss(hs, ws, ht, wt, y, chunk_size=4, backend=backend, **kw)
    assert torch.equal(total.detach(), plain)


def test_fused_tensor_teacher_temperature_and_zero_weight():
    hs, ws, ht, wt, y = _heads(9, 6, 5, 70)
    kw = dict(divergence="jsd", beta=0.2, temperature=torch.tensor(1.25), chunk_size=4)
    got = fused_linear_kd_loss(hs, ws, ht, wt, y, teacher_temperature=torch.tensor(2.5), **kw)
    want = fused_linear_kd_loss(hs, ws, ht, wt, y, teacher_temperature=2.5, **kw)
    assert torch.equal(got, want)
    total, soft, hard = fused_linear_kd_loss(hs, ws, ht, wt, y, hard_label_weight=0.0,
                                             return_components=True, **kw)
    assert torch.equal(total, fused_linear_kd_loss(hs, ws, ht, wt, y, **kw))
    want_hard = kd_loss(hs @ ws.t(), ht @ wt.t(), y, soft_label_weight=0.0,
                        hard_label_weight=1.0, **{k: v for k, v in kw.items()
                                                  if k != "chunk_size"})
    assert torch.equal(soft, total) and rel_err(hard, want_hard) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_with_a_stored_teacher(backend):
    """teacher_logits= (an offline teacher) with the three keywords: kd_loss's numbers."""
    hs, ws, ht, wt, y = _heads(10, 6, 5, 80)
    t_log = (ht @ wt.t()).to(torch.bfloat16)
    kw = dict(divergence="skew_reverse_kl", alpha=0.3, temperature=0.8,
              teacher_temperature=1.9, temperature_scaling="tau_squared",
              hard_label_weight=0.2, reduction="sum")
    got = fused_linear_kd_loss(hs, ws, labels=y, teacher_logits=t_log, chunk_size=3,
                               backend=backend, return_components=True, **kw)
    want = kd_loss(hs @ ws.t(), t_log, y, backend=backend, return_components=True, **kw)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= 1e-5


def test_liger_adapter_runs_the_fused_loss_once():
    """return_soft_hard_loss=True: one fused pass (return_components), not two."""
    from kdkernels.integrations.liger import LigerFusedLinearJSDLoss

    hs, ws, ht, wt, y = _heads(8, 6, 5, 40)
    mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.4,
                                  temperature=2.0, return_soft_hard_loss=True)
    with recording() as calls:
        loss, soft, hard = mod(hs.requires_grad_(True), ws, ht, wt, y)
    assert sum(op == "fused_linear_kd_loss" for op, _ in calls) == 1
    assert rel_err(loss.detach(), 0.7 * soft + 0.3 * hard) <= 1e-6


# ------------------------------------------------------------------ vocabulary-parallel

V, N = 37, 12


def _vp_inputs(gen, std):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = y[7] = -100
    return s.float(), t.float(), y


def _vp_cases(rank, bounds, out):
    """kd_loss with teacher_temperature, tau_squared and return_components, vocabulary-
    parallel (the torch and triton launchers; the cuda one on the fake extension of
    tests/vp_cuda_harness.py, which checks its plumbing) against the single-process loss."""
    import contextlib

    import torch.distributed as dist
    from vp_cuda_harness import fake_extension

    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(3)
    worst = {}
    for backend, div in itertools.product(("torch", "triton", "cuda"),
                                          ("forward_kl", "reverse_kl", "jsd", "tvd", "taid")):
        with fake_extension() if backend == "cuda" else contextlib.nullcontext():
            s, t, y = _vp_inputs(gen, 10.0)
            kw = dict(divergence=div, **kd_params(div), temperature=1.6,
                      teacher_temperature=0.7, temperature_scaling="tau_squared",
                      hard_label_weight=0.3, soft_label_weight=0.8, reduction="none")
            full = s.clone().requires_grad_(True)
            ref = kd_loss(full, t, y, return_components=True, **kw)
            ref[0].sum().backward()
            loc = s[:, a:b].clone().requires_grad_(True)
            got = kd_loss(loc, t[:, a:b], y, vocab_parallel=K.VocabParallel(a, b),
                          backend=backend, return_components=True, **kw)
            got[0].sum().backward()
            pad = torch.zeros(N, max(b1 - a1 for a1, b1 in bounds))
            pad[:, : b - a] = loc.grad
            gathered = [torch.empty_like(pad) for _ in bounds]
            dist.all_gather(gathered, pad)
            grad = torch.cat([g[:, : b1 - a1] for g, (a1, b1) in zip(gathered, bounds)], 1)
            errs = [rel_err(x.detach(), r.detach()) for x, r in zip(got, ref)]
            errs.append(rel_err(grad, full.grad))
            worst[f"{backend}/{div}"] = max(errs)
    hs, ws, ht, wt, y = _heads(N, 6, 5, V)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.4, teacher_temperature=2.2,
              temperature_scaling="tau_squared", hard_label_weight=0.5, chunk_size=5)
    ref = fused_linear_kd_loss(hs, ws, ht, wt, y, return_components=True, **kw)
    got = fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b], y, return_components=True,
                               vocab_parallel=K.VocabParallel(a, b), **kw)
    worst["fused"] = max(rel_err(x, r) for x, r in zip(got, ref))
    out["conveniences"] = worst


@pytest.mark.interpreter
def test_vocab_parallel_teacher_temperature_and_components(tmp_path):
    bounds = [(0, 20), (20, V)]
    results = run_ranks((_vp_cases,), 2, tmp_path, bounds)
    for out in results:
        for case, err in out["conveniences"].items():
            assert err <= 2e-6, (case, err)


# ------------------------------------------------------------------ cuda


class _FakeKdModule:
    """`kdkernels_cuda.kd_fwd`'s contract emulated by the torch launcher on CPU memory
    (through the raw pointers, as tests/vp_cuda_harness.py does for the vocabulary-parallel
    kernels): checks kd/cuda.py's plumbing of inv_temp_t and the [3, N] loss rows."""

    def __init__(self):
        self.calls = []

    def kd_fwd(self, s, t, labels, labels_i64, stride_l, scale, loss, grad, n, v, v_g,
               stride_s, stride_t, stride_g, dtype, div, inv_temp, w, log_w, log_1mw, soft_w,
               hard_w, ignore_index, compute_grad, device, stream, force_path, force_cluster,
               inv_temp_t=math.nan, parts_stride=0):
        from vp_cuda_harness import at

        from kdkernels.kd.params import KDParams
        from kdkernels.kd.pytorch import kd_fwd_torch

        self.calls.append(dict(inv_temp_t=inv_temp_t, parts_stride=parts_stride))
        f32 = torch.float32
        s_v = at(s, (n, v), (stride_s, 1), f32).clone()
        t_v = at(t, (n, v), (stride_t, 1), f32).clone()
        y = (at(labels, (n,), (stride_l,), torch.int64 if labels_i64 else torch.int32)
             if labels else None)
        sc = at(scale, (1,), (1,), f32)[0].clone()
        g = at(grad, (n, v_g), (stride_g, 1), f32) if compute_grad else torch.empty(0)
        prm = KDParams(div, inv_temp, w, soft_w, hard_w, ignore_index,
                       None if math.isnan(inv_temp_t) else inv_temp_t)
        parts = torch.empty(n, 2) if parts_stride else None
        kd_fwd_torch(s_v, t_v, y, sc, at(loss, (n,), (1,), f32), g, prm, v, parts)
        if parts_stride:
            at(loss + 4 * parts_stride, (n,), (1,), f32).copy_(parts[:, 0])
            at(loss + 8 * parts_stride, (n,), (1,), f32).copy_(parts[:, 1])
        return {}


def test_cuda_launcher_plumbing_on_a_fake_module(monkeypatch):
    """backend='cuda' with teacher_temperature and return_components, the extension
    replaced by _FakeKdModule: the torch backend's numbers, one kernel call."""
    from vp_cuda_harness import fake_extension

    from kdkernels.kd import cuda as kd_cuda

    fake = _FakeKdModule()
    monkeypatch.setattr(kd_cuda, "module", lambda: fake)
    monkeypatch.setattr(kd_cuda, "device_index", lambda dev: 0)
    monkeypatch.setattr(kd_cuda, "stream", lambda dev: 0)
    s, t, labels = make_case(9, 70, std=8.0)
    kw = dict(divergence="jsd", beta=0.3, temperature=1.5, teacher_temperature=0.5,
              hard_label_weight=0.4, reduction="none")
    with fake_extension():
        got = kd_loss(s, t, labels, backend="cuda", return_components=True, **kw)
        got_l, got_g = run(kd_loss, s, t, labels, backend="cuda",
                           **{**kw, "reduction": "mean"})
    want = kd_loss(s, t, labels, backend="torch", return_components=True, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    want_l, want_g = run(kd_loss, s, t, labels, backend="torch", **{**kw, "reduction": "mean"})
    assert torch.equal(got_l, want_l) and torch.equal(got_g, want_g)
    assert fake.calls == [dict(inv_temp_t=2.0, parts_stride=9),
                          dict(inv_temp_t=2.0, parts_stride=0)]


# ------------------------------------------------------------------ cuda (a GPU only)


@requires_gpu
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_cuda_teacher_temperature_and_components(divergence):
    s, t, labels = make_case(16, 3001, dtype=torch.float32)
    s, t, labels = s.cuda(), t.cuda(), labels.cuda()
    kw = dict(divergence=divergence, temperature=1.5, teacher_temperature=0.6,
              temperature_scaling="tau_squared", hard_label_weight=0.3,
              reduction="none", **kd_params(divergence))
    got = run(lambda *a, **k: kd_loss(*a, return_components=True, **k)[0], s, t, labels,
              backend="cuda", **kw)
    ref = run(kd_loss_ref, s.double(), t.double(), labels, **kw)
    assert rel_err(got[0], ref[0]) <= 1e-5 and rel_err(got[1], ref[1]) <= 1e-5
    _, soft, hard = kd_loss(s, t, labels, backend="cuda", return_components=True, **kw)
    want_soft, want_hard = _separate(kd_loss, s, t, labels, backend="triton", **kw)
    assert rel_err(soft, want_soft) <= 1e-5 and rel_err(hard, want_hard) <= 1e-5
