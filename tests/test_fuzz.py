"""Property-based fuzzing of every public op against the float64 oracles and the
non-finite policy (docs/spec.md): random shapes (N = 0, V = 1, odd V), dtypes, spreads
up to std 30, -inf masks, NaN / inf injections, ignored rows and every keyword.

Profiles (KDKERNELS_FUZZ, see ENVS.md): `ci` (default: a fixed, small number of examples
per test, derandomized so CI is reproducible) and `slow` (many random examples). The
example database (.hypothesis/) is not committed.
"""

from __future__ import annotations

import math
import os

import torch
from _helpers import kd_params
from fuzz_cases import (
    INJECTIONS,
    LOWP,
    SPREADS,
    assert_close_rows,
    assert_policy,
    inject,
    labels_for,
    logits,
    mask_both,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdkernels as K
from kdkernels.fused_linear.reference import fused_linear_kd_loss_ref
from kdkernels.graph.reference import graph_on_logits_loss_ref
from kdkernels.kd.params import ZERO, canonical
from kdkernels.kd.reference import kd_loss_ref
from kdkernels.pld.reference import plackett_luce_loss_ref
from kdkernels.select.reference import topk_select_ref
from kdkernels.sinkhorn.reference import sinkhorn_loss_ref
from kdkernels.topk.reference import topk_kd_loss_ref

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("slow", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("KDKERNELS_FUZZ", "ci"))

F32, F64 = torch.float32, torch.float64
DTYPES = st.sampled_from([F32, F32, F64, torch.bfloat16, torch.float16])
BACKENDS = st.sampled_from(["torch", "torch", "triton"])  # triton: the interpreter on CPU


def _gen(draw):
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def _run(fn, x, go, *args, **kw):
    """(output, gradient of ⟨output, go⟩ w.r.t. x)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kw)
    if not out.requires_grad:  # an oracle whose value does not depend on x (e.g. N = 0)
        return out.detach(), torch.zeros_like(x)
    out.backward(go.to(out.dtype))
    return out.detach(), x.grad


def _reduction(draw, labelled=True):
    reduction = draw(st.sampled_from(["none", "sum", "mean"]))
    normalizer = None
    if reduction == "mean" and labelled:
        normalizer = draw(st.sampled_from([None, 7.0, "tensor"]))
        normalizer = torch.tensor(5.0) if normalizer == "tensor" else normalizer
    return dict(reduction=reduction, normalizer=normalizer)


def _upstream(gen, n, reduction):
    return torch.randn(n, generator=gen) if reduction == "none" else torch.tensor(-0.7)


@given(st.data())
def test_kd_loss(data):
    draw = data.draw
    gen = _gen(draw)
    n, v = draw(st.integers(0, 6)), draw(st.sampled_from([1, 2, 3, 8, 37, 101]))
    extra = draw(st.sampled_from([0, 0, 3]))  # a wider teacher: vocab_mismatch="truncate"
    dtype, backend = draw(DTYPES), draw(BACKENDS)
    std = draw(st.sampled_from(SPREADS))
    divergence = draw(st.sampled_from(K.DIVERGENCES))
    kw = dict(
        divergence=divergence,
        **kd_params(divergence, beta=draw(st.sampled_from([0.0, 0.3, 1.0])),
                    alpha=draw(st.sampled_from([0.0, 0.2, 1.0])),
                    taid_t=draw(st.sampled_from([0.0, 0.6, 1.0]))),
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
        hard_label_weight=draw(st.sampled_from([0.0, 0.3])),
        soft_label_weight=draw(st.sampled_from([1.0, 0.5, 0.0])),
        vocab_mismatch="truncate" if extra else "error", **_reduction(draw))
    s = logits(gen, n, v, std)
    t = logits(gen, n, v + extra, std) + torch.randn(n, 1, generator=gen, dtype=F64)
    s, t = mask_both(gen, s, t, draw(st.sampled_from([0.0, 0.25])))
    use_labels = (kw["hard_label_weight"] > 0 or divergence in ("dkd", "nkd")
                  or draw(st.booleans()))
    y = labels_for(gen, s, 0.3) if use_labels else None
    s, t = s.to(dtype), t.to(dtype)
    go = _upstream(gen, n, kw["reduction"])

    out, grad = _run(K.kd_loss, s, go, t, y, backend=backend, **kw)
    ref, ref_grad = _run(kd_loss_ref, s.double(), go.double(), t.double(), y, **kw)
    low = low_grad = None
    if dtype in LOWP:
        low, low_grad = _run(kd_loss_ref, s, go, t, y, compute_dtype=dtype, **kw)
    scale = (s.double().abs().nan_to_num(posinf=0).max().item() if s.numel() else 0) / 0.5
    assert out.dtype == F32 and grad.dtype == dtype
    assert_close_rows(out, ref, dtype, scale, low)
    assert_close_rows(grad, ref_grad, dtype, scale, low_grad)

    kind = draw(st.sampled_from(INJECTIONS))
    row = draw(st.integers(0, max(n - 1, 0)))
    s2, t2, hit = inject(s, t, kind, row, v // 2)
    if hit is None:
        return
    teacher_read = canonical(kw["divergence"], beta=kw.get("beta", 0.5),
                             alpha=kw.get("alpha", 0.1), taid_t=kw.get("taid_t"),
                             temperature=kw["temperature"],
                             soft_w=kw["soft_label_weight"], hard_w=kw["hard_label_weight"],
                             ignore_index=-100).div != ZERO
    ignored = y is not None and y[row] == -100
    read = hit.endswith("_s") or teacher_read
    rows_kw = dict(kw, reduction="none", normalizer=None)
    go_rows = torch.ones(n)
    clean = _run(K.kd_loss, s, go_rows, t, y, backend=backend, **rows_kw)
    bad = _run(K.kd_loss, s2, go_rows, t2, y, backend=backend, **rows_kw)
    assert_policy(*bad, *clean, ignored=ignored, read=read, bad_row=row)
    reduced = K.kd_loss(s2, t2, y, backend=backend, **kw)
    if kw["reduction"] != "none":
        assert math.isnan(reduced) == (read and not ignored)


@given(st.data())
def test_fused_linear_kd_loss(data):
    draw = data.draw
    gen = _gen(draw)
    n, v, h = draw(st.integers(0, 9)), draw(st.sampled_from([1, 5, 33])), draw(st.integers(1, 9))
    dtype, backend = draw(st.sampled_from([F32, F64])), draw(BACKENDS)
    std = draw(st.sampled_from(SPREADS))
    divergence = draw(st.sampled_from(K.DIVERGENCES))
    kw = dict(divergence=divergence, **kd_params(divergence),
              temperature=draw(st.sampled_from([0.5, 1.0])),
              student_softcap=draw(st.sampled_from([None, 5.0])),
              teacher_logit_scale=draw(st.sampled_from([1.0, 0.5])),
              **_reduction(draw, False))
    chunk = draw(st.sampled_from([None, 2, 4]))
    if divergence in ("dkd", "nkd"):  # they read the row's label
        kw["labels"] = labels_for(gen, torch.zeros(n, v), 0.0)
    hs = logits(gen, n, h, std ** 0.5).to(dtype)
    ws, ht = logits(gen, v, h, 1.0).to(dtype), logits(gen, n, 3, std ** 0.5).to(dtype)
    wt = logits(gen, v, 3, 1.0).to(dtype)
    go = _upstream(gen, n, kw["reduction"])
    out, grad = _run(K.fused_linear_kd_loss, hs, go, ws, ht, wt, backend=backend,
                     chunk_size=chunk, **kw)
    ref, ref_grad = _run(lambda x, *a, **k: fused_linear_kd_loss_ref(x, *a, **k), hs.double(),
                         go.double(), ws.double(), ht.double(), wt.double(), **kw)
    scale = 4 * std + 10
    assert_close_rows(out, ref, dtype, scale)
    assert_close_rows(grad, ref_grad, dtype, scale)
    if n and draw(st.booleans()):  # a NaN in one student row: that row's loss only
        hs2 = hs.clone()
        hs2[n // 2, 0] = math.nan
        rows = K.fused_linear_kd_loss(hs2, ws, ht, wt, backend=backend,
                                      **dict(kw, reduction="none", normalizer=None))
        assert math.isnan(rows[n // 2]) and torch.isfinite(rows[torch.arange(n) != n // 2]).all()


@given(st.data())
def test_plackett_luce_loss(data):
    draw = data.draw
    gen = _gen(draw)
    n, v = draw(st.integers(0, 4)), draw(st.sampled_from([1, 2, 5, 13]))
    dtype = draw(st.sampled_from([F32, F64, torch.bfloat16]))
    std = draw(st.sampled_from(SPREADS))
    kw = dict(temperature=draw(st.sampled_from([0.5, 1.0, 3.0])),
              top_k=draw(st.sampled_from([None, 1, v])), **_reduction(draw))
    s, t = logits(gen, n, v, std), logits(gen, n, v, std)
    t = t.round() if draw(st.booleans()) else t  # ties in the teacher's ranking
    s, t = mask_both(gen, s, t, draw(st.sampled_from([0.0, 0.25])))
    y = labels_for(gen, s, 0.3) if draw(st.booleans()) else None
    s, t = s.to(dtype), t.to(dtype)
    go = _upstream(gen, n, kw["reduction"])
    out, grad = _run(K.plackett_luce_loss, s, go, t, y, **kw)
    ref, ref_grad = _run(plackett_luce_loss_ref, s.double(), go.double(), t.double(), y, **kw)
    low = low_grad = None
    if dtype in LOWP:
        low, low_grad = _run(plackett_luce_loss_ref, s, go, t, y, compute_dtype=dtype, **kw)
    scale = 2 * std
    assert_close_rows(out, ref, dtype, scale, low)
    assert_close_rows(grad, ref_grad, dtype, scale, low_grad)


@given(st.data())
def test_topk_kd_loss(data):
    draw = data.draw
    gen = _gen(draw)
    n, v = draw(st.integers(0, 5)), draw(st.sampled_from([1, 4, 17, 40]))
    k = draw(st.integers(1, v))
    mode = draw(st.sampled_from(["logits", "renormalize", "bucket"]))
    std = draw(st.sampled_from(SPREADS))
    kw = dict(divergence=draw(st.sampled_from(["forward_kl", "reverse_kl", "jsd"])),
              beta=draw(st.sampled_from([0.0, 0.4, 1.0])), **_reduction(draw))
    # bucket: the teacher's tail mass 1 − Σ exp(values) must be resolvable from rounded
    # log-probabilities (at std 30 it is below their rounding: the tail is then 0 and a
    # reverse KL +inf, an ill-posed comparison), so its teacher spread stays moderate
    s = logits(gen, n, v, std)
    full_t = logits(gen, n, v, min(std, 5.0) if mode == "bucket" else std)
    idx = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]) if n else \
        torch.zeros(0, k, dtype=torch.long)
    if n and draw(st.booleans()):
        idx[:, -1] = -1  # padding
    if mode == "logits":
        vals = full_t.gather(1, idx.clamp_min(0))
        kw.update(values="logits", temperature=draw(st.sampled_from([0.5, 1.0, 2.0])))
    else:
        vals = torch.log_softmax(full_t, -1).gather(1, idx.clamp_min(0))
        kw.update(values="logprobs", tail=mode)
    y = labels_for(gen, s, 0.3) if draw(st.booleans()) else None
    dtype = draw(st.sampled_from([F32, F64]))
    s = s.to(dtype)
    go = _upstream(gen, n, kw["reduction"])
    out, grad = _run(K.topk_kd_loss, s, go, idx, vals, y, **kw)
    ref, ref_grad = _run(topk_kd_loss_ref, s.double(), go.double(), idx, vals, y, **kw)
    assert_close_rows(out, ref, dtype, 2 * std)
    assert_close_rows(grad, ref_grad, dtype, 2 * std)


@given(st.data())
def test_sinkhorn_loss(data):
    draw = data.draw
    gen = _gen(draw)
    m, b, v = draw(st.integers(0, 2)), draw(st.integers(1, 4)), draw(st.sampled_from([1, 3, 19]))
    std = draw(st.sampled_from(SPREADS[:3]))
    kw = dict(temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
              cost=draw(st.sampled_from(["l1", "sqeuclidean"])),
              epsilon=draw(st.sampled_from([0.05, 0.5])), n_iters=draw(st.integers(1, 6)))
    s = logits(gen, m * b, v, std).reshape(m, b, v)
    t = logits(gen, m * b, v, std).reshape(m, b, v)
    go = torch.tensor(1.3)
    out, grad = _run(K.sinkhorn_loss, s, go, t, grad="unrolled", **kw)
    ref, ref_grad = _run(sinkhorn_loss_ref, s, go.double(), t, **kw)
    assert_close_rows(out, ref, F64, 1.0)
    assert_close_rows(grad, ref_grad, F64, 1.0)


@given(st.data())
def test_graph_on_logits_loss(data):
    draw = data.draw
    gen = _gen(draw)
    g, t_len = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    v_s, v_t = draw(st.sampled_from([2, 7, 23])), draw(st.sampled_from([2, 7, 23]))
    k = draw(st.integers(1, min(v_s, v_t)))
    std = draw(st.sampled_from(SPREADS[:3]))
    s = logits(gen, g * t_len, v_s, std).reshape(g, t_len, v_s)
    t = logits(gen, g * t_len, v_t, std).reshape(g, t_len, v_t)
    mask = torch.rand(g, t_len, generator=gen) < 0.7 if draw(st.booleans()) else None
    temp = draw(st.sampled_from([0.5, 1.0]))
    out, grad = _run(K.graph_on_logits_loss, s, torch.tensor(1.0), t, k, temperature=temp,
                     mask=mask)
    ref, ref_grad = _run(graph_on_logits_loss_ref, s, torch.tensor(1.0, dtype=F64), t, k,
                         temperature=temp, mask=mask)
    assert_close_rows(out, ref, F64, 1.0)
    assert_close_rows(grad, ref_grad, F64, 1.0)
    if mask is not None and not mask.all():  # masked positions never matter
        s2 = s.clone()
        s2[~mask] = math.nan
        assert torch.equal(K.graph_on_logits_loss(s2, t, k, temperature=temp, mask=mask), out)


@given(st.data())
def test_topk_select(data):
    draw = data.draw
    gen = _gen(draw)
    n, v = draw(st.integers(0, 5)), draw(st.integers(1, 300))
    k = draw(st.integers(1, min(v, 256)))
    dtype = draw(st.sampled_from([F32, torch.float16, torch.bfloat16]))
    x = torch.randint(-3, 4, (n, v), generator=gen).to(dtype)  # ties
    if n and draw(st.booleans()):
        x[0, v // 2] = math.nan
        x[-1, 0] = -0.0
    backend = draw(st.sampled_from(["torch", "triton"]))
    vals, idx = K.topk_select(x, k, backend=backend)
    ref_vals, ref_idx = topk_select_ref(x, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(vals.isnan(), ref_vals.isnan())
    assert torch.equal(vals.nan_to_num(), ref_vals.nan_to_num())
