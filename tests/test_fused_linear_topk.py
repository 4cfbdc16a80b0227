"""fused_linear_topk_kd_loss (docs/spec.md §2, top-k form) against a float64 oracle: the
student logits materialised in float64 (fused_linear.reference.head_logits_ref), then the
top-k oracle (topk.reference.topk_kd_loss_ref). CPU only, tiny shapes, the torch backend;
an explicit 'triton' runs the Triton top-k step under the interpreter where it exists."""

from __future__ import annotations

import pytest
import torch
from _helpers import assert_lowp, rel_err

import kdkernels
from kdkernels import BackendUnavailableError, FusedLinearTopKKDLoss, fused_linear_topk_kd_loss
from kdkernels._core import backend as B
from kdkernels._core.codes import Div
from kdkernels.fused_linear import ops as fl_ops
from kdkernels.fused_linear.reference import fused_linear_topk_kd_loss_ref
from kdkernels.topk.ops import TOPK_KD_FWD

IGNORE = -100
MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
DIVS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def make_case(lead, h, v, k, *, std=30.0, t_std=30.0, values="logits", teacher_top=True,
              pad_frac=0.2, ignored=0.3, dtype=torch.float32, bias=True, labels=True):
    """Hidden states and a head whose logits have standard deviation about `std`, and a
    teacher's top-k (its own top-k, or k arbitrary classes) with some -1 padding."""
    g = dict(dtype=torch.float64)
    c = dict(hs=torch.randn(*lead, h, **g), ws=torch.randn(v, h, **g) * (std / h**0.5),
             bs=torch.randn(v, **g) * 2 if bias else None)
    c = {key: (x.to(dtype) if x is not None else None) for key, x in c.items()}
    t = torch.randn(*lead, v, **g) * t_std
    if teacher_top:
        idx = t.topk(k, -1).indices
    else:  # k distinct classes but the teacher's argmax (so a tail mass remains)
        key = torch.rand(*lead, v).scatter_(-1, t.argmax(-1, keepdim=True), 2.0)
        idx = key.argsort(-1)[..., :k]
    src = torch.log_softmax(t, -1) if values == "logprobs" else t
    vals = src.gather(-1, idx)
    pad = torch.rand(*lead, k) < pad_frac
    c["idx"] = idx.masked_fill(pad, -1)
    c["vals"] = vals.masked_fill(pad, 123.0).float()  # padded values must be ignored
    y = None
    if labels:
        y = torch.randint(0, v, lead)
        y[torch.rand(lead) < ignored] = IGNORE
    c["labels"] = y
    return c


def run(fn, c, go=None, *, frozen=(), **kw):
    """Loss and the gradients of hs, ws, bs (None where frozen or absent)."""
    leaves = {}
    for key in ("hs", "ws", "bs"):
        x = c[key]
        if x is not None:
            x = x.detach().clone().requires_grad_(key not in frozen)
        leaves[key] = x
    out = fn(leaves["hs"], leaves["ws"], c["idx"], c["vals"], c["labels"],
             student_bias=leaves["bs"], **kw)
    if out.requires_grad:
        out.backward(torch.ones_like(out) if go is None else go.to(out.dtype))
    return out.detach(), {key: (x.grad if x is not None else None) for key, x in leaves.items()}


def as64(c):
    return {key: (x.double() if x is not None and x.is_floating_point() else x)
            for key, x in c.items()}


def check_against_ref(c, go=None, *, frozen=(), tol=1e-5, **kw):
    """The fused loss and the float64 oracle on the same inputs; loss and every gradient."""
    ref_kw = {key: val for key, val in kw.items()
              if key not in ("chunk_size", "backend", "weight_grad_accumulation")}
    loss, grads = run(fused_linear_topk_kd_loss, c, go, frozen=frozen, **kw)
    ref, ref_grads = run(fused_linear_topk_kd_loss_ref, as64(c),
                         go.double() if go is not None else None, frozen=frozen, **ref_kw)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert torch.isfinite(loss).all()
    assert rel_err(loss, ref) <= max(tol, 1e-6), (rel_err(loss, ref), kw)
    for key in ("hs", "ws", "bs"):
        if c[key] is None or key in frozen:
            assert grads[key] is None
            continue
        assert grads[key].dtype == c[key].dtype and grads[key].shape == c[key].shape
        assert torch.isfinite(grads[key]).all()
        err = rel_err(grads[key], ref_grads[key])
        assert err <= tol, (key, err, kw)
        assert grads[key].abs().max() > 0  # the comparison is not 0 against 0
    return loss, grads


FULL = dict(student_softcap=40.0, student_logit_scale=0.8)


@pytest.mark.parametrize("values, tail", MODES)
@pytest.mark.parametrize("divergence, beta", DIVS)
def test_every_mode_matches_float64(values, tail, divergence, beta):
    """3-D leading shape, bias, softcap, logit scale, 30% ignored rows, 20% padded slots,
    std-30 logits, a chunk that does not divide N, upstream gradient 0.7, temperature."""
    c = make_case((3, 5), 24, 131, 9, values=values, teacher_top=values == "logits",
                  t_std=30.0 if values == "logits" else 3.0)
    tau = 1.7 if values == "logits" else 1.0
    check_against_ref(c, torch.tensor(0.7), values=values, tail=tail, divergence=divergence,
                      beta=beta, temperature=tau, chunk_size=4, backend="torch", **FULL)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("values, tail", [MODES[0], MODES[2]])
def test_reductions(reduction, values, tail):
    """'none' recomputes the chunks in backward with a signed per-row upstream gradient."""
    c = make_case((2, 7), 16, 97, 6, values=values, t_std=3.0)
    go = torch.randn(2, 7) * 3 if reduction == "none" else torch.tensor(-1.7)
    loss, _ = check_against_ref(c, go, values=values, tail=tail, divergence="jsd", beta=0.6,
                                reduction=reduction, chunk_size=3, backend="torch", **FULL)
    if reduction == "none":
        assert loss.shape == (2, 7)
        assert (loss[c["labels"] == IGNORE] == 0).all()
        assert (loss[c["labels"] != IGNORE] > 0).all()


@pytest.mark.parametrize(
    "variant",
    [
        dict(),  # a plain linear head
        dict(student_softcap=15.0),
        dict(student_logit_scale=-0.6),
        dict(temperature=3.0, normalizer=40.0),
        dict(normalizer=torch.tensor(25)),
        dict(divergence="jsd", beta=0.0),  # the endpoints are the plain KLs
        dict(divergence="jsd", beta=1.0),
        dict(no_bias=True, no_labels=True),
        dict(no_bias=True, student_logit_scale=0.5, student_softcap=20.0, int32=True),
        dict(divergence="reverse_kl", no_pad=True, k=50),  # every class selected (k = V)
    ],
)
def test_variants(variant):
    variant = dict(variant)
    k = variant.pop("k", 7)
    c = make_case((11,), 9, 50, k, bias=not variant.pop("no_bias", False),
                  labels=not variant.pop("no_labels", False),
                  pad_frac=0.0 if variant.pop("no_pad", False) else 0.2)
    if variant.pop("int32", False):
        c["idx"] = c["idx"].to(torch.int32)
    check_against_ref(c, torch.tensor(1.3), chunk_size=5, backend="torch", **variant)


def test_bias_only_hidden_only_and_frozen_head(monkeypatch):
    """Gradients only for what requires them; a frozen head does no weight-gradient work."""
    c = make_case((9,), 10, 83, 8, values="logprobs", t_std=3.0)
    kw = dict(values="logprobs", tail="bucket", chunk_size=4, backend="torch", **FULL)
    check_against_ref(c, frozen=("hs",), **kw)
    check_against_ref(c, frozen=("hs", "ws"), **kw)

    def boom(*a, **k):
        raise AssertionError("weight-gradient GEMM ran for a frozen head")

    monkeypatch.setattr(fl_ops, "_accumulate_f32", boom)
    check_against_ref(c, frozen=("ws", "bs"), **kw)


@pytest.mark.parametrize("chunk_size", [1, 6, 64, None])
def test_chunk_sizes_and_no_full_logits(chunk_size, monkeypatch):
    """Any chunk size gives the oracle's result, and the divergence step only ever sees a
    chunk of rows (never the N x V logits)."""
    n = 13
    seen = []
    real = fl_ops.topk_kd_fwd

    def spy(s, *args):
        seen.append(tuple(s.shape))
        return real(s, *args)

    monkeypatch.setattr(fl_ops, "topk_kd_fwd", spy)
    c = make_case((n,), 8, 40, 5)
    check_against_ref(c, divergence="reverse_kl", chunk_size=chunk_size, backend="torch",
                      **FULL)
    rows = min(chunk_size or n, n)
    assert seen and all(r <= rows and v == 40 for r, v in seen)
    assert sum(r for r, _ in seen) == n  # one pass (reduction="mean" stores the gradient)


def test_float64_inputs_are_exact():
    c = make_case((6,), 7, 41, 5, dtype=torch.float64, values="logprobs", t_std=3.0)
    check_against_ref(c, values="logprobs", tail="bucket", divergence="jsd", chunk_size=4,
                      backend="torch", tol=1e-11, **FULL)


@pytest.mark.parametrize("values, tail", [MODES[0], MODES[2]])
def test_bfloat16_within_twice_torch_error(values, tail):
    """|ours − ref64| <= 2 |PyTorch in bf16 − ref64| + atol; gradients come back in bf16."""
    c = make_case((12,), 32, 113, 10, std=8.0, dtype=torch.bfloat16, values=values,
                  t_std=3.0)
    kw = dict(values=values, tail=tail, divergence="forward_kl", student_softcap=20.0)
    loss, grads = run(fused_linear_topk_kd_loss, c, chunk_size=5, backend="torch", **kw)
    ref, ref_grads = run(fused_linear_topk_kd_loss_ref, as64(c), **kw)
    low, low_grads = run(fused_linear_topk_kd_loss_ref, c, compute_dtype=torch.bfloat16, **kw)
    bf16 = torch.bfloat16
    assert_lowp(loss, low, ref, bf16)
    for key in ("hs", "ws", "bs"):
        assert grads[key].dtype == bf16
        assert_lowp(grads[key], low_grads[key], ref_grads[key], bf16, measure=rel_err)


def test_weight_dtype_accumulation():
    """'weight': identical for float32 weights; within bf16 roundings of float64 in bf16."""
    c = make_case((7,), 9, 41, 6)
    kw = dict(divergence="reverse_kl", chunk_size=2, backend="torch")
    _, a = run(fused_linear_topk_kd_loss, c, weight_grad_accumulation="weight", **kw)
    _, b = run(fused_linear_topk_kd_loss, c, **kw)
    assert all(torch.equal(a[key], b[key]) for key in ("hs", "ws", "bs"))
    c16 = make_case((12,), 32, 113, 10, std=8.0, dtype=torch.bfloat16)
    _, g_w = run(fused_linear_topk_kd_loss, c16, weight_grad_accumulation="weight", **kw)
    _, ref_g = run(fused_linear_topk_kd_loss_ref, as64(c16), divergence="reverse_kl")
    _, low_g = run(fused_linear_topk_kd_loss_ref, c16, divergence="reverse_kl",
                   compute_dtype=torch.bfloat16)
    for key in ("ws", "bs"):
        assert g_w[key].dtype == torch.bfloat16
        assert_lowp(g_w[key], low_g[key], ref_g[key], torch.bfloat16, measure=rel_err)
    with pytest.raises(ValueError, match="weight_grad_accumulation"):
        run(fused_linear_topk_kd_loss, c, weight_grad_accumulation="bf16")


def test_all_rows_ignored_all_padding_and_empty():
    c = make_case((5,), 6, 33, 4)
    c["labels"][:] = IGNORE
    loss, grads = run(fused_linear_topk_kd_loss, c, chunk_size=2)
    assert float(loss) == 0.0
    assert all((grads[key] == 0).all() for key in ("hs", "ws", "bs"))
    c = make_case((5,), 6, 33, 4, ignored=0.0)
    c["idx"][1] = -1  # a row with nothing selected: loss 0, no gradient
    loss, grads = run(fused_linear_topk_kd_loss, c, reduction="none", chunk_size=2)
    assert loss[1] == 0 and (grads["hs"][1] == 0).all() and (loss[[0, 2, 3, 4]] > 0).all()
    e = make_case((0, 3), 6, 33, 4)
    loss, grads = run(fused_linear_topk_kd_loss, e)
    assert float(loss) == 0.0 and grads["hs"].shape == (0, 3, 6) and (grads["ws"] == 0).all()


def test_no_grad_constant_teacher_and_backward_twice():
    c = make_case((7,), 8, 40, 5)
    ref = fused_linear_topk_kd_loss_ref(*(as64(c)[k] for k in ("hs", "ws", "idx", "vals")),
                                        c["labels"], student_bias=c["bs"].double())
    hs = c["hs"].clone().requires_grad_()
    vals = c["vals"].clone().requires_grad_()
    with torch.no_grad():
        out = fused_linear_topk_kd_loss(hs, c["ws"], c["idx"], vals, c["labels"],
                                        student_bias=c["bs"], chunk_size=3)
    assert not out.requires_grad and rel_err(out, ref) <= 1e-5
    out = fused_linear_topk_kd_loss(hs, c["ws"], c["idx"], vals, c["labels"],
                                    student_bias=c["bs"], chunk_size=3)
    out.backward(retain_graph=True)
    assert hs.grad is not None and vals.grad is None
    with pytest.raises(RuntimeError, match="backward was called twice"):
        out.backward()


def test_module_matches_function():
    c = make_case((2, 4), 8, 37, 5, values="logprobs", t_std=3.0)
    kw = dict(values="logprobs", tail="bucket", divergence="jsd", beta=0.25,
              student_softcap=30.0, chunk_size=3)
    mod = FusedLinearTopKKDLoss(**kw)
    a, ga = run(lambda h, w, i, v, y, student_bias: mod(h, w, i, v, y, student_bias), c)
    b, gb = run(fused_linear_topk_kd_loss, c, **kw)
    assert torch.equal(a, b) and all(torch.equal(ga[key], gb[key]) for key in ga)
    assert "bucket" in repr(mod)
    with pytest.raises(TypeError, match="unknown keyword"):
        FusedLinearTopKKDLoss(teacher_softcap=3.0)


def test_torch_compile_fullgraph_two_sizes():
    def f(hs, ws, idx, vals, labels, **kw):
        return fused_linear_topk_kd_loss(hs, ws, idx, vals, labels, chunk_size=4,
                                         student_softcap=20.0, **kw)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for n in (6, 9):
        c = make_case((n,), 8, 29, 4)
        a, ga = run(compiled, c)
        b, gb = run(f, c)
        assert rel_err(a, b) <= 1e-6 and all(rel_err(ga[key], gb[key]) <= 1e-6 for key in ga)


# ------------------------------------------------------------------------------ backends


def test_cuda_on_cpu_raises():
    c = make_case((4,), 6, 20, 3)
    with pytest.raises(BackendUnavailableError, match="fused_linear_topk_kd_loss"):
        run(fused_linear_topk_kd_loss, c, backend="cuda")


def test_triton_runs_the_triton_topk_step_or_is_refused():
    """Under the interpreter with a Triton top-k step: it runs (and only Triton runs);
    without one: an explicit request is refused, saying why."""
    c = make_case((6,), 8, 37, 5, values="logprobs", t_std=3.0)
    kw = dict(values="logprobs", tail="bucket", divergence="jsd", chunk_size=4,
              student_softcap=30.0)
    if "triton" in TOPK_KD_FWD.impls and B.device_reason("triton", torch.device("cpu")) is None:
        with B.recording() as calls:
            check_against_ref(c, torch.tensor(0.7), backend="triton", **kw)
        assert ("topk_kd_loss", "triton") in calls
        assert ("fused_linear_topk_kd_loss", "triton") in calls
        assert {be for _, be in calls} == {"triton"}, calls
    else:
        with pytest.raises(BackendUnavailableError, match="backend='triton'"):
            run(fused_linear_topk_kd_loss, c, backend="triton", **kw)


@pytest.fixture
def fake_gpu_spies(monkeypatch):
    """A faked GPU on which every backend can run; every implementation of the fused
    top-k table, its step and the softcap tables is a spy computing with torch."""
    monkeypatch.setattr(B, "on_gpu", lambda device: True)
    monkeypatch.setattr(B, "device_reason", lambda backend, device: None)
    monkeypatch.delenv(B.ENV, raising=False)
    calls = []
    for table in (fl_ops.FUSED_TOPK, TOPK_KD_FWD, fl_ops.SOFTCAP_FWD, fl_ops.SOFTCAP_BWD):
        ref = table.implementation("torch")
        for be in ("torch", "triton", "cuda"):

            def spy(*args, _t=table, _be=be, _ref=ref):
                calls.append((_t.op, _be))
                return _ref(*args)

            monkeypatch.setitem(table._fns, be, spy)
    return calls


def test_a_backend_follows_the_topk_step(fake_gpu_spies, monkeypatch):
    """The fused table lists, accepts and auto-selects a backend only as the top-k step's
    table allows: checked when a call resolves, so a step added later works at once."""
    calls = fake_gpu_spies
    table = fl_ops.FUSED_TOPK
    c = make_case((4,), 6, 20, 3)
    for be in ("triton", "cuda"):
        monkeypatch.delitem(TOPK_KD_FWD.impls, be, raising=False)
    assert table.backends == ("torch",)
    for be in ("triton", "cuda"):
        with pytest.raises(BackendUnavailableError,
                           match=f"until topk_kd_loss has a '{be}' backend"):
            run(fused_linear_topk_kd_loss, c, backend=be)
    assert calls == []
    run(fused_linear_topk_kd_loss, c)  # auto on the (fake) GPU: torch
    assert {be for _, be in calls} == {"torch"}
    # the step gains a triton backend, outside `auto`: explicit runs it, auto does not
    monkeypatch.setitem(TOPK_KD_FWD.impls, "triton", B.Impl("unused:unused", auto=False))
    assert table.backends == ("triton", "torch")
    calls.clear()
    run(fused_linear_topk_kd_loss, c, backend="triton", student_softcap=5.0)
    assert ("topk_kd_loss", "triton") in calls and {be for _, be in calls} == {"triton"}
    calls.clear()
    run(fused_linear_topk_kd_loss, c)
    assert {be for _, be in calls} == {"torch"}
    # once the step joins `auto`, so does the fused loss
    monkeypatch.setitem(TOPK_KD_FWD.impls, "triton", B.Impl("unused:unused"))
    calls.clear()
    run(fused_linear_topk_kd_loss, c)
    assert {be for _, be in calls} == {"triton"}
    # the step's verifier gets the call's facts and is obeyed
    seen = {}

    def verify(**facts):
        seen.update(facts)
        return "k is too large for the test"

    monkeypatch.setattr(kdkernels.fused_linear.ops, "_test_verify", verify, raising=False)
    monkeypatch.setitem(TOPK_KD_FWD.impls, "triton", B.Impl(
        "unused:unused", verify="kdkernels.fused_linear.ops:_test_verify"))
    with pytest.raises(BackendUnavailableError, match="k is too large for the test"):
        run(fused_linear_topk_kd_loss, c, backend="triton")
    assert seen == dict(s_dtype=torch.float32, t_dtype=torch.float32, k=3, bucket=False,
                        div=int(Div.FWD_KL), hard_label=False)
    calls.clear()
    run(fused_linear_topk_kd_loss, c)  # auto moves on
    assert {be for _, be in calls} == {"torch"}


# ------------------------------------------------------------------------------ arguments


def _args(c, **over):
    a = dict(student_hidden=c["hs"], student_weight=c["ws"], teacher_topk_indices=c["idx"],
             teacher_topk_values=c["vals"], labels=c["labels"], student_bias=c["bs"],
             values="logprobs")
    a.update(over)
    return a


def _dup(c):
    idx = c["idx"].clone()
    idx[1, 2] = idx[1, 0]
    return idx


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (lambda c: dict(student_weight=c["ws"][:, :-1]), ValueError, "student_hidden has hidden"),
        (lambda c: dict(student_weight=c["ws"][None]), ValueError, "student_weight must be 2-D"),
        (lambda c: dict(student_weight=c["ws"].double()), TypeError, "same dtype"),
        (lambda c: dict(student_bias=c["bs"][:-1]), ValueError, "student_bias must have shape"),
        (lambda c: dict(student_bias=c["bs"].half()), TypeError, "student_bias"),
        (lambda c: dict(student_hidden=c["hs"].long()), TypeError, "student_hidden"),
        (lambda c: dict(teacher_topk_indices=c["idx"].float()), TypeError,
         "teacher_topk_indices"),
        (lambda c: dict(teacher_topk_values=c["vals"].long()), TypeError,
         "teacher_topk_values"),
        (lambda c: dict(teacher_topk_indices=c["idx"][:-1]), ValueError,
         "student's leading shape"),
        (lambda c: dict(teacher_topk_values=c["vals"][:, :-1]), ValueError,
         "teacher_topk_values must have the shape"),
        (lambda c: dict(teacher_topk_indices=torch.arange(18).expand(4, 18),
                        teacher_topk_values=torch.full((4, 18), -5.0)), ValueError, "k=18"),
        (lambda c: dict(teacher_topk_indices=c["idx"].masked_fill(c["idx"] == c["idx"][0, 0],
                                                                  17)), ValueError, "found 17"),
        (lambda c: dict(teacher_topk_indices=_dup(c)), ValueError, "twice"),
        (lambda c: dict(teacher_topk_values=c["vals"] + 5.0), ValueError, "log-probabilities"),
        (lambda c: dict(temperature=2.0), ValueError, "temperature"),
        (lambda c: dict(values="logits", tail="bucket"), ValueError, "bucket"),
        (lambda c: dict(divergence="tvd"), ValueError, "divergence"),
        (lambda c: dict(beta=1.5), ValueError, "beta"),
        (lambda c: dict(labels=c["labels"][:-1]), ValueError, "labels"),
        (lambda c: dict(labels=torch.full_like(c["labels"], 99)), ValueError, "labels must be"),
        (lambda c: dict(reduction="sum", normalizer=3.0), ValueError, "normalizer"),
        (lambda c: dict(student_softcap=0.0), ValueError, "student_softcap"),
        (lambda c: dict(student_logit_scale=float("nan")), ValueError, "student_logit_scale"),
        (lambda c: dict(chunk_size=0), ValueError, "chunk_size"),
        (lambda c: dict(chunk_size=2.0), TypeError, "chunk_size"),
        (lambda c: dict(teacher_topk_values=c["vals"].to("meta")), ValueError, "meta"),
        (lambda c: dict(backend="fast"), ValueError, "backend"),
    ],
)
def test_bad_input_raises_before_any_kernel(over, exc, match, monkeypatch):
    c = make_case((4,), 6, 17, 5, values="logprobs", pad_frac=0.0, t_std=3.0)

    def boom(*a, **k):
        raise AssertionError("a kernel ran before validation finished")

    monkeypatch.setattr("kdkernels.fused_linear.function.fused_linear_topk_kd_fwd", boom)
    with pytest.raises(exc, match=match):
        fused_linear_topk_kd_loss(**_args(c, **over(c)))
