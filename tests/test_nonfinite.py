"""The non-finite policy (docs/spec.md, shared rules): a NaN or +inf in a row that counts,
or a distribution without a finite entry, makes that row's loss NaN and its gradient row
NaN; ignored rows and masked positions never matter; -inf is a mask."""

from __future__ import annotations

import math

import pytest
import torch
from _helpers import kd_params

import kdkernels as K

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
N, V = 5, 37
BAD_ROW = 2
nan, inf = math.nan, math.inf


def _kd(s, t, backend, **kw):
    """Per-row losses and the student's gradient of their sum."""
    s = s.clone().requires_grad_(True)
    out = K.kd_loss(s, t, backend=backend, reduction="none", **kw)
    out.sum().backward()
    return out.detach(), s.grad


def _labels(divergence):
    """labels= for the divergences that read the row's label (dkd, nkd), else nothing."""
    if divergence in ("dkd", "nkd"):
        return dict(labels=torch.arange(N) * 7 % V)
    return {}


def _poison(x, value, where="one"):
    x = x.clone()
    if where == "one":
        x[BAD_ROW, 5] = value
    else:  # the whole row
        x[BAD_ROW] = value
    return x


def _assert_only_bad_row_nan(loss, grad, clean_loss, clean_grad):
    assert math.isnan(loss[BAD_ROW]), f"bad row's loss is {loss[BAD_ROW]}"
    assert torch.isnan(grad[BAD_ROW]).all(), "the bad row's gradient must be NaN"
    rest = torch.arange(N) != BAD_ROW
    assert torch.equal(loss[rest], clean_loss[rest])
    assert torch.equal(grad[rest], clean_grad[rest])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", K.DIVERGENCES)
@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("value", [nan, inf], ids=["nan", "inf"])
def test_nan_or_inf_in_a_row_makes_that_row_nan(backend, divergence, side, value):
    s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    kw = dict(divergence=divergence, hard_label_weight=0.0, **kd_params(divergence),
              **_labels(divergence))
    clean = _kd(s, t, backend, **kw)
    if side == "student":
        s = _poison(s, value)
    else:
        t = _poison(t, value)
    got = _kd(s, t, backend, **kw)
    _assert_only_bad_row_nan(*got, *clean)
    assert math.isnan(K.kd_loss(s, t, backend=backend, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", K.DIVERGENCES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_an_all_minus_inf_row_has_no_softmax(backend, divergence, side):
    s, t = torch.randn(N, V) * 3, torch.randn(N, V) * 3
    kw = dict(divergence=divergence, **kd_params(divergence), **_labels(divergence))
    clean = _kd(s, t, backend, **kw)
    if side == "student":
        s = _poison(s, -inf, where="row")
    else:
        t = _poison(t, -inf, where="row")
    _assert_only_bad_row_nan(*_kd(s, t, backend, **kw), *clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_label_term_alone_sees_the_student(backend):
    s, t = torch.randn(N, V), torch.randn(N, V)
    y = torch.randint(0, V, (N,))
    kw = dict(hard_label_weight=1.0, soft_label_weight=0.0)
    s2 = _poison(s, nan)
    loss, grad = _kd(s2, t, backend, labels=y, **kw)
    assert math.isnan(loss[BAD_ROW]) and torch.isnan(grad[BAD_ROW]).all()
    assert torch.isfinite(loss[torch.arange(N) != BAD_ROW]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_never_matter_whatever_they_hold(backend):
    s, t = torch.randn(N, V), torch.randn(N, V)
    y = torch.randint(0, V, (N,))
    y[BAD_ROW] = -100
    kw = dict(divergence="jsd", hard_label_weight=0.5, labels=y)
    clean = _kd(s, t, backend, **kw)
    for value in (nan, inf, -inf):
        got = _kd(_poison(s, value, "row"), _poison(t, value, "row"), backend, **kw)
        assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_is_a_mask_and_forward_kl_is_inf_where_the_student_masks_mass(backend):
    s, t = torch.randn(N, V), torch.randn(N, V)
    s[:, :3] = -inf
    t[:, :3] = -inf  # masked in both: contributes nothing, no NaN
    loss, grad = _kd(s, t, backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    s[BAD_ROW, 10] = -inf  # the student masks a class the teacher gives mass to
    loss, _ = _kd(s, t, backend)
    assert loss[BAD_ROW] == inf and torch.isfinite(loss[torch.arange(N) != BAD_ROW]).all()


# ------------------------------------------------------------------- the other losses


def test_fused_linear_nan_in_the_teacher_head_or_a_student_row():
    hs, ws = torch.randn(N, 8), torch.randn(V, 8)
    ht, wt = torch.randn(N, 6), torch.randn(V, 6)
    wt_bad = wt.clone()
    wt_bad[4, 2] = nan  # every row reads this column
    assert math.isnan(K.fused_linear_kd_loss(hs, ws, ht, wt_bad))
    hs_bad = _poison(hs, nan)
    out = K.fused_linear_kd_loss(hs_bad, ws, ht, wt, reduction="none")
    assert math.isnan(out[BAD_ROW]) and torch.isfinite(out[torch.arange(N) != BAD_ROW]).all()


@pytest.mark.parametrize("loss", ["kd", "topk"])
@pytest.mark.parametrize("value", [nan, math.inf])
def test_fused_linear_ignored_rows_hidden_states_never_matter(loss, value):
    """An ignored row's hidden state (student or teacher) never reaches a loss or any
    gradient: not the weight's (0·NaN in the GEMM), not the other rows' hidden states."""
    hs, ws = torch.randn(N, 8), torch.randn(V, 8)
    ht, wt = torch.randn(N, 6), torch.randn(V, 6)
    idx, vals = torch.randn(N, V).topk(5, -1).indices, torch.randn(N, 5) * 3
    y = torch.randint(0, V, (N,))
    y[BAD_ROW] = -100

    def run(h, h_t):
        h = h.clone().requires_grad_()
        w = ws.clone().requires_grad_()
        kw = dict(student_softcap=4.0)
        if loss == "kd":
            out = K.fused_linear_kd_loss(h, w, h_t, wt, y, **kw)
        else:
            out = K.fused_linear_topk_kd_loss(h, w, idx, vals, y, **kw)
        out.backward()
        return out.detach(), h.grad, w.grad

    clean = run(hs, ht)
    dirty = run(_poison(hs, value), _poison(ht, value))
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_plackett_luce_nan_anywhere_in_a_counted_row(side):
    s, t = torch.randn(N, V), torch.randn(N, V)
    if side == "student":
        s = _poison(s, nan)
    else:
        t = _poison(t, nan)
    s.requires_grad_(True)
    out = K.plackett_luce_loss(s, t, top_k=4, reduction="none")
    out.sum().backward()
    assert math.isnan(out[BAD_ROW]) and torch.isfinite(out[torch.arange(N) != BAD_ROW]).all()
    assert torch.isnan(s.grad[BAD_ROW]).all()


def _topk_inputs(k=6):
    s = torch.randn(N, V)
    idx = torch.stack([torch.randperm(V)[:k] for _ in range(N)])
    return s, idx, torch.randn(N, k)


@pytest.mark.parametrize("case", ["teacher_nan", "student_nan_selected", "teacher_all_minus_inf",
                                  "teacher_inf"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_kd_non_finite(case, divergence):
    s, idx, vals = _topk_inputs()
    if case == "teacher_nan":
        vals[BAD_ROW, 1] = nan
    elif case == "teacher_inf":
        vals[BAD_ROW, 1] = inf
    elif case == "teacher_all_minus_inf":
        vals[BAD_ROW] = -inf
    else:
        s[BAD_ROW, idx[BAD_ROW, 0]] = nan
    s.requires_grad_(True)
    out = K.topk_kd_loss(s, idx, vals, divergence=divergence, reduction="none")
    out.sum().backward()
    assert math.isnan(out[BAD_ROW]) and torch.isfinite(out[torch.arange(N) != BAD_ROW]).all()
    assert torch.isnan(s.grad[BAD_ROW]).all()
    assert torch.isfinite(s.grad[torch.arange(N) != BAD_ROW]).all()


def test_topk_kd_logprobs_nan_is_data_not_an_argument_error():
    s, idx, _ = _topk_inputs()
    lp = torch.log_softmax(torch.randn(N, V), -1).gather(1, idx)
    lp[BAD_ROW, 0] = nan
    out = K.topk_kd_loss(s, idx, lp, values="logprobs", tail="bucket", reduction="none")
    assert math.isnan(out[BAD_ROW])


def test_graph_masked_positions_never_matter_valid_ones_do():
    s, t = torch.randn(2, 4, V), torch.randn(2, 4, V)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False
    clean = K.graph_on_logits_loss(s, t, 3, mask=mask)
    s2 = s.clone()
    s2[0, 1, 7] = nan
    t2 = t.clone()
    t2[0, 1] = inf
    assert torch.equal(K.graph_on_logits_loss(s2, t2, 3, mask=mask), clean)
    s2[1, 2, 7] = nan  # a valid position
    assert math.isnan(K.graph_on_logits_loss(s2, t, 3, mask=mask))


def test_graph_nan_in_a_group_leaves_its_masked_positions_gradient_zero():
    s, t = torch.randn(2, 4, V), torch.randn(2, 4, V)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False
    s[0, 2, 5] = nan  # a valid position of the same group: the group's loss is NaN
    s = s.requires_grad_()
    out = K.graph_on_logits_loss(s, t, 3, mask=mask)
    out.backward()
    assert math.isnan(out)
    assert torch.equal(s.grad[0, 1], torch.zeros(V))


def test_sinkhorn_loss_nan_propagates():
    s, t = torch.randn(2, 3, V), torch.randn(2, 3, V)
    s[1, 0, 4] = nan
    assert math.isnan(K.sinkhorn_loss(s, t, n_iters=3))


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_topk_kd_ignored_row_nan_never_reaches_the_gradient(tail):
    s = torch.randn(4, V, dtype=torch.float64) * 3
    t = torch.randn(4, V, dtype=torch.float64)
    vals, idx = t.log_softmax(-1).topk(5, -1)
    unselected = [c for c in range(V) if c not in idx[1].tolist()][0]
    s[1, unselected] = nan  # an ignored row: at an unselected class and a selected one
    s[1, idx[1, 0]] = inf
    y = torch.tensor([1, -100, 2, 3])
    x = s.clone().requires_grad_()
    K.topk_kd_loss(x, idx, vals, y, values="logprobs", tail=tail).backward()
    assert torch.equal(x.grad[1], torch.zeros(V, dtype=torch.float64))
    assert torch.isfinite(x.grad).all()
