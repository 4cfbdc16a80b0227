"""plackett_luce_loss (docs/spec.md §3) against a float64 brute force (explicit sort and loop)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import ATOL, rel_err

import kdkernels._core.chunking as chunking
from kdkernels import PlackettLuceLoss, plackett_luce_loss
from kdkernels._core.backend import BackendUnavailableError
from kdkernels.pld.reference import plackett_luce_loss_ref

IGNORE = -100


def _inputs(lead, v, *, dtype=torch.float64, s_std=30.0, t_std=30.0, ties=True, labels=True,
            ignore_frac=0.3):
    s = torch.randn(*lead, v, dtype=torch.float64) * s_std
    if ties:  # a handful of distinct teacher values: many ties, also across the top_k cut
        t = torch.randint(-3, 4, (*lead, v)).double() * (t_std / 3)
    else:
        t = torch.randn(*lead, v, dtype=torch.float64) * t_std
    y = None
    if labels:
        y = torch.randint(0, v, lead)
        y[torch.rand(lead) < ignore_frac] = IGNORE
    return s.to(dtype), t.to(dtype), y


def _run(fn, s, t, y, upstream=None, **kw):
    """(loss, grad of Σ upstream·loss w.r.t. s) with s a fresh leaf."""
    x = s.detach().clone().requires_grad_()
    out = fn(x, t, y, **kw)
    gout = torch.ones_like(out) if upstream is None else upstream.to(out.dtype)
    (g,) = torch.autograd.grad(out, x, gout)
    return out.detach(), g


@pytest.mark.parametrize("top_k", [None, 1, 4, 20, 37])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("with_labels", [True, False])
def test_matches_bruteforce_float64(top_k, reduction, temperature, with_labels):
    s, t, y = _inputs((3, 5), 37, labels=with_labels)
    kw = dict(temperature=temperature, top_k=top_k, reduction=reduction, ignore_index=IGNORE)
    upstream = torch.randn(3, 5, dtype=torch.float64) * 3 if reduction == "none" else None
    loss, g = _run(plackett_luce_loss, s, t, y, upstream, **kw)
    ref, g_ref = _run(plackett_luce_loss_ref, s, t, y, upstream, **kw)
    assert loss.dtype == torch.float32 and g.dtype == torch.float64
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= 1e-6
    assert rel_err(g, g_ref) <= 1e-6
    if y is not None:  # ignored rows: loss 0 and gradient 0
        ign = y == IGNORE
        assert torch.all(g[ign] == 0)
        if reduction == "none":
            assert torch.all(loss[ign] == 0)


@pytest.mark.parametrize("top_k", [None, 3])
@pytest.mark.parametrize("ties", [True, False])
def test_matches_bruteforce_float32(top_k, ties):
    s, t, y = _inputs((2, 7), 41, dtype=torch.float32, ties=ties)
    upstream = torch.randn(2, 7) * 2
    kw = dict(temperature=1.3, top_k=top_k, reduction="none")
    loss, g = _run(plackett_luce_loss, s, t, y, upstream, **kw)
    ref, g_ref = _run(plackett_luce_loss_ref, s, t, y, upstream, **kw)
    assert g.dtype == torch.float32
    assert rel_err(loss, ref) <= 1e-4
    assert rel_err(g, g_ref) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rounds_once(dtype):
    # float64 arithmetic inside: the result is the float64 oracle on the same (rounded)
    # inputs, rounded once: loss to float32, gradient to `dtype` (plus its subnormal floor)
    s, t, y = _inputs((9,), 29, dtype=dtype, s_std=8.0, t_std=8.0)
    kw = dict(top_k=5, reduction="sum")
    loss, g = _run(plackett_luce_loss, s, t, y, **kw)
    ref, g_ref = _run(plackett_luce_loss_ref, s, t, y, **kw)
    assert g.dtype == dtype
    assert rel_err(loss, ref) <= 1e-6
    eps = torch.finfo(dtype).eps
    assert torch.all((g.double() - g_ref).abs() <= eps * g_ref.abs() + ATOL[dtype])


def test_chunk_boundaries(monkeypatch):
    # 2 rows per chunk, 15 rows: several chunks and a ragged last one
    monkeypatch.setattr(chunking, "CHUNK_BYTES", 2 * 31 * 8)
    s, t, y = _inputs((15,), 31)
    for top_k in (None, 2):
        loss, g = _run(plackett_luce_loss, s, t, y, top_k=top_k, reduction="sum")
        ref, g_ref = _run(plackett_luce_loss_ref, s, t, y, top_k=top_k, reduction="sum")
        assert rel_err(loss, ref) <= 1e-6
        assert rel_err(g, g_ref) <= 1e-6


@pytest.mark.parametrize("top_k", [None, 1, 6])
def test_one_hot_teacher_at_label_is_cross_entropy(top_k):
    # w = onehot(y) exactly: the label is ranked first, so L = LSE(s) − s[y]
    s, _, y = _inputs((11,), 23, ignore_frac=0.0)
    t = torch.full((11, 23), float("-inf"), dtype=torch.float64)
    t.scatter_(1, y.unsqueeze(1), 0.0)
    loss, g = _run(plackett_luce_loss, s, t, y, top_k=top_k, reduction="none")
    ce, g_ce = _run(lambda x, t_, y_: F.cross_entropy(x, y_, reduction="none"), s, t, y)
    assert rel_err(loss, ce) <= 1e-6
    assert rel_err(g, g_ce) <= 1e-6
    # the same teacher without labels ranks its one-hot class first: the same CE
    loss_nl, g_nl = _run(plackett_luce_loss, s, t, None, top_k=top_k, reduction="none")
    assert rel_err(loss_nl, ce) <= 1e-6 and rel_err(g_nl, g_ce) <= 1e-6


def test_cold_teacher_is_cross_entropy_at_its_argmax():
    # τ → 0 makes softmax(t/τ) one-hot at the teacher's argmax (distinct logits); with that
    # class as the label it is also ranked first, and PLD becomes CE(s, argmax t).
    s, t, _ = _inputs((13,), 19, ties=False, t_std=3.0)
    y = t.argmax(-1)
    loss, g = _run(plackett_luce_loss, s, t, y, temperature=1e-5, reduction="sum")
    ce, g_ce = _run(lambda x, t_, y_: F.cross_entropy(x, y_, reduction="sum"), s, t, y)
    assert rel_err(loss, ce) <= 1e-6
    assert rel_err(g, g_ce) <= 1e-6


def _listmle(s, y, k_max):
    """ListMLE: −log Π_k exp(s[π_k]) / Σ_{ℓ≥k} exp(s[π_ℓ]) for π = (y, 0, 1, ..., V−1)."""
    out = []
    v = s.shape[-1]
    for n in range(s.shape[0]):
        pi = [int(y[n])] + [c for c in range(v) if c != int(y[n])]
        e = torch.exp(s[n][pi] - s[n].max())
        lik = torch.ones((), dtype=s.dtype)
        for k in range(k_max):
            lik = lik * e[k] / e[k:].sum()
        out.append(-torch.log(lik))
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uniform_teacher_is_listmle(top_k, dtype):
    # a constant teacher gives w = 1/V and, by the tie-break, π = (label, 0, 1, ...);
    # in float32 the constant is ±0.0 at random: −0.0 == +0.0 must stay a tie
    v = 17
    s, _, y = _inputs((6,), v, dtype=dtype, s_std=2.0, ignore_frac=0.0)
    if dtype == torch.float64:
        t = torch.full((6, v), 0.7, dtype=dtype)
    else:
        t = torch.where(torch.rand(6, v) < 0.5, -0.0, 0.0)
    k_max = v if top_k is None else top_k
    loss, g = _run(plackett_luce_loss, s, t, y, top_k=top_k, reduction="none")
    lm, g_lm = _run(lambda x, t_, y_: _listmle(x.double(), y_, k_max) / v, s, t, y)
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert rel_err(loss, lm) <= tol
    assert rel_err(g, g_lm) <= tol


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_classes_drop_out(dtype):
    # classes at -inf in both models get weight 0, rank last, add 0 to every LSE:
    # the loss equals PLD on the vocabulary without them, and their gradient is 0
    s, t, y = _inputs((8,), 21, dtype=dtype, ignore_frac=0.0)
    masked = torch.tensor([2, 9, 20])
    keep = torch.tensor([c for c in range(21) if c not in masked.tolist()])
    y = keep[torch.randint(0, len(keep), (8,))]
    s[:, masked] = float("-inf")
    t[:, masked] = float("-inf")
    loss, g = _run(plackett_luce_loss, s, t, y, reduction="none")
    remap = torch.full((21,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    ref, g_ref = _run(plackett_luce_loss_ref, s[:, keep], t[:, keep], remap[y], reduction="none")
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert rel_err(loss, ref) <= tol
    assert rel_err(g[:, keep], g_ref) <= tol
    assert torch.all(g[:, masked] == 0)


def test_reductions_normalizer_and_ignored():
    s, t, y = _inputs((4, 6), 15, dtype=torch.float32)
    per_row = plackett_luce_loss(s, t, y, reduction="none")
    total = plackett_luce_loss(s, t, y, reduction="sum")
    valid = (y != IGNORE).sum()
    torch.testing.assert_close(total, per_row.sum())
    torch.testing.assert_close(plackett_luce_loss(s, t, y), total / valid.clamp_min(1))
    torch.testing.assert_close(plackett_luce_loss(s, t, y, normalizer=7), total / 7)
    torch.testing.assert_close(
        plackett_luce_loss(s, t, y, normalizer=torch.tensor(5.0)), total / 5
    )
    # every row ignored: zero loss, zero gradient, no NaN
    y_all = torch.full_like(y, IGNORE)
    loss, g = _run(plackett_luce_loss, s, t, y_all)
    assert float(loss) == 0.0 and torch.all(g == 0)
    # top_k = V is the untruncated loss
    torch.testing.assert_close(plackett_luce_loss(s, t, y, top_k=15), plackett_luce_loss(s, t, y))


def test_teacher_gets_no_gradient_and_module():
    s, t, y = _inputs((5,), 13, dtype=torch.float32)
    x = s.clone().requires_grad_()
    tt = t.clone().requires_grad_()
    mod = PlackettLuceLoss(temperature=2.0, top_k=4)
    out = mod(x, tt, y)
    out.backward()
    assert tt.grad is None and x.grad is not None
    torch.testing.assert_close(out, plackett_luce_loss(s, t, y, temperature=2.0, top_k=4))
    assert "top_k=4" in repr(mod)
    # only the student needs grad: forward without grad works too
    with torch.no_grad():
        torch.testing.assert_close(mod(s, t, y), out.detach())


def test_compile_fullgraph():
    # labels=None: check_labels inspects CPU label values, which dynamo cannot trace
    s, t, _ = _inputs((4,), 11, dtype=torch.float32)
    y = None
    fn = torch.compile(
        lambda a, b, c: plackett_luce_loss(a, b, c, top_k=3), fullgraph=True, backend="aot_eager"
    )
    x = s.clone().requires_grad_()
    out = fn(x, t, y)
    out.backward()
    loss, g = _run(plackett_luce_loss, s, t, y, top_k=3)
    torch.testing.assert_close(out.detach(), loss)
    torch.testing.assert_close(x.grad, g)


def test_no_nan_at_wide_spread():
    s, t, y = _inputs((16,), 33, dtype=torch.float32, s_std=300.0, t_std=300.0, ties=False)
    loss, g = _run(plackett_luce_loss, s, t, y, reduction="none", top_k=7)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    ref, g_ref = _run(plackett_luce_loss_ref, s, t, y, reduction="none", top_k=7)
    assert rel_err(loss, ref) <= 1e-4 and rel_err(g, g_ref) <= 1e-4


def _bad(**over):
    s, t, y = _inputs((3,), 9, dtype=torch.float32)
    args = dict(student_logits=s, teacher_logits=t, labels=y)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, name",
    [
        (dict(student_logits=torch.ones(3, 9, dtype=torch.long)), TypeError, "student_logits"),
        (dict(teacher_logits=[1.0]), TypeError, "teacher_logits"),
        (dict(teacher_logits=torch.randn(3, 8)), ValueError, "same shape"),
        (dict(teacher_logits=torch.randn(4, 9)), ValueError, "same shape"),
        (dict(labels=torch.tensor([0, 1])), ValueError, "labels"),
        (dict(labels=torch.tensor([0, 9, 1])), ValueError, "labels"),
        (dict(labels=torch.tensor([0.0, 1.0, 2.0])), TypeError, "labels"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=10), ValueError, "top_k"),
        (dict(top_k=2.0), TypeError, "top_k"),
        (dict(top_k=True), TypeError, "top_k"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=math.inf), ValueError, "temperature"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(normalizer=-1.0), ValueError, "normalizer"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_input(over, exc, name):
    args = _bad(**over)
    with pytest.raises(exc, match=name):
        plackett_luce_loss(args.pop("student_logits"), args.pop("teacher_logits"),
                           args.pop("labels"), **args)


def test_cuda_backend_on_cpu_tensors_raises():
    s, t, y = _inputs((3,), 9, dtype=torch.float32)
    with pytest.raises(BackendUnavailableError, match="torch"):
        plackett_luce_loss(s, t, y, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_untouched(dtype):
    s, t, y = _inputs((6,), 19, dtype=dtype)
    copies = [s.clone(), t.clone(), y.clone()]
    for top_k in (None, 3):
        _run(plackett_luce_loss, s, t, y, top_k=top_k)
        _run(plackett_luce_loss, s, t, y, top_k=top_k, reduction="none",
             upstream=torch.randn(6))
    for a, b in zip((s, t, y), copies):
        assert torch.equal(a, b)


def test_ignored_row_with_infinite_loss_stays_zero():
    # the student puts -inf where the teacher has mass: infinite loss, but the row is ignored
    s, t, y = _inputs((5,), 12, ignore_frac=0.0)
    y[2] = IGNORE
    s[2, t[2].argmax()] = float("-inf")
    loss, g = _run(plackett_luce_loss, s, t, y, reduction="none")
    assert loss[2] == 0 and torch.all(g[2] == 0)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
