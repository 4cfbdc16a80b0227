"""topk_kd_loss (docs/spec.md §5, offline top-k distillation) against a float64 oracle."""

from __future__ import annotations

import pytest
import torch
from _helpers import ATOL, rel_err

import kdkernels._core.chunking as chunking
from kdkernels import TopKKDLoss, topk_kd_loss
from kdkernels._core.backend import BackendUnavailableError, recording
from kdkernels.kd import kd_loss
from kdkernels.topk.reference import topk_kd_loss_ref

IGNORE = -100
MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def _inputs(lead, v, k, *, values="logits", dtype=torch.float64, s_std=30.0, t_std=30.0,
            pad_frac=0.2, ignore_frac=0.3, labels=True, teacher_top=True):
    """Student logits, k unique teacher indices per row (some padded with -1), values."""
    s = torch.randn(*lead, v, dtype=torch.float64) * s_std
    t = torch.randn(*lead, v, dtype=torch.float64) * t_std
    if teacher_top:
        idx = t.topk(k, -1).indices
    else:  # any k distinct classes but the teacher's argmax (so p_tail >= 1/V), any order
        key = torch.rand(*lead, v).scatter_(-1, t.argmax(-1, keepdim=True), 2.0)
        idx = key.argsort(-1)[..., :k]
    vals = t.gather(-1, idx)
    if values == "logprobs":
        vals = torch.log_softmax(t, -1).gather(-1, idx)
    pad = torch.rand(*lead, k) < pad_frac
    idx = idx.masked_fill(pad, -1)
    vals = vals.masked_fill(pad, 123.0)  # padded values must be ignored
    y = None
    if labels:
        y = torch.randint(0, v, lead)
        y[torch.rand(lead) < ignore_frac] = IGNORE
    return s.to(dtype), idx, vals.to(dtype), y


def _run(fn, s, idx, vals, y, upstream=None, **kw):
    """(loss, grad of Σ upstream·loss w.r.t. s) with s a fresh leaf."""
    x = s.detach().clone().requires_grad_()
    out = fn(x, idx, vals, y, **kw)
    gout = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    (g,) = torch.autograd.grad(out, x, gout)
    return out.detach(), g


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", DIVS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_oracle_float64(values, tail, divergence, beta, reduction):
    # the teacher's own top-k at a moderate spread (so that a tail mass remains), or
    # arbitrary classes at a wide one
    top = reduction == "none"
    s, idx, vals, y = _inputs((3, 5), 37, 7, values=values, teacher_top=top,
                              t_std=3.0 if top else 30.0)
    tau = 1.0 if values == "logprobs" else 1.7
    kw = dict(values=values, tail=tail, divergence=divergence, beta=beta, temperature=tau,
              reduction=reduction)
    upstream = torch.randn(3, 5, dtype=torch.float64) * 3 if reduction == "none" else None
    loss, g = _run(topk_kd_loss, s, idx, vals, y, upstream, **kw)
    ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, upstream, **kw)
    assert loss.dtype == torch.float32 and g.dtype == torch.float64
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= 1e-6
    assert rel_err(g, g_ref) <= 1e-6
    ign = y == IGNORE
    assert torch.all(g[ign] == 0)
    if tail == "renormalize":  # only the selected classes get a gradient
        hits = torch.zeros_like(g).scatter_add_(-1, idx.clamp_min(0), (idx >= 0).double())
        assert torch.all(g[hits == 0] == 0)


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", [("forward_kl", 0.5), ("reverse_kl", 0.5),
                                              ("jsd", 0.6)])
def test_matches_oracle_float32(values, tail, divergence, beta):
    s, idx, vals, y = _inputs((2, 9), 53, 11, values=values, dtype=torch.float32, t_std=3.0)
    upstream = torch.randn(2, 9)
    kw = dict(values=values, tail=tail, divergence=divergence, beta=beta, reduction="none",
              temperature=1.0 if values == "logprobs" else 0.8)
    loss, g = _run(topk_kd_loss, s, idx, vals, y, upstream, **kw)
    ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, upstream, **kw)
    assert g.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-4
    assert rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounds_once(dtype):
    # float64 arithmetic inside: the result is the float64 oracle on the same (rounded)
    # inputs, rounded once: loss to float32, gradient to `dtype` (plus its subnormal floor)
    s, idx, vals, y = _inputs((10,), 31, 6, values="logprobs", dtype=dtype, s_std=8.0,
                              t_std=3.0)
    for tail in ("renormalize", "bucket"):
        kw = dict(values="logprobs", tail=tail, divergence="jsd", reduction="sum")
        loss, g = _run(topk_kd_loss, s, idx, vals, y, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **kw)
        assert g.dtype == dtype
        assert rel_err(loss, ref) <= 1e-6
        eps = torch.finfo(dtype).eps
        assert torch.all((g.double() - g_ref).abs() <= eps * g_ref.abs() + ATOL[dtype])


@pytest.mark.parametrize("divergence, beta", DIVS)
@pytest.mark.parametrize("values", ["logits", "logprobs"])
def test_full_k_renormalize_equals_kd_loss(divergence, beta, values):
    # k = V in a random order with the teacher's logits (or log-probs) is kd_loss itself
    lead, v = (4, 3), 29
    s = torch.randn(*lead, v, dtype=torch.float64) * 30
    t = torch.randn(*lead, v, dtype=torch.float64) * 30
    y = torch.randint(0, v, lead)
    y[0, 1] = IGNORE
    idx = torch.rand(*lead, v).argsort(-1)
    tau = 1.0 if values == "logprobs" else 2.5
    src = t if values == "logits" else torch.log_softmax(t, -1)
    vals = src.gather(-1, idx)
    kw = dict(divergence=divergence, beta=beta, temperature=tau, reduction="sum")
    loss, g = _run(topk_kd_loss, s, idx, vals, y, values=values, **kw)
    ref, g_ref = _run(lambda x, i, vv, yy, **k: kd_loss(x, t, yy, **k), s, idx, vals, y, **kw)
    assert rel_err(loss, ref) <= 1e-6
    assert rel_err(g, g_ref) <= 1e-6


@pytest.mark.parametrize("divergence, beta", DIVS)
def test_full_k_bucket_equals_renormalize(divergence, beta):
    # all V classes selected: the tail is empty and both modes are the full distributions
    s, _, _, y = _inputs((6,), 19, 19, pad_frac=0.0)
    t = torch.randn(6, 19, dtype=torch.float64) * 30
    idx = torch.rand(6, 19).argsort(-1)
    # Σ p = 1 − 1e-9: rounding-sized mass that an empty tail must not receive
    vals = torch.log_softmax(t, -1).gather(-1, idx) - 1e-9
    kw = dict(values="logprobs", divergence=divergence, beta=beta, reduction="none")
    a, ga = _run(topk_kd_loss, s, idx, vals, y, tail="bucket", **kw)
    b, gb = _run(topk_kd_loss, s, idx, vals, y, tail="renormalize", **kw)
    assert torch.isfinite(a).all()
    assert rel_err(a, b) <= 1e-6 and rel_err(ga, gb) <= 1e-6


def test_padding_is_invisible():
    # extra -1 slots, wherever they sit, change nothing
    s, idx, vals, y = _inputs((8,), 23, 5, values="logprobs", pad_frac=0.0)
    perm = torch.randperm(9)
    idx_p = torch.cat([idx, torch.full((8, 4), -1)], -1)[:, perm]
    vals_p = torch.cat([vals, torch.randn(8, 4) * 1e3], -1)[:, perm]
    for tail in ("renormalize", "bucket"):
        kw = dict(values="logprobs", tail=tail, divergence="jsd", reduction="none")
        a, ga = _run(topk_kd_loss, s, idx, vals, y, **kw)
        b, gb = _run(topk_kd_loss, s, idx_p, vals_p, y, **kw)
        assert rel_err(a, b) <= 1e-12 and rel_err(ga, gb) <= 1e-12


def test_degenerate_rows():
    s, idx, vals, y = _inputs((4,), 13, 4, values="logprobs", labels=False)
    idx[0] = -1  # nothing selected
    idx[1, 1:] = -1
    keep = s[2, idx[2].clamp_min(0)].clone()
    s[2, :] = float("-inf")  # the student masks every class outside the selection
    s[2, idx[2].clamp_min(0)] = keep
    for tail in ("renormalize", "bucket"):
        for div in ("forward_kl", "jsd"):
            kw = dict(values="logprobs", tail=tail, divergence=div, reduction="none")
            loss, g = _run(topk_kd_loss, s, idx, vals, None, **kw)
            ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, None, **kw)
            assert not torch.isnan(loss).any() and not torch.isnan(g).any()
            if tail == "renormalize":
                assert loss[0] == 0 and torch.all(g[0] == 0)
            fin = torch.isfinite(ref)
            assert rel_err(loss[fin], ref[fin]) <= 1e-6


def test_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 3 * 17 * 8)  # a few rows per chunk
    s, idx, vals, y = _inputs((14,), 17, 5, values="logprobs")
    for tail in ("renormalize", "bucket"):
        kw = dict(values="logprobs", tail=tail, reduction="sum")
        loss, g = _run(topk_kd_loss, s, idx, vals, y, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **kw)
        assert rel_err(loss, ref) <= 1e-6 and rel_err(g, g_ref) <= 1e-6


def test_reductions_normalizer_and_ignored():
    s, idx, vals, y = _inputs((5, 3), 21, 4, dtype=torch.float32)
    per_row = topk_kd_loss(s, idx, vals, y, reduction="none")
    total = topk_kd_loss(s, idx, vals, y, reduction="sum")
    torch.testing.assert_close(total, per_row.sum())
    valid = (y != IGNORE).sum().clamp_min(1)
    torch.testing.assert_close(topk_kd_loss(s, idx, vals, y), total / valid)
    torch.testing.assert_close(topk_kd_loss(s, idx, vals, y, normalizer=9), total / 9)
    loss, g = _run(topk_kd_loss, s, idx, vals, torch.full_like(y, IGNORE))
    assert float(loss) == 0.0 and torch.all(g == 0)


def test_module_and_constant_teacher():
    s, idx, vals, y = _inputs((6,), 15, 3, dtype=torch.float32, values="logprobs")
    x = s.clone().requires_grad_()
    v = vals.clone().requires_grad_()
    mod = TopKKDLoss(values="logprobs", tail="bucket", divergence="reverse_kl")
    out = mod(x, idx, v, y)
    out.backward()
    assert v.grad is None and x.grad is not None
    torch.testing.assert_close(
        out, topk_kd_loss(s, idx, vals, y, values="logprobs", tail="bucket",
                          divergence="reverse_kl")
    )
    assert "bucket" in repr(mod)


def test_compile_fullgraph():
    s, idx, vals, _ = _inputs((4,), 11, 3, dtype=torch.float32, values="logprobs")
    kw = dict(values="logprobs", tail="bucket", divergence="jsd")
    fn = torch.compile(lambda a, b, c: topk_kd_loss(a, b, c, **kw), fullgraph=True,
                       backend="aot_eager")
    x = s.clone().requires_grad_()
    out = fn(x, idx, vals)
    out.backward()
    loss, g = _run(topk_kd_loss, s, idx, vals, None, **kw)
    torch.testing.assert_close(out.detach(), loss)
    torch.testing.assert_close(x.grad, g)


def _bad(**over):
    s, idx, vals, y = _inputs((3,), 9, 4, dtype=torch.float32, values="logprobs", pad_frac=0.0)
    args = dict(student_logits=s, teacher_topk_indices=idx, teacher_topk_values=vals, labels=y,
                values="logprobs")
    args.update(over)
    return args


def _dup():
    a = _bad()["teacher_topk_indices"].clone()
    a[1, 2] = a[1, 0]
    return a


@pytest.mark.parametrize(
    "over, exc, name",
    [
        (dict(student_logits=torch.ones(3, 9, dtype=torch.int64)), TypeError, "student_logits"),
        (dict(teacher_topk_indices=torch.zeros(3, 4)), TypeError, "teacher_topk_indices"),
        (dict(teacher_topk_values=torch.zeros(3, 4, dtype=torch.long)), TypeError,
         "teacher_topk_values"),
        (dict(teacher_topk_indices=torch.zeros(2, 4, dtype=torch.long)), ValueError,
         "teacher_topk_indices"),
        (dict(teacher_topk_values=torch.zeros(3, 5)), ValueError, "teacher_topk_values"),
        (dict(teacher_topk_indices=torch.zeros(3, 0, dtype=torch.long),
              teacher_topk_values=torch.zeros(3, 0)), ValueError, "k="),
        (dict(teacher_topk_indices=torch.arange(10).expand(3, 10),
              teacher_topk_values=torch.full((3, 10), -5.0)), ValueError, "k="),
        (dict(teacher_topk_indices=torch.tensor([[0, 1, 2, 9]] * 3)), ValueError, "found 9"),
        (dict(teacher_topk_indices=torch.tensor([[0, 1, 2, -2]] * 3)), ValueError, "found -2"),
        (dict(teacher_topk_indices=_dup()), ValueError, "twice"),
        (dict(teacher_topk_values=torch.zeros(3, 4)), ValueError, "log-probabilities"),
        (dict(values="probs"), ValueError, "values"),
        (dict(tail="drop"), ValueError, "tail"),
        (dict(divergence="tvd"), ValueError, "divergence"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(temperature=2.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(values="logits", tail="bucket"), ValueError, "bucket"),
        (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(normalizer=0), ValueError, "normalizer"),
        (dict(backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_input(over, exc, name):
    args = _bad(**over)
    with pytest.raises(exc, match=name):
        topk_kd_loss(args.pop("student_logits"), args.pop("teacher_topk_indices"),
                     args.pop("teacher_topk_values"), args.pop("labels"), **args)


def test_padding_may_repeat_and_cuda_on_cpu_tensors_raises():
    args = _bad()
    idx = args["teacher_topk_indices"].clone()
    idx[:, 2:] = -1  # several -1 in a row are fine
    topk_kd_loss(args["student_logits"], idx, args["teacher_topk_values"], values="logprobs")
    with pytest.raises(BackendUnavailableError, match="torch"):
        topk_kd_loss(args["student_logits"], idx, args["teacher_topk_values"],
                     values="logprobs", backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_untouched(dtype):
    s, idx, vals, y = _inputs((6,), 19, 5, values="logprobs", dtype=dtype)
    copies = [s.clone(), idx.clone(), vals.clone(), y.clone()]
    for tail in ("renormalize", "bucket"):
        _run(topk_kd_loss, s, idx, vals, y, values="logprobs", tail=tail, reduction="none",
             upstream=torch.randn(6))
    for a, b in zip((s, idx, vals, y), copies):
        assert torch.equal(a, b)


def test_ignored_row_with_infinite_loss_stays_zero():
    # the student puts -inf on a teacher entry: infinite loss, but the row is ignored
    s, idx, vals, y = _inputs((5,), 12, 3, values="logprobs", pad_frac=0.0, ignore_frac=0.0)
    y[2] = IGNORE
    s[2, idx[2, 0]] = float("-inf")
    for tail in ("renormalize", "bucket"):
        loss, g = _run(topk_kd_loss, s, idx, vals, y, values="logprobs", tail=tail,
                       reduction="none")
        assert loss[2] == 0 and torch.all(g[2] == 0)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()


# ------------------------------------------- hard label, soft weight and TAID (§5)

# (divergence, keywords): TAID alone and with the hard label, a weighted divergence with
# the hard label, and the hard label alone (soft_label_weight=0: no teacher read)
MIXES = [
    ("taid", dict(taid_t=0.3)),
    ("taid", dict(taid_t=0.7, hard_label_weight=1.3)),
    ("forward_kl", dict(hard_label_weight=0.7, soft_label_weight=0.4)),
    ("reverse_kl", dict(hard_label_weight=2.0)),
    ("jsd", dict(beta=0.3, hard_label_weight=0.5, soft_label_weight=0.0)),
]


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, kw_mix", MIXES)
@pytest.mark.parametrize("std", [5.0, 30.0])
def test_hard_label_and_taid_match_oracle(values, tail, divergence, kw_mix, std):
    s, idx, vals, y = _inputs((3, 5), 37, 7, values=values, s_std=std,
                              t_std=std if tail == "renormalize" else 3.0, teacher_top=False)
    tau = 1.0 if values == "logprobs" else 1.7
    kw = dict(values=values, tail=tail, divergence=divergence, temperature=tau,
              reduction="none", **kw_mix)
    upstream = torch.randn(3, 5, dtype=torch.float64) * 3
    with recording() as ran:
        loss, g = _run(topk_kd_loss, s, idx, vals, y, upstream, **kw)
    assert ("topk_kd_loss", "torch") in ran and {be for _, be in ran} == {"torch"}
    ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, upstream, **kw)
    assert rel_err(loss, ref) <= 1e-6 and rel_err(g, g_ref) <= 1e-6
    ign = y == IGNORE
    assert torch.all(loss[ign] == 0) and torch.all(g[ign] == 0)
    if kw_mix.get("hard_label_weight"):  # the cross-entropy reaches every class
        assert torch.all(g[~ign] != 0)
    mean, g_mean = _run(topk_kd_loss, s, idx, vals, y, **{**kw, "reduction": "mean"})
    ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, **{**kw, "reduction": "mean"})
    assert rel_err(mean, ref) <= 1e-6 and rel_err(g_mean, g_ref) <= 1e-6


@pytest.mark.parametrize("values", ["logits", "logprobs"])
@pytest.mark.parametrize("taid_t", [0.25, 0.8])
def test_full_k_taid_and_hard_label_equal_kd_loss(values, taid_t):
    # k = V (any order), renormalize: TAID's target over the entries is kd_loss's, and the
    # hard-label term is the same cross-entropy
    lead, v = (4, 3), 29
    s = torch.randn(*lead, v, dtype=torch.float64) * 30
    t = torch.randn(*lead, v, dtype=torch.float64) * 30
    y = torch.randint(0, v, lead)
    y[0, 1] = IGNORE
    idx = torch.rand(*lead, v).argsort(-1)
    tau = 1.0 if values == "logprobs" else 2.5
    vals = (t if values == "logits" else torch.log_softmax(t, -1)).gather(-1, idx)
    kw = dict(divergence="taid", taid_t=taid_t, temperature=tau, reduction="sum",
              hard_label_weight=0.6, soft_label_weight=1.4)
    loss, g = _run(topk_kd_loss, s, idx, vals, y, values=values, **kw)
    ref, g_ref = _run(lambda x, i, vv, yy, **k: kd_loss(x, t, yy, **k), s, idx, vals, y, **kw)
    assert rel_err(loss, ref) <= 1e-6 and rel_err(g, g_ref) <= 1e-6


def test_taid_endpoints_and_zero_soft_weight():
    s, idx, vals, y = _inputs((9,), 23, 5, values="logprobs")
    for tail in ("renormalize", "bucket"):
        kw = dict(values="logprobs", tail=tail, reduction="none")
        one, g1 = _run(topk_kd_loss, s, idx, vals, y, divergence="taid", taid_t=1.0, **kw)
        fwd, gf = _run(topk_kd_loss, s, idx, vals, y, divergence="forward_kl", **kw)
        assert torch.equal(one, fwd) and torch.equal(g1, gf)
        # λ = 0: r = q, D ≡ 0; soft weight 0: no divergence either (the teacher unread)
        zero, g0 = _run(topk_kd_loss, s, idx, vals, y, divergence="taid", taid_t=0.0, **kw)
        assert torch.all(zero == 0) and torch.all(g0 == 0)
        nan_vals = torch.full_like(vals, float("nan"))
        ce, gce = _run(topk_kd_loss, s, idx, nan_vals, y, soft_label_weight=0.0,
                       hard_label_weight=2.0, **kw)
        ref, g_ref = _run(topk_kd_loss_ref, s, idx, vals, y, soft_label_weight=0.0,
                          hard_label_weight=2.0, **kw)
        assert rel_err(ce, ref) <= 1e-6 and rel_err(gce, g_ref) <= 1e-6


def test_taid_and_hard_label_nonfinite_policy():
    s, idx, vals, y = _inputs((6,), 17, 4, values="logprobs", pad_frac=0.0, ignore_frac=0.0)
    # row 0: TAID's target has no support (the student masks every teacher entry with
    # mass, the teacher every other one): NaN; row 1: the label's logit is -inf: the
    # cross-entropy is +inf, the gradient finite; row 2: a NaN outside the entries counts
    # for the hard label (the loss reads the whole row); row 3: ignored, full of NaN
    vals[0] = torch.tensor([0.0, float("-inf"), float("-inf"), float("-inf")])
    s[0, idx[0, 0]] = float("-inf")
    rest = torch.ones(17, dtype=torch.bool)
    rest[idx[2]] = False
    s[1, y[1]] = float("-inf")
    idx[1] = torch.where(idx[1] == y[1], (y[1] + 1) % 17, idx[1])  # (not an entry)
    vals[1] = torch.log_softmax(torch.randn(17, dtype=torch.float64), -1)[idx[1]]
    s[2, rest.nonzero()[0, 0]] = float("nan")
    s[3] = float("nan")
    y[3] = IGNORE
    kw = dict(values="logprobs", tail="renormalize", reduction="none", divergence="taid",
              taid_t=0.5, hard_label_weight=1.0)
    loss, g = _run(topk_kd_loss, s, idx, vals, y, **kw)
    assert torch.isnan(loss[0]) and torch.isnan(g[0]).all()
    assert loss[1] == float("inf") and torch.isfinite(g[1]).all()
    assert torch.isnan(loss[2]) and torch.isnan(g[2]).all()
    assert loss[3] == 0 and torch.all(g[3] == 0)
    ok = torch.tensor([False, False, False, False, True, True])
    ref, g_ref = _run(topk_kd_loss_ref, s[ok], idx[ok], vals[ok], y[ok], **kw)
    assert rel_err(loss[ok], ref) <= 1e-6 and rel_err(g[ok], g_ref) <= 1e-6


@pytest.mark.parametrize(
    "over, name",
    [
        (dict(divergence="taid"), "taid_t"),
        (dict(divergence="taid", taid_t=1.5), "taid_t"),
        (dict(hard_label_weight=1.0, labels=None), "labels"),
        (dict(hard_label_weight=-1.0), "hard_label_weight"),
        (dict(soft_label_weight=float("nan")), "soft_label_weight"),
    ],
)
def test_bad_mixing_keywords(over, name):
    args = _bad(**over)
    with pytest.raises(ValueError, match=name):
        topk_kd_loss(args.pop("student_logits"), args.pop("teacher_topk_indices"),
                     args.pop("teacher_topk_values"), args.pop("labels"), **args)


def test_cuda_verifier_refuses_taid_hard_label_and_zero_soft_weight():
    from kdkernels._core.codes import Div
    from kdkernels.topk.cuda import unsupported_reason

    assert unsupported_reason(torch.float32, div=int(Div.JSD), hard_label=False) is None
    assert "taid" in unsupported_reason(torch.float32, div=int(Div.TAID))
    assert "soft_label_weight=0" in unsupported_reason(torch.float32, div=int(Div.ZERO))
    assert "hard_label_weight" in unsupported_reason(torch.float32, div=int(Div.FWD_KL),
                                                     hard_label=True)
