"""The fused linear losses over a vocabulary-parallel LM head (docs/vocab_parallel.md,
"The fused form") on 2 and 3 gloo ranks with uneven shards of V = 37, against the
single-process fused loss holding the whole head: the loss, the hidden-state gradient
(after the all-reduce, or summed by the test with reduce_hidden_grad=False) and the
gathered weight/bias gradients. One spawned job per world size runs every case; each
rank writes its measured errors to a file that the tests then check."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _helpers import run_ranks

import kdkernels as K
from kdkernels.parallel import count_bytes

V = 37
B, T = 3, 4  # leading shape of the hidden states: N = 12 rows
N = B * T
H_S, H_T = 8, 6


def _bounds(world: int) -> list[tuple[int, int]]:
    """Uneven shards of [0, V): 20 + 17 (2 ranks), 13 + 16 + 8 (3 ranks)."""
    cuts = {2: [0, 20, V], 3: [0, 13, 29, V]}[world]
    return [(cuts[i], cuts[i + 1]) for i in range(world)]


def _gather_rows(g: torch.Tensor, bounds) -> torch.Tensor:
    """The full [V, ...] tensor from every rank's [stop − start, ...] rows."""
    width = max(b - a for a, b in bounds)
    pad = torch.full((width,) + tuple(g.shape[1:]), float("nan"), dtype=g.dtype)
    pad[: g.shape[0]] = g
    parts = [torch.empty_like(pad) for _ in bounds]
    dist.all_gather(parts, pad)
    return torch.cat([p[: b - a] for p, (a, b) in zip(parts, bounds)], 0)


def _rel(x, ref) -> float:
    """max |x − ref| / max |ref| (NaN positions must agree; they count as equal)."""
    if x is None or ref is None:
        return 0.0 if x is None and ref is None else math.inf
    x, ref = x.detach(), ref.detach()
    if tuple(x.shape) != tuple(ref.shape) or not bool((x.isnan() == ref.isnan()).all()):
        return math.inf
    x, ref = (torch.nan_to_num(z.double(), nan=0.0) for z in (x, ref))
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _head(gen, dtype, std=1.0):
    """Replicated full tensors (the same on every rank: one generator seed)."""
    hs = torch.randn(B, T, H_S, generator=gen, dtype=torch.float64) * std
    ws = torch.randn(V, H_S, generator=gen, dtype=torch.float64)
    bs = torch.randn(V, generator=gen, dtype=torch.float64)
    ht = torch.randn(B, T, H_T, generator=gen, dtype=torch.float64) * std
    wt = torch.randn(V, H_T, generator=gen, dtype=torch.float64)
    bt = torch.randn(V, generator=gen, dtype=torch.float64)
    y = torch.randint(0, V, (B, T), generator=gen)
    y[0, 2] = y[2, 1] = -100
    hs[0, 2] = float("nan")  # an ignored row's hidden state reaches nothing
    up = torch.rand(B, T, generator=gen, dtype=torch.float64) + 0.5  # 'none' upstream
    return [z.to(dtype) if z.is_floating_point() else z for z in (hs, ws, bs, ht, wt, bt)] + [
        y, up]


def _run(fn, hs, ws, bs, teacher, y, up, kw, *, grad_w=True, bias=True):
    """Loss and gradients (hidden, weight, bias) of one call, backward included."""
    hs = hs.clone().requires_grad_()
    ws = ws.clone().requires_grad_(grad_w)
    bs = bs.clone().requires_grad_() if bias else None
    t_args, t_kw = teacher  # (ht, wt), {teacher_bias} or (idx, vals), {}
    loss = fn(hs, ws, *t_args, y, student_bias=bs, **t_kw, **kw)
    if kw.get("reduction") == "none":
        (loss * up.to(loss.dtype)).sum().backward()
    else:
        loss.backward()
    return loss, hs.grad, ws.grad, (bs.grad if bias else None)


def _kd_t(ht, wt, bt):
    return (ht, wt), {"teacher_bias": bt}


def _compare(rank, bounds, fn, full, local, y, up, kw, vp, worst, tag, **opts):
    """Run the single-process loss on `full` and the vocabulary-parallel one on `local`
    ((hs, ws, bs, teacher)); record the relative errors under `tag`."""
    ref = _run(fn, *full, y, up, kw, **opts)
    got = _run(fn, *local, y, up, dict(kw, vocab_parallel=vp), **opts)
    gw = _gather_rows(got[2], bounds) if got[2] is not None else None
    gb = _gather_rows(got[3], bounds) if got[3] is not None else None
    errs = [_rel(got[0], ref[0]), _rel(got[1], ref[1]), _rel(gw, ref[2]), _rel(gb, ref[3])]
    # every case's inputs are finite but for ignored rows' hidden states: all must stay
    # finite (else the NaN-tolerant comparison above would compare nothing)
    finite = bool(got[0].isfinite().all()) and bool(got[1].isfinite().all())
    errs = [e if finite else math.inf for e in errs]
    worst[tag] = [max(a, b) for a, b in zip(worst.get(tag, [0.0] * 4), errs)]
    return ref, got


def _kd_cases(rank, bounds, out):
    a, b = bounds[rank]
    vp = K.VocabParallel(a, b)
    fn = K.fused_linear_kd_loss
    gen = torch.Generator().manual_seed(11)
    configs = [  # (divergence, extra keywords, reduction, chunk_size)
        ("forward_kl", {}, "mean", 5),
        ("reverse_kl", dict(temperature=2.0, hard_label_weight=0.3), "sum", 5),
        ("jsd", dict(beta=0.3, student_softcap=3.0, teacher_softcap=4.0), "mean", 4),
        ("tvd", dict(student_logit_scale=1.7, teacher_logit_scale=0.6), "none", 5),
        ("taid", dict(taid_t=0.6, temperature=0.7, hard_label_weight=0.5,
                      soft_label_weight=0.8), "mean", None),
        ("skew_forward_kl", dict(alpha=0.2, student_softcap=2.0), "none", 7),
        ("skew_reverse_kl", dict(alpha=0.3, teacher_softcap=2.5, temperature=1.5), "sum", 3),
    ]
    worst: dict[str, list[float]] = {}
    for div, extra, red, chunk in configs:
        for dtype in (torch.float64, torch.float32):
            hs, ws, bs, ht, wt, bt, y, up = _head(gen, dtype, std=2.0)
            kw = dict(divergence=div, reduction=red, chunk_size=chunk, **extra)
            _compare(rank, bounds, fn, (hs, ws, bs, _kd_t(ht, wt, bt)),
                     (hs, ws[a:b], bs[a:b], _kd_t(ht, wt[a:b], bt[a:b])), y, up, kw, vp, worst,
                     "f64" if dtype == torch.float64 else "f32")
    # no bias, a frozen head (only the hidden gradient), no labels (so no NaN row either)
    hs, ws, bs, ht, wt, bt, y, up = _head(gen, torch.float64)
    hs = hs.nan_to_num(0.5)
    for opts in (dict(bias=False), dict(grad_w=False, bias=False)):
        _compare(rank, bounds, fn, (hs, ws, bs, _kd_t(ht, wt, None)),
                 (hs, ws[a:b], bs[a:b], _kd_t(ht, wt[a:b], None)), None, up,
                 dict(divergence="jsd", chunk_size=5), vp, worst, "f64", **opts)
    out["kd"] = worst


def _partial_hidden_cases(rank, bounds, out):
    """reduce_hidden_grad=False: each rank keeps its partial dZ_r W_r (not the full
    gradient), and their sum is the single-process one; the weight gradients are the
    same either way. The all-reduce costs N·H_s numbers, once per call."""
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(12)
    hs, ws, bs, ht, wt, bt, y, up = _head(gen, torch.float64)
    kw = dict(divergence="forward_kl", temperature=1.3, hard_label_weight=0.2, chunk_size=4)
    res = {}
    for red in ("mean", "none"):
        kw["reduction"] = red
        ref = _run(K.fused_linear_kd_loss, hs, ws, bs, _kd_t(ht, wt, bt), y, up, kw)
        vp = K.VocabParallel(a, b, reduce_hidden_grad=False)
        with count_bytes() as part_calls:
            got = _run(K.fused_linear_kd_loss, hs, ws[a:b], bs[a:b], _kd_t(ht, wt[a:b], bt[a:b]),
                       y, up, dict(kw, vocab_parallel=vp))
        with count_bytes() as full_calls:
            _run(K.fused_linear_kd_loss, hs, ws[a:b], bs[a:b], _kd_t(ht, wt[a:b], bt[a:b]), y, up,
                 dict(kw, vocab_parallel=K.VocabParallel(a, b)))
        summed = got[1].clone()
        dist.all_reduce(summed)
        res[red] = dict(
            loss=_rel(got[0], ref[0]), summed=_rel(summed, ref[1]),
            local_is_partial=_rel(got[1], ref[1]),
            weight=_rel(_gather_rows(got[2], bounds), ref[2]),
            extra_bytes=sum(full_calls) - sum(part_calls),
            extra_calls=len(full_calls) - len(part_calls))
    out["partial"] = res


def _topk_inputs(gen, k, logprobs, dtype):
    hs, ws, bs, ht, wt, bt, y, up = _head(gen, dtype, std=1.5)
    t = (hs.double().reshape(N, H_S) @ ws.double().t()) + torch.randn(N, V, generator=gen,
                                                                       dtype=torch.float64)
    idx = t.topk(k, -1).indices
    idx[4, k - 2:] = -1  # padding
    idx[5] = torch.arange(k)  # every index on rank 0
    idx[6] = torch.arange(V - k, V)  # every index on the last rank
    vals = torch.log_softmax(t, -1) if logprobs else t
    vals = vals.gather(1, idx.clamp_min(0)).to(dtype)
    return hs, ws, bs, idx.reshape(B, T, k), vals.reshape(B, T, k), y, up


def _topk_cases(rank, bounds, out):
    a, b = bounds[rank]
    vp = K.VocabParallel(a, b)
    fn = K.fused_linear_topk_kd_loss
    gen = torch.Generator().manual_seed(13)
    modes = [  # (values, tail, divergence, extra, reduction, k)
        ("logits", "renormalize", "forward_kl", dict(temperature=1.5), "mean", 5),
        ("logprobs", "renormalize", "jsd", dict(beta=0.3, student_softcap=2.5), "none", 6),
        ("logprobs", "bucket", "reverse_kl", {}, "sum", 7),
        ("logprobs", "bucket", "forward_kl", dict(student_logit_scale=0.8), "none", 5),
        ("logprobs", "bucket", "jsd", dict(beta=0.7, student_softcap=3.0), "mean", 4),
    ]
    worst: dict[str, list[float]] = {}
    for values, tail, div, extra, red, k in modes:
        for dtype in (torch.float64, torch.float32):
            hs, ws, bs, idx, vals, y, up = _topk_inputs(gen, k, values == "logprobs", dtype)
            kw = dict(values=values, tail=tail, divergence=div, reduction=red, chunk_size=5,
                      **extra)
            _compare(rank, bounds, fn, (hs, ws, bs, ((idx, vals), {})),
                     (hs, ws[a:b], bs[a:b], ((idx, vals), {})), y, up, kw, vp, worst,
                     "f64" if dtype == torch.float64 else "f32")
    # reduce_hidden_grad=False with the top-k loss: the ranks' partials sum to the reference
    hs, ws, bs, idx, vals, y, up = _topk_inputs(gen, 5, True, torch.float64)
    kw = dict(values="logprobs", tail="bucket", chunk_size=5)
    ref = _run(fn, hs, ws, bs, ((idx, vals), {}), y, up, kw)
    got = _run(fn, hs, ws[a:b], bs[a:b], ((idx, vals), {}), y, up,
               dict(kw, vocab_parallel=K.VocabParallel(a, b, reduce_hidden_grad=False)))
    summed = got[1].clone()
    dist.all_reduce(summed)
    worst["partial"] = [_rel(got[0], ref[0]), _rel(summed, ref[1]), _rel(got[1], ref[1])]
    out["topk"] = worst


def _error_cases(rank, bounds, out):
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(14)
    hs, ws, bs, ht, wt, bt, y, up = _head(gen, torch.float32)
    vp = K.VocabParallel(a, b)
    msgs = []
    for call in (
        lambda: K.fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b], vocab_parallel=vp,
                                       backend="triton"),
        lambda: K.fused_linear_topk_kd_loss(hs, ws[a:b], torch.zeros(B, T, 2, dtype=torch.long),
                                            torch.zeros(B, T, 2), vocab_parallel=vp,
                                            backend="cuda"),
        lambda: K.fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b - 1], vocab_parallel=vp),
        lambda: K.fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b], vocab_parallel=vp,  # differs
                                       chunk_size=4 + rank),
        lambda: K.fused_linear_kd_loss(hs.clone().requires_grad_(rank == 0), ws[a:b], ht,
                                       wt[a:b], vocab_parallel=vp),
        lambda: K.fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b], torch.full((B, T), V),
                                       hard_label_weight=0.1, vocab_parallel=vp),  # global V
    ):
        try:
            call()
            msgs.append(None)
        except (ValueError, K.BackendUnavailableError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    # the module forms take vocab_parallel like any keyword
    mod = K.FusedLinearKDLoss(divergence="reverse_kl", vocab_parallel=vp)
    got = mod(hs, ws[a:b], ht, wt[a:b], y, student_bias=bs[a:b], teacher_bias=bt[a:b])
    ref = K.fused_linear_kd_loss(hs, ws, ht, wt, y, student_bias=bs, teacher_bias=bt,
                                 divergence="reverse_kl")
    msgs.append(_rel(got, ref))
    idx = torch.stack([torch.randperm(V, generator=gen)[:4] for _ in range(N)]).reshape(B, T, 4)
    vals = torch.randn(B, T, 4, generator=gen)
    mod = K.FusedLinearTopKKDLoss(temperature=1.5, vocab_parallel=vp)
    got = mod(hs, ws[a:b], idx, vals, y)
    msgs.append(_rel(got, K.fused_linear_topk_kd_loss(hs, ws, idx, vals, y, temperature=1.5)))
    out["errors"] = msgs


@pytest.fixture(scope="module", params=[2, 3])
def results(request, tmp_path_factory):
    world = request.param
    cases = (_kd_cases, _partial_hidden_cases, _topk_cases, _error_cases)
    return run_ranks(cases, world, tmp_path_factory.mktemp("vpf"), _bounds(world))


def test_fused_kd_matches_single_process(results):
    for out in results:
        kd = out["kd"]
        # [loss, hidden grad (all-reduced), gathered weight grad, gathered bias grad]
        assert max(kd["f64"]) < 1e-11, kd
        assert max(kd["f32"]) < 1e-5, kd


def test_partial_hidden_gradient_sums_to_the_full_one(results):
    for out in results:
        for red, r in out["partial"].items():
            assert r["loss"] < 1e-12 and r["weight"] < 1e-11, (red, r)
            assert r["summed"] < 1e-11, (red, r)
            assert r["local_is_partial"] > 1e-3, (red, r)  # not already the full gradient
            # the default all-reduces grad_h [N, H_s] float64 once, in the pass that
            # computes it (forward for 'mean', the recomputing backward for 'none')
            assert r["extra_calls"] == 1 and r["extra_bytes"] == N * H_S * 8, (red, r)


def test_fused_topk_matches_single_process(results):
    for out in results:
        tk = out["topk"]
        assert max(tk["f64"]) < 1e-11, tk
        assert max(tk["f32"]) < 1e-5, tk
        loss, summed, local = tk["partial"]
        assert loss < 1e-12 and summed < 1e-11 and local > 1e-3, tk


def test_errors_are_raised_alike_on_every_rank(results):
    for out in results:
        e = out["errors"]
        assert "BackendUnavailableError" in e[0] and "backend='torch'" in e[0], e
        assert "BackendUnavailableError" in e[1] and "backend='torch'" in e[1], e
        assert "ValueError" in e[2] and "stop - start" in e[2], e
        assert "same chunk_size" in e[3], e
        assert "requires_grad" in e[4], e
        assert "labels must be in [0, 37)" in e[5], e
        assert e[6] < 1e-5 and e[7] < 1e-5, e


def test_reduce_hidden_grad_must_be_a_bool():
    assert K.VocabParallel(0, 3).reduce_hidden_grad is True
    with pytest.raises(TypeError, match="reduce_hidden_grad must be a bool"):
        K.VocabParallel(0, 3, reduce_hidden_grad=1)


def test_needs_a_process_group():
    if dist.is_initialized():  # pragma: no cover - the test process never initialises one
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        K.fused_linear_kd_loss(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 5),
                               torch.randn(3, 5), vocab_parallel=K.VocabParallel(0, 3))
