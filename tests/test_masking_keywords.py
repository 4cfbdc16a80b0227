"""The row-masking convention (docs/spec.md, "Masking rows": labels + ignore_index on every
loss over rows, mask= where no label is needed, both = AND) and the mixing keywords of the
top-k losses (hard_label_weight, soft_label_weight, divergence="taid").

Against the float64 oracles at std 5 and 30 spreads; ignored rows hold NaN, which must
never matter (loss and the other rows unchanged, their gradient exactly 0); recording()
shows which backend ran. Triton cases run under the interpreter on a CPU (conftest.py),
at small shapes. The vocabulary-parallel cases run on 2 gloo ranks in one spawned job.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.distributed as dist
from _helpers import rel_err, run_ranks

import kdkernels as K
from kdkernels._core.backend import BackendUnavailableError, recording, triton_interpreting
from kdkernels._core.codes import Div
from kdkernels.fused_linear.reference import fused_linear_topk_kd_loss_ref
from kdkernels.graph.reference import graph_on_logits_loss_ref
from kdkernels.pld.reference import plackett_luce_loss_ref
from kdkernels.sinkhorn.reference import sinkhorn_loss_ref
from kdkernels.topk.reference import topk_kd_loss_ref

IGNORE = -100
TRITON = triton_interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="needs a GPU or TRITON_INTERPRET=1")


def _grad(fn, s, *args, **kw):
    """(loss, ∂(0.7·loss)/∂s) with s a fresh leaf."""
    x = s.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    (g,) = torch.autograd.grad(out * 0.7, x)
    return out.detach(), g


def _backends(ran) -> set:
    return {be for _, be in ran}


# ------------------------------------------------------------------ the convention


def test_every_loss_takes_labels_and_ignore_index():
    """Every loss over rows takes labels + ignore_index; those that need no label also
    take mask= (PLD too: its label changes the ranking)."""
    losses = [K.kd_loss, K.topk_kd_loss, K.plackett_luce_loss, K.sinkhorn_loss,
              K.graph_on_logits_loss, K.fused_linear_kd_loss, K.fused_linear_topk_kd_loss]
    for fn in losses:
        params = inspect.signature(fn).parameters
        assert "labels" in params and params["ignore_index"].default == IGNORE, fn.__name__
    for fn in (K.sinkhorn_loss, K.graph_on_logits_loss, K.plackett_luce_loss):
        assert inspect.signature(fn).parameters["mask"].default is None, fn.__name__


# --------------------------------------------------------------------- sinkhorn_loss


def _sink_case(std, dtype=torch.float64, lead=(4,), b=6, v=11):
    """Logits [*lead, B, V], labels with ignored rows (problem 0 keeps all, problem 1
    none, problem 2 one row), ignored rows full of NaN, and an independent mask."""
    s = torch.randn(*lead, b, v, dtype=torch.float64) * std
    t = torch.randn(*lead, b, v, dtype=torch.float64) * std
    y = torch.randint(0, v, (*lead, b))
    y[torch.rand(*lead, b) < 0.3] = IGNORE
    flat = y.view(-1, b)
    flat[0] = torch.randint(0, v, (b,))
    flat[1] = IGNORE
    flat[2, 1:] = IGNORE
    s = s.masked_fill((y == IGNORE).unsqueeze(-1), float("nan")).to(dtype)
    mask = torch.rand(*lead, b) < 0.8
    mask.view(-1, b)[0] = True
    return s, t.to(dtype), y, mask


@pytest.mark.parametrize("std", [5.0, 30.0])
@pytest.mark.parametrize("cost, grad", [("l1", "unrolled"), ("sqeuclidean", "envelope"),
                                        ("l1", "envelope")])
def test_sinkhorn_ignored_rows_leave_the_problem(std, cost, grad):
    s, t, y, _ = _sink_case(std)
    kw = dict(cost=cost, grad=grad, n_iters=15, temperature=2.0)
    with recording() as ran:
        loss, g = _grad(K.sinkhorn_loss, s, t, y, **kw)
    assert ("sinkhorn_loss", "torch") in ran
    ref, g_ref = _grad(sinkhorn_loss_ref, s, t, y, **kw)
    ign = (y == IGNORE).unsqueeze(-1).expand_as(g)
    assert torch.isfinite(loss) and rel_err(loss, ref) <= 1e-6
    assert torch.all(g[ign] == 0) and torch.isfinite(g).all()
    assert rel_err(g[~ign], g_ref[~ign]) <= 1e-6
    # a problem keeping B' rows is the B'-row problem: what the rows left out held is
    # invisible (problem 2 keeps one row: a 1 × 1 plan)
    s2 = s.clone()
    s2[y == IGNORE] = 1e4
    assert torch.equal(K.sinkhorn_loss(s2, t, y, **kw), loss)


def test_sinkhorn_mask_labels_and_both():
    s, t, y, mask = _sink_case(8.0)
    keep = y != IGNORE
    s_clean = torch.where(keep.unsqueeze(-1), s, 0.0)
    kw = dict(n_iters=10)
    by_labels, g_l = _grad(K.sinkhorn_loss, s, t, y, **kw)
    by_mask, g_m = _grad(K.sinkhorn_loss, s, t, mask=keep, **kw)
    assert torch.equal(by_labels, by_mask) and torch.equal(g_l, g_m)
    # both: a row counts where both keep it (integer 0/1 masks too)
    both, g_b = _grad(K.sinkhorn_loss, s, t, y, mask=mask.int(), **kw)
    ref, g_ref = _grad(K.sinkhorn_loss, s, t, torch.where(mask, y, IGNORE), **kw)
    assert torch.equal(both, ref) and torch.equal(g_b, g_ref)
    oracle = sinkhorn_loss_ref(s_clean, t, y, mask=mask, **kw)
    assert rel_err(both, oracle) <= 1e-6
    # every row kept: the plain loss
    full = torch.randint(0, 11, y.shape)
    assert torch.equal(K.sinkhorn_loss(s_clean, t, full, **kw), K.sinkhorn_loss(s_clean, t, **kw))
    # module form
    mod = K.SinkhornLoss(n_iters=10)
    assert torch.equal(mod(s, t, y), by_labels)
    assert torch.equal(mod(s, t, mask=keep), by_labels)


def test_sinkhorn_nothing_kept_is_zero_with_zero_gradient():
    s, t, y, _ = _sink_case(30.0)
    loss, g = _grad(K.sinkhorn_loss, s, t, torch.full_like(y, IGNORE))
    assert loss == 0 and loss.dtype == torch.float32 and torch.all(g == 0)
    loss, g = _grad(K.sinkhorn_loss, s, t, mask=torch.zeros_like(y, dtype=torch.bool))
    assert loss == 0 and torch.all(g == 0)


def test_sinkhorn_masking_bad_input():
    s, t, y, mask = _sink_case(3.0)
    with pytest.raises(ValueError, match="labels"):
        K.sinkhorn_loss(s, t, y[:, :-1])
    with pytest.raises(ValueError, match="labels must be in"):
        K.sinkhorn_loss(s, t, torch.full_like(y, 11))
    with pytest.raises(ValueError, match="^mask must have shape"):
        K.sinkhorn_loss(s, t, mask=mask[:, :-1])
    with pytest.raises(TypeError, match="mask"):
        K.sinkhorn_loss(s, t, mask=mask.double())
    with pytest.raises(ValueError, match="integer mask must hold 0"):
        K.sinkhorn_loss(s, t, mask=mask.int() * 2)
    with pytest.raises(TypeError, match="ignore_index"):
        K.sinkhorn_loss(s, t, y, ignore_index=1.5)


@needs_triton
def test_sinkhorn_triton_selects_the_kept_rows():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, t, y, mask = _sink_case(30.0, torch.float32, lead=(3,), b=5, v=13)
    kw = dict(n_iters=8, cost="l1")
    with recording() as ran:
        loss, g = _grad(K.sinkhorn_loss, s.to(dev), t.to(dev), y.to(dev),
                        mask=mask.to(dev), backend="triton", **kw)
    assert ("sinkhorn_loss", "triton") in ran and "torch" not in {
        be for op, be in ran if op == "sinkhorn_loss"}
    keep = (y != IGNORE) & mask
    ref, g_ref = _grad(sinkhorn_loss_ref, s.double(), t.double(), y, mask=mask, **kw)
    g = g.cpu()
    assert rel_err(loss.cpu(), ref) <= 1e-4
    assert torch.all(g[~keep] == 0) and rel_err(g[keep], g_ref[keep]) <= 1e-4


# ------------------------------------------------------------- graph_on_logits_loss


def _graph_case(std, g=3, t_len=7, v=19):
    s = torch.randn(g, t_len, v, dtype=torch.float64) * std
    te = torch.randn(g, t_len, v + 4, dtype=torch.float64) * std
    y = torch.randint(0, v, (g, t_len))
    y[torch.rand(g, t_len) < 0.3] = IGNORE
    y[1] = IGNORE  # a group without a valid position
    s = s.masked_fill((y == IGNORE).unsqueeze(-1), float("nan"))
    te = te.masked_fill((y == IGNORE).unsqueeze(-1), float("inf"))
    return s, te, y


@pytest.mark.parametrize("std", [5.0, 30.0])
def test_graph_labels_mask_positions(std):
    s, te, y = _graph_case(std)
    keep = y != IGNORE
    with recording() as ran:
        loss, g = _grad(K.graph_on_logits_loss, s, te, 4, labels=y)
    assert _backends(ran) == {"torch"}
    by_mask, g_m = _grad(K.graph_on_logits_loss, s, te, 4, mask=keep)
    assert torch.equal(loss, by_mask) and torch.equal(g, g_m)
    clean = [torch.where(keep.unsqueeze(-1), x, 0.0) for x in (s, te)]
    ref, g_ref = _grad(graph_on_logits_loss_ref, clean[0], clean[1], 4, mask=keep)
    assert torch.isfinite(loss) and rel_err(loss, ref) <= 1e-6
    assert torch.all(g[~keep] == 0) and rel_err(g, g_ref) <= 1e-6


def test_graph_labels_and_mask_both_apply():
    s, te, y = _graph_case(8.0)
    mask = torch.rand(y.shape) < 0.7
    both, g_b = _grad(K.graph_on_logits_loss, s, te, 3, mask=mask, labels=y)
    ref, g_ref = _grad(K.graph_on_logits_loss, s, te, 3, mask=mask & (y != IGNORE))
    assert torch.equal(both, ref) and torch.equal(g_b, g_ref)
    mod = K.GraphOnLogitsLoss(3)
    assert torch.equal(mod(s, te, mask, labels=y), both)
    assert torch.equal(mod(s, te, labels=torch.where(mask, y, IGNORE)), both)
    y7 = torch.where(y == IGNORE, 7, y)
    out = K.graph_on_logits_loss(s.nan_to_num(), te.nan_to_num(), 3, labels=y7, ignore_index=7)
    assert torch.isfinite(out)
    with pytest.raises(ValueError, match="labels"):
        K.graph_on_logits_loss(s, te, 3, labels=y[:, :-1])


@needs_triton
def test_graph_triton_with_labels():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, te, y = _graph_case(30.0, g=2, t_len=5, v=23)
    s, te = s.float(), te.float()
    with recording() as ran:
        loss, g = _grad(K.graph_on_logits_loss, s.to(dev), te.to(dev), 3, labels=y.to(dev),
                        backend="triton")
    assert ("graph_on_logits_loss", "triton") in ran
    keep = y != IGNORE
    clean = [torch.where(keep.unsqueeze(-1), x.double(), 0.0) for x in (s, te)]
    ref, g_ref = _grad(graph_on_logits_loss_ref, clean[0], clean[1], 3, mask=keep)
    g = g.cpu()
    assert rel_err(loss.cpu(), ref) <= 1e-4
    assert torch.all(g[~keep] == 0) and rel_err(g, g_ref) <= 1e-4


# ---------------------------------------------------------------- plackett_luce_loss


def _pld_case(std, n=10, v=17):
    s = torch.randn(n, v, dtype=torch.float64) * std
    t = torch.randn(n, v, dtype=torch.float64) * std
    t[0] = torch.randint(-2, 2, (v,)).double()  # ties at the top of the teacher order
    mask = torch.rand(n) < 0.7
    mask[0] = True
    s = s.masked_fill(~mask.unsqueeze(-1), float("nan"))
    t = t.masked_fill(~mask.unsqueeze(-1), float("nan"))
    return s, t, mask


@pytest.mark.parametrize("std", [5.0, 30.0])
@pytest.mark.parametrize("top_k", [None, 4])
def test_pld_mask_without_labels_keeps_the_teacher_order(std, top_k):
    s, t, mask = _pld_case(std)
    kw = dict(top_k=top_k, temperature=1.5)
    with recording() as ran:
        rows = K.plackett_luce_loss(s, t, mask=mask, reduction="none", **kw)
        loss, g = _grad(K.plackett_luce_loss, s, t, mask=mask, **kw)
    assert _backends(ran) == {"torch"}
    ref_rows = plackett_luce_loss_ref(s[mask], t[mask], reduction="none", **kw)
    ref, g_ref = _grad(plackett_luce_loss_ref, s[mask], t[mask], **kw)
    assert torch.all(rows[~mask] == 0) and rel_err(rows[mask], ref_rows) <= 1e-6
    assert rel_err(loss, ref) <= 1e-6  # the mean over kept rows
    assert torch.all(g[~mask] == 0) and rel_err(g[mask], g_ref) <= 1e-6
    # every row kept: the same bits as no mask (the tied teacher row included)
    clean_s, clean_t = s.nan_to_num(), t.nan_to_num()
    full = torch.ones_like(mask)
    assert torch.equal(K.plackett_luce_loss(clean_s, clean_t, mask=full, reduction="none"),
                       K.plackett_luce_loss(clean_s, clean_t, reduction="none"))


def test_pld_labels_and_mask_both_apply():
    s, t, mask = _pld_case(8.0)
    y = torch.randint(0, 17, (10,))
    y[3] = IGNORE
    both, g_b = _grad(K.plackett_luce_loss, s, t, y, mask=mask)
    ref, g_ref = _grad(K.plackett_luce_loss, s, t, torch.where(mask, y, IGNORE))
    assert torch.equal(both, ref) and torch.equal(g_b, g_ref)
    mod = K.PlackettLuceLoss(top_k=5)
    assert torch.equal(mod(s, t, y, mask=mask),
                       K.plackett_luce_loss(s, t, y, mask=mask, top_k=5))
    with pytest.raises(ValueError, match="mask"):
        K.plackett_luce_loss(s, t, mask=mask[:-1])


@needs_triton
def test_pld_triton_with_mask():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, t, mask = _pld_case(30.0, n=6, v=13)
    s, t = s.float(), t.float()
    with recording() as ran:
        loss, g = _grad(K.plackett_luce_loss, s.to(dev), t.to(dev), mask=mask.to(dev),
                        backend="triton", top_k=5)
    assert ("plackett_luce_loss", "triton") in ran
    ref, g_ref = _grad(plackett_luce_loss_ref, s[mask].double(), t[mask].double(), top_k=5)
    g = g.cpu()
    assert rel_err(loss.cpu(), ref) <= 1e-5
    assert torch.all(g[~mask] == 0) and rel_err(g[mask], g_ref) <= 1e-5


# ------------------------------------------- fused_linear_topk_kd_loss: mixing keywords


def _fused_case(std, n=12, h=8, v=29, k=5):
    hs = torch.randn(n, h, dtype=torch.float64)
    w = torch.randn(v, h, dtype=torch.float64) * (std / math.sqrt(h))
    t = torch.randn(n, v, dtype=torch.float64) * std
    idx = torch.rand(n, v).argsort(-1)[:, :k]
    vals = torch.log_softmax(t, -1).gather(-1, idx)
    y = torch.randint(0, v, (n,))
    y[torch.rand(n) < 0.3] = IGNORE
    hs = hs.masked_fill((y == IGNORE).unsqueeze(-1), float("nan"))
    return hs, w, idx, vals, y


@pytest.mark.parametrize("std", [5.0, 30.0])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("mix", [dict(divergence="taid", taid_t=0.4, hard_label_weight=0.8),
                                 dict(soft_label_weight=0.0, hard_label_weight=1.0)])
def test_fused_topk_hard_label_and_taid(std, tail, mix):
    hs, w, idx, vals, y = _fused_case(std)
    kw = dict(values="logprobs", tail=tail, chunk_size=5, **mix)
    backends = ["torch"] + (["triton"] if TRITON and not torch.cuda.is_available() else [])
    ref_w = w.clone().requires_grad_()
    ref_kw = {k: val for k, val in kw.items() if k != "chunk_size"}  # (the fused loss's own)
    ref = fused_linear_topk_kd_loss_ref(hs.nan_to_num(), ref_w, idx, vals, y, **ref_kw)
    (g_ref,) = torch.autograd.grad(ref, ref_w)
    for be in backends:
        ww = w.clone().requires_grad_()
        with recording() as ran:
            loss = K.fused_linear_topk_kd_loss(hs, ww, idx, vals, y, backend=be, **kw)
            (g,) = torch.autograd.grad(loss, ww)
        assert ("topk_kd_loss", be) in ran
        assert rel_err(loss.detach(), ref.detach()) <= 1e-6 and rel_err(g, g_ref) <= 1e-6, be


def test_cuda_verifier_is_told_the_new_options():
    """The cuda top-k kernel has no TAID and no hard label: the facts the dispatch tables
    hand its verifier (topk_kd_loss's and, through its step, the fused loss's) say so."""
    from kdkernels.topk.cuda import unsupported_reason
    from kdkernels.topk.function import prepare_topk_args, topk_facts

    hs, w, idx, vals, y = _fused_case(3.0)
    a = prepare_topk_args((12,), 29, torch.device("cpu"), idx, vals, y, values="logprobs",
                          tail="bucket", divergence="taid", beta=0.5, temperature=1.0,
                          ignore_index=IGNORE, reduction="mean", normalizer=None, taid_t=0.3,
                          hard_label_weight=0.5)
    facts = topk_facts(torch.float32, a)
    assert "taid" in unsupported_reason(**facts)
    assert "hard_label_weight" in unsupported_reason(**{**facts, "div": int(Div.FWD_KL)})


# ------------------------------------------------ vocabulary-parallel topk_kd_loss

V, N, KK = 23, 8, 5
BOUNDS = [(0, 13), (13, V)]
VP_MIXES = {
    "taid+hard": dict(divergence="taid", taid_t=0.6, hard_label_weight=0.9),
    "fwd+hard": dict(hard_label_weight=1.7, soft_label_weight=0.4),
    "hard only": dict(divergence="jsd", beta=0.3, hard_label_weight=1.0,
                      soft_label_weight=0.0),
}


def _gather_cols(g):
    width = max(b - a for a, b in BOUNDS)
    pad = torch.full((g.shape[0], width), float("nan"), dtype=g.dtype)
    pad[:, : g.shape[1]] = g
    parts = [torch.empty_like(pad) for _ in BOUNDS]
    dist.all_gather(parts, pad)
    return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, BOUNDS)], 1)


def _vp_inputs(gen, std, values):
    """Student logits at spread std; the teacher's too for logits, at most 3 for log-probs
    (the bucket: a teacher whose k entries hold all but 1e-16 of its mass leaves a tail
    1 − Σp that the float64 oracle cannot resolve)."""
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t_std = std if values == "logits" else min(std, 3.0)
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * t_std
    idx = torch.stack([torch.randperm(V, generator=gen)[:KK] for _ in range(N)])
    idx[1] = torch.randperm(V - 13, generator=gen)[:KK] + 13  # all on rank 1
    idx[3, -2:] = -1
    vals = (torch.log_softmax(t, 1) if values == "logprobs" else t).gather(1, idx.clamp_min(0))
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = s[2].argmax()  # the label is the row's (unique) argmax: softmax_y − 1 ≈ 0
    y[4] = IGNORE  # ignored, with a NaN on rank 1
    s[4, 20] = float("nan")
    return s, idx, vals, y


def _vp_cases(rank, out):
    a, b = BOUNDS[rank]
    vp = K.VocabParallel(a, b)
    gen = torch.Generator().manual_seed(5)
    worst = {}
    for name, mix in VP_MIXES.items():
        for values, tail in (("logits", "renormalize"), ("logprobs", "bucket")):
            for std in (5.0, 30.0):
                s, idx, vals, y = _vp_inputs(gen, std, values)
                kw = dict(values=values, tail=tail, reduction="none",
                          temperature=1.5 if values == "logits" else 1.0, **mix)
                full = s.clone().requires_grad_()
                ref = topk_kd_loss_ref(full, idx, vals, y, **kw)
                ref.sum().backward()
                loc = s[:, a:b].clone().requires_grad_()
                with recording() as ran:
                    got = K.topk_kd_loss(loc, idx, vals, y, vocab_parallel=vp, **kw)
                    got.sum().backward()
                assert {be for _, be in ran} == {"torch"}
                grad = _gather_cols(loc.grad)
                rows = [r for r in range(N) if r != 4]
                for key, val in ((f"{name} loss", rel_err(got[rows], ref[rows])),
                                 (f"{name} grad", rel_err(grad[rows], full.grad[rows]))):
                    worst[key] = max(worst.get(key, 0.0), val)
                worst["ignored"] = max(worst.get("ignored", 0.0), float(got[4].abs()),
                                       float(grad[4].abs().max()))
    # the fused form on this rank's head rows: hard label and TAID through the same launcher
    hs = torch.randn(N, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(V, 6, generator=gen, dtype=torch.float64) * 4
    s, idx, vals, y = _vp_inputs(gen, 3.0, "logprobs")
    kw = dict(values="logprobs", tail="bucket", divergence="taid", taid_t=0.5,
              hard_label_weight=0.8, chunk_size=3)
    full = w.clone().requires_grad_()
    ref = fused_linear_topk_kd_loss_ref(hs, full, idx, vals, y, **{
        k_: v_ for k_, v_ in kw.items() if k_ != "chunk_size"})
    ref.backward()
    loc = w[a:b].clone().requires_grad_()
    got = K.fused_linear_topk_kd_loss(hs, loc, idx, vals, y, vocab_parallel=vp, **kw)
    got.backward()
    worst["fused loss"] = rel_err(got.detach(), ref.detach())
    worst["fused grad"] = rel_err(loc.grad, full.grad[a:b])
    # TAID on the triton two-phase launcher (its O(k) entry math is the torch path's)
    if TRITON:
        import kdkernels.topk.parallel_triton as pt

        launcher, calls = pt.topk_kd_fwd_vocab_parallel_triton, []

        def spy(*args, **kwargs):
            calls.append(1)
            return launcher(*args, **kwargs)

        pt.topk_kd_fwd_vocab_parallel_triton = spy
        try:
            for values, tail in (("logits", "renormalize"), ("logprobs", "bucket")):
                s, idx, vals, y = _vp_inputs(gen, 30.0, values)
                kw = dict(values=values, tail=tail, reduction="sum", divergence="taid",
                          taid_t=0.35, soft_label_weight=1.5)
                full = s.float().double().clone().requires_grad_()
                ref = topk_kd_loss_ref(full, idx, vals, y, **kw)
                ref.backward()
                loc = s.float()[:, a:b].clone().requires_grad_()
                got = K.topk_kd_loss(loc, idx, vals, y, vocab_parallel=vp, backend="triton",
                                     **kw)
                got.backward()
                grad = _gather_cols(loc.grad.double())
                rows = [r for r in range(N) if r != 4]
                worst["triton taid loss"] = max(worst.get("triton taid loss", 0.0),
                                                rel_err(got.double(), ref))
                worst["triton taid grad"] = max(worst.get("triton taid grad", 0.0),
                                                rel_err(grad[rows], full.grad[rows]))
        finally:
            pt.topk_kd_fwd_vocab_parallel_triton = launcher
        worst["triton ran"] = len(calls)
    # refused before any of the loss's work: every rank alike
    s, idx, vals, y = _vp_inputs(gen, 3.0, "logits")
    try:
        K.topk_kd_loss(s[:, a:b], idx, vals, y, vocab_parallel=vp, backend="triton",
                       hard_label_weight=1.0)
        worst["refused"] = ""
    except BackendUnavailableError as e:
        worst["refused"] = str(e)
    out["vp"] = worst


@pytest.fixture(scope="module")
def vp_results(tmp_path_factory):
    return run_ranks((_vp_cases,), len(BOUNDS), tmp_path_factory.mktemp("masking_vp"))


def test_vocab_parallel_hard_label_and_taid_match_the_oracle(vp_results):
    for out in vp_results:
        got = out["vp"]
        for name in VP_MIXES:
            assert got[f"{name} loss"] <= 1e-6, (name, got)
            assert got[f"{name} grad"] <= 1e-9, (name, got)
        assert got["ignored"] == 0.0
        assert got["fused loss"] <= 1e-6 and got["fused grad"] <= 1e-9, got
        if TRITON:
            assert got["triton ran"] == 2
            assert got["triton taid loss"] <= 1e-5 and got["triton taid grad"] <= 1e-5, got
        assert "hard_label_weight" in got["refused"] and "torch" in got["refused"]
