"""`uld_loss` (docs/spec.md §7) against the float64 oracle, on the torch backend and on the
Triton kernel (under the interpreter on a CPU, at small shapes), and against TRL GOLD's
ULD term.

Inputs have wide spreads (std 5..30), student and teacher vocabularies of different
sizes both ways, ignored rows holding NaN, -inf masked columns and equal logits (whose
sorted order decides the gradient: the lower class index first, on every backend).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_lowp, grad_ulp, max_abs_err

import kdkernels
from kdkernels import BackendUnavailableError, ULDLoss, uld_loss
from kdkernels._core.backend import recording, triton_interpreting
from kdkernels.uld import order
from kdkernels.uld.reference import uld_loss_ref

IGNORE = -100
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = torch.cuda.is_available() or triton_interpreting()


def _inputs(n, vs, vt, *, std=10.0, labels=True, masked=0, ties=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, vs, generator=g, dtype=torch.float64) * std
    t = torch.randn(n, vt, generator=g, dtype=torch.float64) * std
    if ties:  # equal student logits, among the largest and elsewhere
        s[:, 1:4] = s.max(1, keepdim=True).values
        s[:, 6:10] = s[:, 5:6]
    if masked:  # padded vocabularies: -inf columns on both sides
        s[:, -masked:] = -math.inf
        t[:, -masked:] = -math.inf
    y = None
    if labels:
        y = torch.randint(0, vs - masked, (n,), generator=g)
        y[::3] = IGNORE
        s[::3] = math.nan  # ignored rows never matter, whatever they hold
        t[::3, :2] = math.inf
    return s, t, y


def _weights(n):
    return torch.linspace(0.5, 2.0, n, dtype=torch.float64)


def _run(s, t, y, dtype, backend, **kw):
    """Our per-row losses and the gradient of Σ w_n L_n (a non-unit upstream gradient)."""
    x = s.to(DEV, dtype, copy=True).requires_grad_()
    yy = y.to(DEV) if y is not None else None
    with recording() as calls:
        loss = uld_loss(x, t.to(DEV, dtype), yy, reduction="none", backend=backend, **kw)
        (loss * _weights(loss.numel()).to(DEV, loss.dtype)).sum().backward()
    assert calls and {c for c in calls if c[0] == "uld_loss"} == {("uld_loss", backend)}
    return loss.detach().cpu(), x.grad.cpu()


def _oracle(s, t, y, dtype, compute_dtype=torch.float64, **kw):
    """The oracle on the dtype-rounded inputs, in `compute_dtype`."""
    x = s.to(dtype).to(compute_dtype, copy=True).requires_grad_()
    loss = uld_loss_ref(x, t.to(dtype).to(compute_dtype), y, reduction="none",
                        compute_dtype=compute_dtype, **kw)
    (loss * _weights(loss.numel()).to(compute_dtype)).sum().backward()
    return loss.detach(), x.grad


def _check(s, t, y, dtype, backend, **kw):
    loss, grad = _run(s, t, y, dtype, backend, **kw)
    ref_loss, ref_grad = _oracle(s, t, y, dtype, **kw)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    if y is not None:
        ignored = y == IGNORE
        assert (loss[ignored] == 0).all() and (grad[ignored] == 0).all()
        assert (loss[~ignored] > 0).all()
    if dtype == torch.float64 and backend == "torch":
        # float64 arithmetic throughout: the float32 loss and the float32 upstream gradient
        # (rowgrad's rescale) are the only roundings
        assert max_abs_err(loss, ref_loss) <= 1e-7 * max(1.0, ref_loss.abs().max().item())
        assert max_abs_err(grad, ref_grad) <= 1e-7 * max(1e-3, ref_grad.abs().max().item())
        return
    low = torch.float32 if dtype == torch.float64 else dtype  # the kernels compute in fp32
    low_loss, low_grad = _oracle(s, t, y, dtype, compute_dtype=low, **kw)
    assert_lowp(loss, low_loss, ref_loss, low)
    assert_lowp(grad, low_grad, ref_grad, low, slack=grad_ulp(ref_grad, dtype))


# -------------------------------------------------------------------- torch backend

SHAPES = [(9, 37, 29), (9, 29, 37), (7, 40, 40), (6, 1, 13), (6, 13, 1)]


@pytest.mark.parametrize("n, vs, vt", SHAPES)
@pytest.mark.parametrize("std", [5.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_matches_the_oracle(n, vs, vt, std, dtype):
    s, t, y = _inputs(n, vs, vt, std=std)
    _check(s, t, y, dtype, "torch")


@pytest.mark.parametrize("top_k", [1, 5, 29, 33, 37])
@pytest.mark.parametrize("vs, vt", [(37, 29), (29, 37)])
def test_torch_top_k(top_k, vs, vt):
    s, t, y = _inputs(9, vs, vt, std=20.0, seed=top_k)
    _check(s, t, y, torch.float64, "torch", top_k=top_k)
    _check(s, t, y, torch.float32, "torch", top_k=top_k)


@pytest.mark.parametrize("kw", [
    dict(temperature=2.0),
    dict(temperature=0.5, teacher_temperature=3.0),
    dict(hard_label_weight=0.7),
    dict(hard_label_weight=0.4, soft_label_weight=0.0),
    dict(hard_label_weight=0.3, soft_label_weight=2.0, temperature=1.7, top_k=6),
])
def test_torch_temperatures_and_hard_labels(kw):
    s, t, y = _inputs(9, 31, 44, std=15.0)
    _check(s, t, y, torch.float64, "torch", **kw)
    _check(s, t, y, torch.float32, "torch", **kw)


@pytest.mark.parametrize("top_k", [None, 3, 8])
def test_ties_give_the_oracle_order(top_k):
    """Equal student logits: which of them gets which sorted position's sign follows the
    lower class index on every path (the CPU's unstable sort is re-sorted stably)."""
    s, t, y = _inputs(9, 30, 26, std=8.0, ties=True)
    _check(s, t, y, torch.float64, "torch", top_k=top_k)
    _check(s, t, y, torch.float32, "torch", top_k=top_k)


def _ties_reversed(x, k, backend="torch", exact=True):
    """A descending order that puts equal values by *higher* index first (as an unstable
    library sort may)."""
    v = x.shape[1]
    vals, idx = torch.sort(x.flip(1), dim=1, descending=True, stable=True)
    return vals[:, :k], (v - 1 - idx)[:, :k]


@pytest.mark.parametrize("top_k", [None, 3, 5, 8])
def test_the_cpu_fast_order_is_repaired_where_it_matters(top_k, monkeypatch):
    """The CPU path takes the library's order among equal values and redoes the rows where
    it could change the gradient: with the worst such order the oracle still holds."""
    from kdkernels.uld import pytorch as uld_torch

    monkeypatch.setattr(uld_torch, "student_order", _ties_reversed)
    s, t, y = _inputs(12, 30, 26, std=8.0, ties=top_k != 5)
    s[:, 11:16] = s[:, 10:11]
    if top_k == 5:  # only five equal values at sorted positions 3..7, cut by position K
        fourth = torch.sort(s[:, :20], dim=1, descending=True).values[:, 3:4]
        s[:, 20:24] = fourth
    _check(s, t, y, torch.float64, "torch", top_k=top_k)
    _check(s, t, y, torch.float32, "torch", top_k=top_k)


def test_masked_columns_get_zero_and_change_nothing():
    s, t, y = _inputs(9, 34, 27, std=12.0, masked=5)
    _check(s, t, y, torch.float32, "torch", top_k=30)
    loss, grad = _run(s, t, y, torch.float64, "torch")
    assert (grad[:, -5:] == 0).all()
    # the same loss as on the vocabularies without the masked columns
    loss2, grad2 = _run(s[:, :-5].contiguous(), t[:, :-5].contiguous(), y, torch.float64,
                        "torch")
    assert torch.allclose(loss, loss2, atol=1e-6) and torch.allclose(grad[:, :-5], grad2)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if HAS_TRITON else []))
def test_nonfinite_rows_are_nan_and_stay_in_their_row(backend):
    s, t, y = _inputs(6, 20, 17, std=5.0, labels=False)
    s[1, 3] = math.nan
    t[2, 0] = math.inf
    s[3] = -math.inf  # no softmax at all
    t[4, 5] = math.nan
    loss, grad = _run(s, t, None, torch.float32, backend, top_k=7)
    bad = torch.tensor([False, True, True, True, True, False])
    assert loss[bad].isnan().all() and grad[bad].isnan().all()
    assert torch.isfinite(loss[~bad]).all() and torch.isfinite(grad[~bad]).all()
    # without the soft term the teacher is not read: its NaN does not matter
    y = torch.zeros(6, dtype=torch.long)
    loss, _ = _run(s, t, y, torch.float32, backend, soft_label_weight=0.0,
                   hard_label_weight=1.0)
    assert torch.isfinite(loss[[0, 2, 4, 5]]).all() and loss[[1, 3]].isnan().all()


def test_reductions_and_normalizer():
    s, t, y = _inputs(12, 19, 25, std=6.0)
    x = s.float()
    none = uld_loss(x, t.float(), y, reduction="none")
    n_valid = int((y != IGNORE).sum())
    ref = uld_loss_ref(s.float().double(), t.float().double(), y, reduction="none")
    assert max_abs_err(none, ref) < 1e-5
    assert abs(uld_loss(x, t.float(), y, reduction="sum") - none.sum()) < 1e-5
    assert abs(uld_loss(x, t.float(), y) - none.sum() / n_valid) < 1e-6
    assert abs(uld_loss(x, t.float(), y, normalizer=7.0) - none.sum() / 7) < 1e-6
    # leading dims are kept by 'none'
    out = uld_loss(x.view(3, 4, 19), t.float().view(3, 4, 25), y.view(3, 4), reduction="none")
    assert out.shape == (3, 4) and torch.equal(out.flatten(), none)


def test_row_blocks_do_not_change_the_result(monkeypatch):
    from kdkernels.uld import pytorch as uld_torch

    s, t, y = _inputs(11, 23, 30, std=9.0)
    whole = _run(s, t, y, torch.float32, "torch", top_k=10)
    monkeypatch.setattr(uld_torch, "chunk_rows", lambda *a, **k: 3)
    blocks = _run(s, t, y, torch.float32, "torch", top_k=10)
    assert torch.equal(whole[0], blocks[0]) and torch.equal(whole[1], blocks[1])


def test_without_autograd_the_same_loss():
    s, t, y = _inputs(9, 21, 18, std=7.0)
    x = s.float().requires_grad_()
    with_grad = uld_loss(x, t.float(), y, top_k=12, hard_label_weight=0.2, reduction="none")
    with torch.no_grad():
        without = uld_loss(x, t.float(), y, top_k=12, hard_label_weight=0.2, reduction="none")
    assert torch.equal(with_grad.detach(), without)


def test_no_cancellation_at_a_saturated_student():
    """A student nearly one-hot at the class the teacher also ranks first, with less mass:
    the gradient there is (1/τ)·p·(1 − ḡ) with 1 − ḡ ≈ 1e-9, formed without 1 − 1."""
    v = 50
    s = torch.zeros(2, v, dtype=torch.float64)
    s[:, 0] = 21.0  # p_0 ≈ 1 − 3.7e-8
    t = torch.zeros(2, v + 3, dtype=torch.float64)
    t[:, 0] = 8.0
    _, grad = _run(s, t, None, torch.float32, "torch")
    _, ref = _oracle(s, t, None, torch.float32)
    piv = ref[:, 0]
    assert (piv.abs() > 0).all() and (piv.abs() < 1e-6).all()
    assert ((grad[:, 0].double() - piv).abs() <= 1e-4 * piv.abs()).all()


# ------------------------------------------------------------------ Triton (interpreter)

triton_only = pytest.mark.skipif(not HAS_TRITON, reason="needs a GPU or TRITON_INTERPRET=1")


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide position tiles and 16-wide column tiles: several of each per row."""
    pytest.importorskip("triton")
    from kdkernels.uld import triton as uld_triton

    monkeypatch.setattr(uld_triton, "MAX_BLOCK_K", 16)
    monkeypatch.setattr(uld_triton, "row_tile", lambda v, on_cpu: (16, 4))
    monkeypatch.setattr(uld_triton, "_block_rows", lambda vs, vt, on_cpu: 4)


@triton_only
@pytest.mark.parametrize("n, vs, vt", [(9, 37, 29), (9, 29, 37), (6, 1, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_the_oracle(n, vs, vt, dtype, small_tiles):
    s, t, y = _inputs(n, vs, vt, std=30.0)
    _check(s, t, y, dtype, "triton")


@triton_only
@pytest.mark.parametrize("kw", [
    dict(top_k=5),
    dict(top_k=33),
    dict(temperature=0.5, teacher_temperature=2.0, top_k=9, hard_label_weight=0.5),
    dict(hard_label_weight=0.8, soft_label_weight=0.0),
    dict(hard_label_weight=0.25, temperature=1.5),
])
@pytest.mark.parametrize("vs, vt", [(37, 29), (29, 37)])
def test_triton_keywords(kw, vs, vt, small_tiles):
    s, t, y = _inputs(9, vs, vt, std=15.0, masked=3)
    _check(s, t, y, torch.float32, "triton", **kw)


@triton_only
@pytest.mark.parametrize("top_k", [None, 3, 8])
def test_triton_ties_and_the_torch_path_agree(top_k, small_tiles):
    """Ties inside the top K and at its boundary: the kernel's "beyond K" test and the
    sorted positions give the order of the oracle, as the torch path does."""
    s, t, y = _inputs(9, 30, 26, std=8.0, ties=True)
    s[:, 11:16] = s[:, 10:11]  # more equal values straddling position K
    _check(s, t, y, torch.float32, "triton", top_k=top_k)
    tr = _run(s, t, y, torch.float32, "triton", top_k=top_k)
    to = _run(s, t, y, torch.float32, "torch", top_k=top_k)
    assert max_abs_err(tr[0], to[0]) < 1e-5 and max_abs_err(tr[1], to[1]) < 1e-5


@triton_only
def test_triton_without_autograd_and_with_wide_tiles():
    s, t, y = _inputs(5, 300, 200, std=20.0)
    x = s.float().to(DEV)
    with torch.no_grad():
        out = uld_loss(x, t.float().to(DEV), y.to(DEV), top_k=40, backend="triton",
                       reduction="none")
    ref = uld_loss_ref(s.float().double(), t.float().double(), y, top_k=40, reduction="none")
    assert max_abs_err(out.cpu(), ref) < 1e-5


# -------------------------------------------------------------------------- order.py


@pytest.mark.parametrize("k", [1, 4, 17, 40])
def test_student_order_is_a_stable_descending_sort(k):
    x = torch.randint(-5, 5, (6, 40)).float()  # many ties
    x[0, :3] = -math.inf
    x[1] = 0.0
    x[2, 5] = -0.0
    want = torch.sort(x, dim=1, descending=True, stable=True)
    vals, idx = order.student_order(x, k)
    assert torch.equal(idx, want.indices[:, :k]) and torch.equal(vals, want.values[:, :k])
    assert torch.equal(order.teacher_sorted(x, k), want.values[:, :k])


# ------------------------------------------------------------------------- TRL GOLD


def _gold_uld(student_logits, teacher_logits, student_labels, teacher_labels, *,
              student_temperature, teacher_temperature, distillation_weight,
              skip_student_eos=True, skip_teacher_eos=True, ignore_index=IGNORE):
    """TRL GOLD's ULD distillation term on its default path (no byte-offset alignment, no
    hybrid JSD), written out: per sequence the answer span (from the first label that is
    not ignored, as many positions as such labels, minus the EOS when skipped), both spans
    cut to the shorter; per position softmaxes with their own temperatures, sorted
    descending, zero-padded to the larger vocabulary, L1 summed over positions and
    vocabulary and divided by the span length; the mean over sequences, times the
    weight."""

    def spans(labels):
        out = []
        for row in labels:
            keep = (row != ignore_index).nonzero()[:, 0]
            out.append((int(keep[0]) if keep.numel() else 0, int(keep.numel())))
        return out

    s_spans, t_spans = spans(student_labels), spans(teacher_labels)
    width = max(student_logits.shape[-1], teacher_logits.shape[-1])
    terms = []
    for i, ((s0, sn), (t0, tn)) in enumerate(zip(s_spans, t_spans)):
        sn, tn = sn - int(skip_student_eos), tn - int(skip_teacher_eos)
        if sn <= 0 or tn <= 0:
            terms.append(student_logits[i].sum() * 0.0)
            continue
        m = min(sn, tn)
        ps = torch.softmax(student_logits[i, s0:s0 + sn] / student_temperature, -1)[:m]
        pt = torch.softmax(teacher_logits[i, t0:t0 + tn] / teacher_temperature, -1)[:m]
        ps = F.pad(ps.sort(-1, descending=True).values, (0, width - ps.shape[-1]))
        pt = F.pad(pt.sort(-1, descending=True).values, (0, width - pt.shape[-1]))
        terms.append((ps - pt).abs().sum() / m)
    return distillation_weight * torch.stack(terms).mean()


@pytest.mark.parametrize("vs, vt", [(41, 29), (29, 41)])
def test_equals_trl_gold_uld_term(vs, vt):
    """GOLD's term over answer spans of different lengths = the mean over sequences of our
    per-position losses (the span's labels valid, the rest ignored) averaged per span."""
    b, length = 3, 9
    g = torch.Generator().manual_seed(7)
    s = torch.randn(b, length, vs, generator=g, dtype=torch.float64) * 8
    t = torch.randn(b, length, vt, generator=g, dtype=torch.float64) * 8
    labels = torch.full((b, length), IGNORE)
    for i, (start, size) in enumerate([(2, 5), (4, 5), (1, 8)]):
        labels[i, start:start + size] = torch.randint(0, vs, (size,), generator=g)
    kw = dict(student_temperature=1.5, teacher_temperature=0.8, distillation_weight=0.6)
    xs = s.clone().requires_grad_()
    gold = _gold_uld(xs, t, labels, labels, **kw)
    gold.backward()
    # ours: the span without its last position (GOLD skips the EOS)
    ours_labels = labels.clone()
    for i in range(b):
        ours_labels[i, (labels[i] != IGNORE).nonzero()[-1, 0]] = IGNORE
    x = s.float().requires_grad_()
    rows = uld_loss(x, t.float(), ours_labels, temperature=1.5, teacher_temperature=0.8,
                    soft_label_weight=0.6, reduction="none")
    per_seq = rows.sum(1) / (ours_labels != IGNORE).sum(1)
    ours = per_seq.mean()
    ours.backward()
    assert abs(ours.item() - gold.item()) < 1e-5 * gold.item()
    assert max_abs_err(x.grad, xs.grad) < 1e-6


def test_equals_trl_gold_with_equal_spans_as_a_mean():
    b, length, vs, vt = 2, 6, 33, 50
    s = torch.randn(b, length, vs, dtype=torch.float64) * 5
    t = torch.randn(b, length, vt, dtype=torch.float64) * 5
    labels = torch.randint(0, vs, (b, length))
    gold = _gold_uld(s, t, labels, labels, student_temperature=1.0, teacher_temperature=1.0,
                     distillation_weight=1.0, skip_student_eos=False, skip_teacher_eos=False)
    ours = uld_loss(s, t, labels)
    assert abs(ours.item() - gold.item()) < 1e-6


# --------------------------------------------------------- arguments, module, backends


def test_module_form():
    s, t, y = _inputs(6, 15, 22, std=4.0)
    mod = ULDLoss(top_k=7, hard_label_weight=0.2, temperature=1.3)
    assert "top_k=7" in repr(mod)
    out = mod(s.float(), t.float(), y, normalizer=4.0)
    ref = uld_loss(s.float(), t.float(), y, top_k=7, hard_label_weight=0.2, temperature=1.3,
                   normalizer=4.0)
    assert torch.equal(out, ref)
    assert kdkernels.nn.ULDLoss is ULDLoss


@pytest.mark.parametrize("kw, match", [
    (dict(top_k=0), "top_k must be an int in"),
    (dict(top_k=23), "top_k must be an int in"),
    (dict(temperature=0.0), "temperature must be in"),
    (dict(teacher_temperature=-1.0), "teacher_temperature must be in"),
    (dict(hard_label_weight=-0.1), "hard_label_weight must be in"),
    (dict(soft_label_weight=math.inf), "soft_label_weight must be finite"),
    (dict(backend="tpu"), "backend must be one of"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        uld_loss(torch.randn(3, 15), torch.randn(3, 22), **kw)


def test_bad_shapes_and_labels():
    with pytest.raises(ValueError, match="same leading shape"):
        uld_loss(torch.randn(3, 15), torch.randn(4, 22))
    with pytest.raises(ValueError, match="needs labels"):
        uld_loss(torch.randn(3, 15), torch.randn(3, 22), hard_label_weight=1.0)
    with pytest.raises(ValueError, match="labels must be in"):
        uld_loss(torch.randn(3, 15), torch.randn(3, 22), torch.tensor([0, 15, 1]))
    with pytest.raises(TypeError, match="teacher_logits must be float"):
        uld_loss(torch.randn(3, 15), torch.ones(3, 22, dtype=torch.long))


def test_no_cuda_backend():
    s, t = torch.randn(3, 15), torch.randn(3, 22)
    with pytest.raises(BackendUnavailableError, match="uld_loss: backend='cuda'.*not "
                                                      "implemented for this op"):
        uld_loss(s, t, backend="cuda")
    with recording() as calls:
        uld_loss(s, t)
    assert calls == [("uld_loss", "torch")]
