"""Vocabulary-parallel kd_loss and topk_kd_loss (docs/vocab_parallel.md) on 2 and 3 gloo
ranks with uneven shards, against the single-process path: every case runs inside one
spawned job per world size (process start-up dominates on small machines); each rank
writes its measured errors to a file that the test then checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _helpers import kd_params, run_ranks

import kdkernels as K
from kdkernels.parallel import count_bytes

V = 37
N = 12
DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "taid"]


def _bounds(world: int) -> list[tuple[int, int]]:
    """Uneven shards of [0, V): 37 = 20 + 17 (2 ranks), 13 + 16 + 8 (3 ranks)."""
    cuts = {2: [0, 20, V], 3: [0, 13, 29, V]}[world]
    return [(cuts[i], cuts[i + 1]) for i in range(world)]


def _gather_cols(g: torch.Tensor, bounds) -> torch.Tensor:
    """The full [N, V] tensor from every rank's [N, stop − start] columns."""
    width = max(b - a for a, b in bounds)
    pad = torch.full((g.shape[0], width), float("nan"), dtype=g.dtype)
    pad[:, : g.shape[1]] = g
    parts = [torch.empty_like(pad) for _ in bounds]
    dist.all_gather(parts, pad)
    return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, bounds)], 1)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x − ref| / max |ref| (NaN positions must agree; they count as equal)."""
    same_nan = torch.isnan(x) == torch.isnan(ref)
    if not bool(same_nan.all()):
        return math.inf
    x, ref = (torch.nan_to_num(z.detach().double(), nan=0.0) for z in (x, ref))
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _row_rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst row's ‖x − ref‖ / ‖ref‖ (rows whose reference is 0 must be 0)."""
    x, ref = x.detach().double(), ref.detach().double()
    err, size = (x - ref).norm(dim=-1), ref.norm(dim=-1)
    return float(torch.where(size > 0, err / size.clamp_min(1e-300), err * 1e300).max())


def _inputs(std: float, dtype, gen):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t[:4] = s[:4] + torch.randn(4, V, generator=gen, dtype=torch.float64)  # same peaks
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = y[7] = -100
    y[5] = s[5].argmax()  # the label at the student's argmax (softmax_y − 1 cancels there)
    return s.to(dtype), t.to(dtype), y


def _kd_cases(rank, bounds, out):
    """Every divergence, τ ≠ 1, hard-label mixing, ignored rows, reductions; float64
    inputs against the float64 single-process path (tight), float32 against float32."""
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(1)
    configs = [  # (τ, hard_w, soft_w, std, reduction, dtype)
        (1.0, 0.0, 1.0, 3.0, "mean", torch.float64),
        (2.0, 0.3, 1.0, 30.0, "sum", torch.float64),
        (0.7, 0.5, 0.8, 10.0, "none", torch.float64),
        (1.0, 0.4, 1.0, 30.0, "mean", torch.float64),
        (1.5, 0.2, 1.0, 5.0, "mean", torch.float32),
    ]
    worst = {"f64_loss": 0.0, "f64_grad": 0.0, "f64_grad_row": 0.0,
             "f32_loss": 0.0, "f32_grad": 0.0}
    for div in DIVS:
        for tau, hw, sw, std, red, dtype in configs:
            s, t, y = _inputs(std, dtype, gen)
            kw = dict(divergence=div, **kd_params(div), temperature=tau,
                      hard_label_weight=hw, soft_label_weight=sw, reduction=red)
            full = s.clone().requires_grad_()
            ref = K.kd_loss(full, t, y, **kw)
            ref.sum().backward()
            loc = s[:, a:b].clone().requires_grad_()
            got = K.kd_loss(loc, t[:, a:b], y, vocab_parallel=K.VocabParallel(a, b), **kw)
            got.sum().backward()
            assert got.dtype == torch.float32 and loc.grad.dtype == dtype
            grad = _gather_cols(loc.grad, bounds)
            tag = "f64" if dtype == torch.float64 else "f32"
            worst[f"{tag}_loss"] = max(worst[f"{tag}_loss"], _rel(got, ref))
            worst[f"{tag}_grad"] = max(worst[f"{tag}_grad"], _rel(grad, full.grad))
            if dtype == torch.float64:
                worst["f64_grad_row"] = max(worst["f64_grad_row"], _row_rel(grad, full.grad))
    out["kd"] = worst


def _nonfinite_cases(rank, bounds, out):
    """A NaN / +inf on one rank makes the row NaN on every rank; ignored rows stay 0."""
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(2)
    res = {}
    for div in ("forward_kl", "jsd", "tvd"):
        s, t, y = _inputs(4.0, torch.float32, gen)
        s[3, bounds[-1][0] + 1] = float("nan")  # on the last rank
        t[6, 0] = float("inf")  # on rank 0
        s[2, bounds[-1][0]] = float("nan")  # row 2 is ignored
        loc = s[:, a:b].clone().requires_grad_()
        got = K.kd_loss(loc, t[:, a:b], y, divergence=div, hard_label_weight=0.2,
                        reduction="none", vocab_parallel=K.VocabParallel(a, b))
        got.sum().backward()
        full = s.clone().requires_grad_()
        ref = K.kd_loss(full, t, y, divergence=div, hard_label_weight=0.2, reduction="none")
        ref.sum().backward()
        g = loc.grad
        res[div] = dict(
            loss_nan=[bool(got[3].isnan()), bool(got[6].isnan())],
            grad_nan=[bool(g[3].isnan().all()), bool(g[6].isnan().all())],
            ignored_zero=bool(got[2] == 0) and bool((g[2] == 0).all()),
            others_finite=bool(got[[0, 1, 4, 5, 8, 9, 10, 11]].isfinite().all()),
            loss_err=_rel(got, ref), grad_err=_rel(g, full.grad[:, a:b]))
    out["nonfinite"] = res


def _topk_inputs(gen, std, k, logprobs, dtype=torch.float64):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t[:3] = s[:3] + torch.randn(3, V, generator=gen, dtype=torch.float64) * 0.5
    idx = t.topk(k, -1).indices
    idx[4, k - 2:] = -1  # padding
    idx[5] = torch.arange(k)  # every index on rank 0
    idx[6] = torch.arange(V - k, V)  # every index on the last rank
    vals = torch.log_softmax(t, -1) if logprobs else t
    vals = vals.gather(1, idx.clamp_min(0))
    y = torch.randint(0, V, (N,), generator=gen)
    y[8] = -100
    return s.to(dtype), idx, vals.to(dtype), y


def _topk_cases(rank, bounds, out):
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(3)
    modes = [("logits", "renormalize", 1.5), ("logprobs", "renormalize", 1.0),
             ("logprobs", "bucket", 1.0)]
    worst = {"loss": 0.0, "grad": 0.0, "grad_row": 0.0, "f32_loss": 0.0, "f32_grad": 0.0}
    for div in ("forward_kl", "reverse_kl", "jsd"):
        for values, tail, tau in modes:
            for std, k, dtype in ((2.0, 5, torch.float64), (30.0, 7, torch.float64),
                                  (5.0, 6, torch.float32)):
                s, idx, vals, y = _topk_inputs(gen, std, k, values == "logprobs", dtype)
                kw = dict(values=values, tail=tail, divergence=div, beta=0.3,
                          temperature=tau, reduction="sum")
                full = s.clone().requires_grad_()
                ref = K.topk_kd_loss(full, idx, vals, y, **kw)
                ref.backward()
                loc = s[:, a:b].clone().requires_grad_()
                got = K.topk_kd_loss(loc, idx, vals, y, vocab_parallel=K.VocabParallel(a, b),
                                     **kw)
                got.backward()
                grad = _gather_cols(loc.grad, bounds)
                pre = "f32_" if dtype == torch.float32 else ""
                worst[pre + "loss"] = max(worst[pre + "loss"], _rel(got, ref))
                worst[pre + "grad"] = max(worst[pre + "grad"], _rel(grad, full.grad))
                if not pre:
                    worst["grad_row"] = max(worst["grad_row"], _row_rel(grad, full.grad))
    # a NaN in a student logit on the last rank: NaN on every rank (bucket reads the row)
    s, idx, vals, y = _topk_inputs(gen, 3.0, 4, True)
    s[1, V - 1] = float("nan")
    idx[1, 0] = V - 1
    nan_rows = []
    for tail in ("renormalize", "bucket"):
        loc = s[:, a:b].clone().requires_grad_()
        got = K.topk_kd_loss(loc, idx, vals, y, values="logprobs", tail=tail, reduction="none",
                             vocab_parallel=K.VocabParallel(a, b))
        got.sum().backward()
        nan_rows.append([bool(got[1].isnan()), bool(loc.grad[1].isnan().all()),
                         bool(got[[0, 2, 3]].isfinite().all())])
    worst["nan_rows"] = nan_rows
    out["topk"] = worst


def _dtensor_cases(rank, bounds, out):
    """DTensor logits sharded on the vocabulary dim (torch's own uneven split), and
    replicated ones: the loss is a plain tensor, the gradient a DTensor alike."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    world = len(bounds)
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(4)
    s, t, y = _inputs(8.0, torch.float64, gen)
    res = {}
    for name, placement in (("shard", Shard(-1)), ("replicate", Replicate())):
        ds = distribute_tensor(s.clone(), mesh, [placement]).requires_grad_()
        dt = distribute_tensor(t.clone(), mesh, [placement])
        got = K.kd_loss(ds, dt, y, divergence="jsd", temperature=1.3, hard_label_weight=0.2)
        got.backward()
        full = s.clone().requires_grad_()
        ref = K.kd_loss(full, t, y, divergence="jsd", temperature=1.3, hard_label_weight=0.2)
        ref.backward()
        grad = ds.grad
        res[name] = dict(plain=not isinstance(got, DTensor),
                         grad_dtensor=isinstance(grad, DTensor),
                         placements=str(tuple(grad.placements)) if isinstance(grad, DTensor)
                         else None,
                         loss_err=_rel(got, ref),
                         grad_err=_rel(grad.full_tensor() if isinstance(grad, DTensor)
                                       else grad, full.grad))
    # topk_kd_loss with a sharded DTensor student and plain (replicated) teacher tensors
    s2, idx, vals, y2 = _topk_inputs(gen, 6.0, 5, True)
    ds = distribute_tensor(s2.clone(), mesh, [Shard(1)]).requires_grad_()
    got = K.topk_kd_loss(ds, idx, vals, y2, values="logprobs", tail="bucket")
    got.backward()
    full = s2.clone().requires_grad_()
    ref = K.topk_kd_loss(full, idx, vals, y2, values="logprobs", tail="bucket")
    ref.backward()
    res["topk"] = dict(loss_err=_rel(got, ref), grad_err=_rel(ds.grad.full_tensor(), full.grad))
    out["dtensor"] = res


def _bytes_cases(rank, bounds, out):
    """Bytes all-reduced per step: O(N), the same at V = 1000 and V = 100000."""
    world = len(bounds)
    n = 8
    res = {}
    for v in (1000, 100_000):
        cuts = [i * v // world for i in range(world)] + [v]
        cuts[1] += 1  # uneven
        a, b = cuts[rank], cuts[rank + 1]
        vp = K.VocabParallel(a, b)
        s = torch.randn(n, b - a).requires_grad_()
        t = torch.randn(n, b - a)
        y = torch.randint(0, v, (n,))
        idx = torch.stack([torch.randperm(v)[:16] for _ in range(n)])
        vals = torch.log_softmax(torch.randn(n, 16), -1) - 3.0
        with count_bytes() as kd_calls:
            K.kd_loss(s, t, y, temperature=2.0, hard_label_weight=0.1,
                      vocab_parallel=vp).backward()
        s.grad = None
        with count_bytes() as bk_calls:
            K.topk_kd_loss(s, idx, vals, y, values="logprobs", tail="bucket",
                           vocab_parallel=vp).backward()
        with count_bytes() as rn_calls:
            K.topk_kd_loss(s, idx, vals, y, values="logprobs", vocab_parallel=vp)
        res[str(v)] = [sum(kd_calls), sum(bk_calls), sum(rn_calls)]
    out["bytes"] = res


def _error_cases(rank, bounds, out):
    a, b = bounds[rank]
    s, t = torch.randn(3, b - a), torch.randn(3, b - a)
    msgs = []
    for call in (
        lambda: K.kd_loss(s, t, vocab_parallel=K.VocabParallel(a, b + 1)),  # width
        lambda: K.kd_loss(s, t, vocab_parallel=K.VocabParallel(a, b), backend="cuda"),
        lambda: K.kd_loss(s, t, vocab_parallel=K.VocabParallel(a + 1, b + 1)),  # a gap
        lambda: K.kd_loss(s[: 2 + (rank == 0)], t[: 2 + (rank == 0)],  # row counts differ
                          vocab_parallel=K.VocabParallel(a, b)),
        lambda: K.kd_loss(s, t, torch.tensor([0, V, 1]),  # labels are global: V is out
                          vocab_parallel=K.VocabParallel(a, b)),
    ):
        try:
            call()
            msgs.append(None)
        except (ValueError, K.BackendUnavailableError) as e:
            msgs.append(f"{type(e).__name__}: {e}")
    # the module form takes vocab_parallel like any keyword
    mod = K.KDLoss(divergence="reverse_kl", vocab_parallel=K.VocabParallel(a, b))
    gen = torch.Generator().manual_seed(5)  # the same full tensors on every rank
    sf, tf = torch.randn(4, V, generator=gen) * 4, torch.randn(4, V, generator=gen) * 4
    lv = mod(sf[:, a:b], tf[:, a:b])
    msgs.append(_rel(lv, K.kd_loss(sf, tf, divergence="reverse_kl")))
    out["errors"] = msgs


@pytest.fixture(scope="module", params=[2, 3])
def results(request, tmp_path_factory):
    world = request.param
    cases = (_kd_cases, _nonfinite_cases, _topk_cases, _dtensor_cases, _bytes_cases,
             _error_cases)
    return run_ranks(cases, world, tmp_path_factory.mktemp("vp"), _bounds(world))


def test_kd_loss_matches_single_process(results):
    for out in results:
        kd = out["kd"]
        assert kd["f64_loss"] < 1e-12 and kd["f64_grad"] < 1e-12, kd
        # every row's gradient, including rows whose whole gradient is ~1e-13 (std 30,
        # same peaks): the pivot's closed forms keep them to float64 rounding
        assert kd["f64_grad_row"] < 1e-8, kd
        assert kd["f32_loss"] < 2e-6 and kd["f32_grad"] < 2e-6, kd


def test_nonfinite_on_one_rank_is_nan_everywhere(results):
    for out in results:
        for div, r in out["nonfinite"].items():
            assert r["loss_nan"] == [True, True] and r["grad_nan"] == [True, True], (div, r)
            assert r["ignored_zero"] and r["others_finite"], (div, r)
            assert r["loss_err"] < 2e-6 and r["grad_err"] < 2e-6, (div, r)


def test_topk_kd_loss_matches_single_process(results):
    for out in results:
        tk = out["topk"]
        assert tk["loss"] < 1e-12 and tk["grad"] < 1e-12 and tk["grad_row"] < 1e-8, tk
        assert tk["f32_loss"] < 2e-6 and tk["f32_grad"] < 2e-6, tk
        assert tk["nan_rows"] == [[True, True, True]] * 2, tk


def test_dtensor_inputs(results):
    for out in results:
        d = out["dtensor"]
        assert d["shard"]["plain"] and d["shard"]["grad_dtensor"], d
        assert "Shard(dim=1)" in d["shard"]["placements"], d
        assert d["replicate"]["plain"] and d["replicate"]["grad_dtensor"], d
        for case in (d["shard"], d["replicate"], d["topk"]):
            assert case["loss_err"] < 1e-12 and case["grad_err"] < 1e-12, d


def test_bytes_are_independent_of_the_vocabulary(results):
    n, k = 8, 16
    for out in results:
        b = out["bytes"]
        assert b["1000"] == b["100000"], b
        # kd: MAX of 3 maxima + a flag, SUM of 3 sums + 3 counts, SUM of 4 partials
        # (float64); bucket: MAX [n, 2], SUM [n, k + 1]; renormalize: SUM [n, k]
        assert b["1000"] == [n * 8 * (4 + 6 + 4), n * 8 * (2 + k + 1), n * 8 * k], b


def test_errors_are_raised_alike_on_every_rank(results):
    for out in results:
        e = out["errors"]
        assert "ValueError" in e[0] and "stop - start" in e[0], e
        assert "BackendUnavailableError" in e[1] and "backend='cuda'" in e[1], e
        assert "needs CUDA tensors" in e[1], e  # (CPU tensors; the kernels: CUDA only)
        assert "partition [0, V)" in e[2], e
        assert "same rows" in e[3], e
        assert "labels must be in [0, 37)" in e[4], e
        assert e[5] < 1e-6, e


def test_local_checks_need_no_process_group():
    with pytest.raises(ValueError, match="0 <= start < stop"):
        K.VocabParallel(5, 3)
    with pytest.raises(TypeError, match="must be an int"):
        K.VocabParallel(0, 2.0)
    if dist.is_initialized():  # pragma: no cover - the test process never initialises one
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        K.kd_loss(torch.randn(2, 3), torch.randn(2, 3), vocab_parallel=K.VocabParallel(0, 3))
    with pytest.raises(ValueError, match="needs torch.distributed to be initialised"):
        K.topk_kd_loss(torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long),
                       torch.zeros(2, 1), vocab_parallel=K.VocabParallel(0, 3))

