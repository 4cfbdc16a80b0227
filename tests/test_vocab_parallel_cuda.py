"""The CUDA backend of vocabulary-parallel kd_loss and topk_kd_loss
(kdkernels/kd/parallel_cuda.py, kdkernels/topk/parallel_cuda.py) against the
single-process torch path: every divergence, temperatures, hard labels, ignored rows,
reductions, float32 / bf16 / float64 students (and a student and teacher of different
dtypes), std-30 spreads with q_{j*} rounding to 1, a NaN / +inf on one rank, top-k
indices spread over the ranks and all on one, padding, both tails; and the same
collectives (tensors, bytes) as the torch path. The fused losses' vocabulary-parallel
loop on backend='cuda' (kdkernels/fused_linear/parallel.py: those launchers per chunk,
the cuda softcap and rescale kernels) against the single-process torch fused loss, and
what it refuses (float64 heads, the top-k options the launcher lacks).

The same case functions run three ways:

- **Without a GPU** (CI): on 2 gloo ranks (uneven shards) through the public functions,
  with a fake `kdkernels_cuda` module that emulates each kernel's contract in torch, in
  the kernels' compute dtype (float32 for 16/32-bit students, float64 for float64),
  reading and writing the launchers' buffers through the raw pointers, strides and sizes
  they pass (`FakeModule` in tests/vp_cuda_harness.py). That checks the Python side —
  argument plumbing, buffer shapes and columns, the glue between the phases, the
  collectives and their bytes, autograd (the backward's `scale_rows` through the cuda
  backend, `recording()`) — against the float64 torch paths and a 100-digit oracle; the
  kernels' own arithmetic runs only on a GPU.
- **On one GPU, 2 shards** (the real kernels): 2 ranks cannot share one GPU over NCCL,
  and gloo does not reduce CUDA tensors reliably, so the two shards run as two threads
  of this process whose all-reduces meet in a thread barrier (`ThreadGroup`: MAX / SUM
  of the two ranks' tensors, on the device, in place). Only the collective and the
  group check (`check_vocab_parallel`'s all-gather) are replaced; the launchers, kernels,
  autograd and the public functions run as in a job. The harness itself is checked
  without a GPU on the fake module (`test_threaded_harness_on_the_fake_module`).
- **On one GPU, a real process group**: 1 NCCL rank holding the whole vocabulary (the
  launchers' collectives through torch.distributed; no cross-shard cases), with the
  profiler proving the `kdk::kd_vp_*` / `kdk::topk_vp_*` kernels launched; and 2 NCCL
  ranks on 2 GPUs when the machine has them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from _helpers import kd_params, run_ranks, spawn_ranks
from vp_cuda_harness import fake_extension, run_threads

import kdkernels as K
from kdkernels._core import backend as B

V = 37
N = 10
BOUNDS = [(0, 20), (20, V)]  # uneven shards
DIVS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "taid"]
TOPK_DIVS = ["forward_kl", "reverse_kl", "jsd"]
TOPK_MODES = [("logits", "renormalize"), ("logprobs", "renormalize"), ("logprobs", "bucket")]
KK = 6
_NAN = float("nan")

# --------------------------------------------------------------- the cases


def _gather_cols(g, bounds, gather):
    """The full [N, V] gradient from every rank's columns."""
    width = max(b - a for a, b in bounds)
    pad = torch.full((g.shape[0], width), _NAN, dtype=g.dtype, device=g.device)
    pad[:, : g.shape[1]] = g
    parts = gather(pad)
    return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, bounds)], 1)


def _rel(x, ref) -> float:
    """max |x − ref| / max |ref|; NaN positions must agree."""
    x, ref = x.detach().cpu(), ref.detach().cpu()
    if not bool((torch.isnan(x) == torch.isnan(ref)).all()):
        return math.inf
    x, ref = (torch.nan_to_num(z.double(), nan=0.0) for z in (x, ref))
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def _row_rel(x, ref) -> float:
    """The worst row's ‖x − ref‖ / ‖ref‖ (NaN rows dropped; zero rows must be zero)."""
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    keep = ~torch.isnan(ref).any(-1)
    x, ref = x[keep], ref[keep]
    err, size = (x - ref).norm(dim=-1), ref.norm(dim=-1)
    return float(torch.where(size > 0, err / size.clamp_min(1e-300), err * 1e300).max())


def _kd_inputs(std: float, gen):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    s[1, 27] = s[1].max() + 3 * std  # q_{j*} rounds to 1 (on rank 1)
    t[:3] = s[:3] + torch.randn(3, V, generator=gen, dtype=torch.float64)  # same peaks
    s[6, 3] = s[6, 25] = s[6].max() + 1.0  # the row max tied across the two ranks
    s[3, 25:30] = -math.inf  # masked columns on rank 1 (finite teacher there)
    t[4, 5:9] = s[4, 5:9] = -math.inf  # masked in both, on rank 0
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = y[7] = -100
    y[5] = s[5].argmax()  # the label at the student's argmax
    y[4] = 0
    return s, t, y


def _oracle_grad(s, t, y, div: str) -> torch.Tensor:
    """∂(mean over the valid rows of D_n)/∂s at τ = 1, in 100-digit arithmetic (mpmath):
    q − p (forward KL), q − r (TAID, r = softmax((1−λ)s + λt)), else q(g − Σ q g) with
    g = ∂D/∂q from the definitions. The torch path itself is not enough here: its float64
    softplus is cut at 20 (jsd, skew reverse KL: 2e-9 absolute in g)."""
    import mpmath as mp

    w = {"jsd": 0.3, "skew_forward_kl": 0.2, "skew_reverse_kl": 0.2, "taid": 0.6}.get(div, 0)
    valid = y != -100
    out = torch.zeros(s.shape, dtype=torch.float64)
    with mp.workdps(100):  # 1 − q_{j*} ≈ 1e-52 in row 1
        w = mp.mpf(w)

        def softmax(x):
            top = max(v for v in x)
            e = [mp.exp(v - top) if v != -mp.inf else mp.mpf(0) for v in x]
            z = sum(e)
            return [v / z for v in e]

        def log_ratio(x, m):
            return mp.log(x) - mp.log(m)

        for r in range(s.shape[0]):
            if not valid[r]:
                continue
            a = [mp.mpf(float(v)) for v in s[r]]
            b = [mp.mpf(float(v)) for v in t[r]]
            q, p = softmax(a), softmax(b)
            if div == "forward_kl":
                g_row = [qi - pi for qi, pi in zip(q, p)]
            elif div == "taid":
                rr = softmax([(1 - w) * ai + w * bi for ai, bi in zip(a, b)])
                g_row = [qi - ri for qi, ri in zip(q, rr)]
            else:
                g = []
                for qi, pi in zip(q, p):
                    if qi == 0:
                        g.append(mp.mpf(0))
                    elif div == "reverse_kl":
                        g.append(log_ratio(qi, pi) + 1)
                    elif div == "jsd":
                        g.append((1 - w) * log_ratio(qi, w * pi + (1 - w) * qi))
                    elif div == "skew_forward_kl":
                        g.append(-pi * (1 - w) / (w * pi + (1 - w) * qi))
                    elif div == "skew_reverse_kl":
                        m = (1 - w) * pi + w * qi
                        g.append(log_ratio(qi, m) + 1 - w * qi / m)
                    else:  # tvd
                        g.append(mp.sign(qi - pi) / 2)
                g_bar = sum(qi * gi for qi, gi in zip(q, g))
                g_row = [qi * (gi - g_bar) for qi, gi in zip(q, g)]
            out[r] = torch.tensor([float(v) for v in g_row], dtype=torch.float64)
    return out / valid.sum()


def _ranks(ctx):
    """(rank, bounds, device, gather): gather(x) -> every rank's x, in rank order."""
    return ctx["rank"], ctx["bounds"], torch.device(ctx["device"]), ctx["gather"]


def _vp(ctx):
    rank, bounds = ctx["rank"], ctx["bounds"]
    return K.VocabParallel(*bounds[rank], group=ctx.get("group"))


def _kd_cases(ctx, out):
    """Every divergence × (τ, hard, soft, std, reduction, dtypes) against the single-process
    torch path, and the float64 rows against the torch vocabulary-parallel path."""
    rank, bounds, dev, gather = _ranks(ctx)
    a, b = bounds[rank]
    vp = _vp(ctx)
    gen = torch.Generator().manual_seed(11)
    configs = [  # (τ, hard_w, soft_w, std, reduction, student dtype, teacher dtype)
        (1.0, 0.0, 1.0, 3.0, "mean", torch.float32, torch.float32),
        (2.0, 0.3, 1.0, 30.0, "sum", torch.float32, torch.float32),
        (0.7, 0.5, 0.8, 6.0, "none", torch.float32, torch.float32),
        (1.0, 0.4, 1.0, 4.0, "mean", torch.bfloat16, torch.bfloat16),
        (2.0, 0.2, 1.0, 5.0, "sum", torch.float32, torch.bfloat16),  # one copy to float32
        (1.5, 0.2, 1.0, 30.0, "sum", torch.float64, torch.float64),
        (1.0, 0.0, 1.0, 40.0, "mean", torch.float64, torch.float64),  # q_{j*} ≈ 1
    ]
    worst: dict[str, float] = {}
    recorded = True
    for div in DIVS:
        for tau, hw, sw, std, red, sdt, tdt in configs:
            s, t, y = _kd_inputs(std, gen)
            s, t = s.to(sdt), t.to(tdt)
            kw = dict(divergence=div, **kd_params(div), temperature=tau,
                      hard_label_weight=hw, soft_label_weight=sw, reduction=red)
            ref_s = s.double() if sdt == torch.bfloat16 else s  # bf16: same values, exact
            full = ref_s.clone().requires_grad_()
            ref = K.kd_loss(full, t.to(ref_s.dtype), y, backend="torch", **kw)
            ref.sum().backward()
            loc = s[:, a:b].to(dev).clone().requires_grad_()
            with B.recording() as calls:
                got = K.kd_loss(loc, t[:, a:b].to(dev), y.to(dev), vocab_parallel=vp,
                                backend="cuda", **kw)
                got.sum().backward()
            recorded &= ("scale_rows", "cuda") in calls
            assert got.dtype == torch.float32 and loc.grad.dtype == sdt
            grad = _gather_cols(loc.grad, bounds, gather)
            tag = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float64: "f64"}[sdt]
            if tdt != sdt:
                tag = "mixed"
            for key, val in ((f"{tag}_loss", _rel(got, ref)),
                             (f"{tag}_grad", _rel(grad, full.grad)),
                             (f"{tag}_grad_row", _row_rel(grad, full.grad))):
                worst[key] = max(worst.get(key, 0.0), val)
            if std == 40.0 and rank == 0:  # (τ = 1, no hard label, mean)
                val = _row_rel(grad, _oracle_grad(s, t, y, div))
                worst["f64_oracle_row"] = max(worst.get("f64_oracle_row", 0.0), val)
            if sdt == torch.float64:  # the torch vocabulary-parallel path: same forms
                loc2 = s[:, a:b].to(dev).clone().requires_grad_()
                K.kd_loss(loc2, t[:, a:b].to(dev), y.to(dev), vocab_parallel=vp,
                          backend="torch", **kw).sum().backward()
                val = _row_rel(grad, _gather_cols(loc2.grad, bounds, gather))
                worst["f64_vp_row"] = max(worst.get("f64_vp_row", 0.0), val)
            if red == "none":
                worst["ignored_loss"] = max(worst.get("ignored_loss", 0.0),
                                            float(got.detach()[[2, 7]].abs().max()))
            worst["ignored_grad"] = max(worst.get("ignored_grad", 0.0),
                                        float(grad[[2, 7]].abs().max()))
    out["kd"] = worst
    out["kd_recorded_cuda"] = recorded


def _kd_nonfinite_cases(ctx, out):
    """A NaN / +inf on one rank makes the row NaN everywhere; ignored rows stay 0."""
    rank, bounds, dev, gather = _ranks(ctx)
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(12)
    res = {}
    for div in ("forward_kl", "reverse_kl", "jsd", "tvd", "taid"):
        s, t, y = _kd_inputs(4.0, gen)
        s, t = s.float(), t.float()
        s[3, 30] = _NAN  # on the last rank
        t[6, 1] = math.inf  # on the first rank
        s[2, 25] = _NAN  # row 2 is ignored
        s[8] = -math.inf  # no finite entry on any rank
        y[8] = 3
        kw = dict(divergence=div, **kd_params(div, taid_t=0.4), hard_label_weight=0.2,
                  reduction="none")
        loc = s[:, a:b].to(dev).clone().requires_grad_()
        got = K.kd_loss(loc, t[:, a:b].to(dev), y.to(dev), vocab_parallel=_vp(ctx),
                        backend="cuda", **kw)
        got.sum().backward()
        full = s.clone().requires_grad_()
        ref = K.kd_loss(full, t, y, backend="torch", **kw)
        ref.sum().backward()
        g = _gather_cols(loc.grad, bounds, gather)
        rows = [0, 1, 4, 5, 9]
        res[div] = dict(
            loss_nan=[bool(got[r].isnan()) for r in (3, 6, 8)],
            grad_nan=[bool(g[r].isnan().all()) for r in (3, 6, 8)],
            ignored_zero=bool(got[2] == 0) and bool((g[2] == 0).all()),
            others_finite=bool(got[rows].isfinite().all()) and bool(g[rows].isfinite().all()),
            loss_err=_rel(got, ref), grad_err=_rel(g, full.grad))
    out["kd_nonfinite"] = res


def _topk_inputs(std: float, gen, values: str, bounds):
    s = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    t = torch.randn(N, V, generator=gen, dtype=torch.float64) * std
    cut = bounds[0][1]
    idx = torch.stack([torch.randperm(V, generator=gen)[:KK] for _ in range(N)])
    if len(bounds) > 1:
        idx[1] = torch.randperm(V - cut, generator=gen)[:KK] + cut  # all on the last rank
        idx[2] = torch.randperm(cut, generator=gen)[:KK]  # all on the first rank
        idx[8] = torch.tensor([0, cut, V - 1, cut - 1, -1, -1])  # shard edges
    idx[3, -2:] = -1  # padding
    s[7, idx[7, 0]] = s[7].max() + 60.0  # one selected entry holds nearly all the mass
    vals = t.gather(1, idx.clamp_min(0))
    if values == "logprobs":
        vals = torch.log_softmax(t, 1).gather(1, idx.clamp_min(0))
    y = torch.randint(0, V, (N,), generator=gen)
    y[4] = -100  # ignored, with a NaN
    s[4, V - 7] = _NAN
    return s, idx, vals, y


def _topk_cases(ctx, out):
    rank, bounds, dev, gather = _ranks(ctx)
    a, b = bounds[rank]
    vp = _vp(ctx)
    gen = torch.Generator().manual_seed(21)
    worst: dict[str, float] = {}
    recorded = True
    for div in TOPK_DIVS:
        for values, tail in TOPK_MODES:
            for dtype, std in ((torch.float64, 30.0), (torch.float32, 3.0),
                               (torch.bfloat16, 3.0)):
                s, idx, vals, y = _topk_inputs(std, gen, values, bounds)
                tau = 2.0 if values == "logits" else 1.0
                kw = dict(values=values, tail=tail, divergence=div,
                          **({"beta": 0.3} if div == "jsd" else {}), temperature=tau,
                          reduction="none")
                s = s.to(dtype)
                vals = vals.float() if dtype == torch.bfloat16 else vals.to(dtype)
                full = (s.double() if dtype == torch.bfloat16 else s).clone().requires_grad_()
                ref = K.topk_kd_loss(full, idx, vals, y, backend="torch", **kw)
                ref.sum().backward()
                loc = s[:, a:b].to(dev).clone().requires_grad_()
                with B.recording() as calls:
                    got = K.topk_kd_loss(loc, idx.to(dev), vals.to(dev), y.to(dev),
                                         vocab_parallel=vp, backend="cuda", **kw)
                    got.sum().backward()
                recorded &= ("scale_rows", "cuda") in calls
                assert got.dtype == torch.float32 and loc.grad.dtype == dtype
                grad = _gather_cols(loc.grad, bounds, gather)
                tag = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]
                rows = [r for r in range(N) if r != 4]  # the ignored row: checked below
                for key, val in ((f"{tag}_loss", _rel(got, ref)),
                                 (f"{tag}_grad", _rel(grad[rows], full.grad[rows]))):
                    worst[key] = max(worst.get(key, 0.0), val)
                worst["ignored"] = max(worst.get("ignored", 0.0), float(got.detach()[4].abs()),
                                       float(grad[4].abs().max()))
    out["topk"] = worst
    out["topk_recorded_cuda"] = recorded


def _topk_nonfinite_cases(ctx, out):
    """A NaN on one rank makes the row NaN on every rank (a selected class; any class for
    the bucket)."""
    rank, bounds, dev, gather = _ranks(ctx)
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(22)
    res = {}
    for values, tail in TOPK_MODES:
        s, idx, vals, y = _topk_inputs(3.0, gen, values, bounds)
        s[5, idx[5, 0]] = _NAN  # a selected class
        col = next(c for c in range(V - 1, -1, -1) if c not in set(idx[6].tolist()))
        s[6, col] = _NAN  # an unselected class on the last rank
        kw = dict(values=values, tail=tail, reduction="none")
        loc = s[:, a:b].to(dev).clone().requires_grad_()
        got = K.topk_kd_loss(loc, idx.to(dev), vals.to(dev), y.to(dev), vocab_parallel=_vp(ctx),
                             backend="cuda", **kw)
        got.sum().backward()
        full = s.clone().requires_grad_()
        ref = K.topk_kd_loss(full, idx, vals, y, backend="torch", **kw)
        ref.sum().backward()
        g = _gather_cols(loc.grad, bounds, gather)
        rows = [r for r in range(N) if r != 4]
        res[f"{values}/{tail}"] = dict(
            row5_nan=bool(got[5].isnan()) and bool(g[5].isnan().all()),
            row6_nan=bool(got[6].isnan()) and bool(g[6].isnan().all()),
            ignored_zero=bool(got[4] == 0) and bool((g[4] == 0).all()),
            loss_err=_rel(got, ref), grad_err=_rel(g[rows], full.grad[rows]))
    out["topk_nonfinite"] = res


def _bytes_cases(ctx, out):
    """The same collectives (count and bytes) as the torch path."""
    from kdkernels.parallel import count_bytes

    rank, bounds, dev, _ = _ranks(ctx)
    a, b = bounds[rank]
    vp = _vp(ctx)
    gen = torch.Generator().manual_seed(23)
    s, t, y = _kd_inputs(2.0, gen)
    res = {}
    for div in ("reverse_kl", "jsd"):
        x = s[:, a:b].float().to(dev).clone().requires_grad_()
        kw = dict(divergence=div, temperature=2.0, hard_label_weight=0.1)
        counts = []
        for be in ("cuda", "torch"):
            with count_bytes() as calls:
                K.kd_loss(x, t[:, a:b].float().to(dev), y.to(dev), vocab_parallel=vp,
                          backend=be, **kw).backward()
            counts.append((sum(calls), len(calls)))
        res[div] = counts
    s, idx, vals, y = _topk_inputs(2.0, gen, "logprobs", bounds)
    for tail in ("renormalize", "bucket"):
        x = s[:, a:b].float().to(dev).clone().requires_grad_()
        counts = []
        for be in ("cuda", "torch"):
            with count_bytes() as calls:
                K.topk_kd_loss(x, idx.to(dev), vals.float().to(dev), y.to(dev),
                               values="logprobs", tail=tail, vocab_parallel=vp,
                               backend=be).backward()
            counts.append((sum(calls), len(calls)))
        res[tail] = counts
    out["bytes"] = res


H_S, H_T = 8, 6  # the fused losses' hidden sizes


def _gather_rows(g, bounds, gather):
    """The full [V, ...] weight (or [V] bias) gradient from every rank's rows."""
    if g.dim() == 1:
        return _gather_cols(g.unsqueeze(0), bounds, gather)[0]
    return _gather_cols(g.t().contiguous(), bounds, gather).t()


def _fused_head(gen, dtype):
    """Replicated full tensors: student and teacher hidden states, heads and biases,
    labels (two ignored rows, one of them with a NaN hidden state), the upstream gradient
    of reduction='none'."""
    f64 = torch.float64
    hs = torch.randn(N, H_S, generator=gen, dtype=f64) * 1.5
    ws, bs = torch.randn(V, H_S, generator=gen, dtype=f64), torch.randn(V, generator=gen,
                                                                         dtype=f64)
    ht = torch.randn(N, H_T, generator=gen, dtype=f64) * 1.5
    wt, bt = torch.randn(V, H_T, generator=gen, dtype=f64), torch.randn(V, generator=gen,
                                                                         dtype=f64)
    y = torch.randint(0, V, (N,), generator=gen)
    y[2] = y[7] = -100
    hs[2] = _NAN  # an ignored row's hidden state reaches nothing
    up = torch.rand(N, generator=gen, dtype=f64) + 0.5
    return [z.to(dtype) for z in (hs, ws, bs, ht, wt, bt)] + [y, up]


def _fused_run(fn, dev, hs, ws, bs, teacher, y, up, kw):
    """Loss and gradients (hidden, weight, bias) of one fused call on `dev`, backward
    included; teacher: (positional tensors, keyword tensors)."""
    hs = hs.to(dev).clone().requires_grad_()
    ws = ws.to(dev).clone().requires_grad_()
    bs = bs.to(dev).clone().requires_grad_()
    t_args = [x.to(dev) for x in teacher[0]]
    t_kw = {k: x.to(dev) for k, x in teacher[1].items()}
    loss = fn(hs, ws, *t_args, y.to(dev), student_bias=bs, **t_kw, **kw)
    if kw.get("reduction") == "none":
        (loss * up.to(dev, loss.dtype)).sum().backward()
    else:
        loss.backward()
    return loss, hs.grad, ws.grad, bs.grad


def _fused_compare(ctx, fn, full, local, y, up, kw, worst, tag, rec):
    """backend='cuda' with vocab_parallel on this rank's head rows against the
    single-process torch result on the whole head: [loss, hidden grad (all-reduced),
    gathered weight grad, gathered bias grad] errors under `tag`; what ran into `rec`."""
    rank, bounds, dev, gather = _ranks(ctx)
    ref = _fused_run(fn, dev, *full, y, up, dict(kw, backend="torch"))
    sync = torch.zeros(1, device=dev)
    gather(sync)  # (threads as ranks share recording(): no rank's reference inside it)
    with B.recording() as calls:
        got = _fused_run(fn, dev, *local, y, up, dict(kw, backend="cuda", vocab_parallel=_vp(ctx)))
    gather(sync)
    rec.update(calls)
    assert got[0].dtype == torch.float32 and got[2].dtype == local[1].dtype
    gw, gb = _gather_rows(got[2], bounds, gather), _gather_rows(got[3], bounds, gather)
    errs = [_rel(got[0], ref[0]), _rel(got[1], ref[1]), _rel(gw, ref[2]), _rel(gb, ref[3])]
    finite = all(bool(x.isfinite().all()) for x in (got[0], got[1], gw, gb))
    worst[tag] = [max(a, e if finite else math.inf) for a, e in zip(worst.get(tag, [0.0] * 4),
                                                                      errs)]


def _fused_cases(ctx, out):
    """The fused losses with vocab_parallel on backend='cuda' (the two-phase CUDA launchers
    per chunk, the cuda softcap / rescale kernels) against the single-process torch fused
    loss: kd divergences with softcaps, logit scales, hard labels, TAID, the three
    reductions, float32 and bfloat16 heads; top-k values and tails. Then what is refused."""
    rank, bounds, dev, gather = _ranks(ctx)
    a, b = bounds[rank]
    gen = torch.Generator().manual_seed(31)
    worst: dict[str, list[float]] = {}
    rec: set = set()
    fn = K.fused_linear_kd_loss
    configs = [  # (divergence, extra keywords, reduction, head dtype)
        ("forward_kl", dict(temperature=2.0, hard_label_weight=0.3, student_softcap=3.0,
                            teacher_softcap=4.0), "mean", torch.float32),
        ("reverse_kl", dict(student_logit_scale=1.7, teacher_logit_scale=0.6), "sum",
         torch.float32),
        ("jsd", dict(beta=0.3, student_softcap=2.5), "none", torch.float32),
        ("tvd", {}, "mean", torch.float32),
        ("taid", dict(taid_t=0.6, temperature=0.7, hard_label_weight=0.5), "none",
         torch.float32),
        ("skew_forward_kl", dict(alpha=0.2, student_softcap=2.0), "mean", torch.float32),
        ("skew_reverse_kl", dict(alpha=0.3, teacher_softcap=2.5), "sum", torch.float32),
        ("jsd", dict(student_softcap=3.0, hard_label_weight=0.2), "mean", torch.bfloat16),
    ]
    for div, extra, red, dtype in configs:
        hs, ws, bs, ht, wt, bt, y, up = _fused_head(gen, dtype)
        kw = dict(divergence=div, reduction=red, chunk_size=4, **extra)
        _fused_compare(ctx, fn, (hs, ws, bs, ((ht, wt), {"teacher_bias": bt})),
                       (hs, ws[a:b], bs[a:b], ((ht, wt[a:b]), {"teacher_bias": bt[a:b]})),
                       y, up, kw, worst, "kd_" + ("f32" if dtype == torch.float32 else "bf16"),
                       rec)
    fn = K.fused_linear_topk_kd_loss
    modes = [  # (values, tail, divergence, extra, reduction, k)
        ("logits", "renormalize", "forward_kl", dict(temperature=1.5), "mean", 5),
        ("logprobs", "renormalize", "jsd", dict(beta=0.3, student_softcap=3.0), "sum", 5),
        ("logprobs", "bucket", "reverse_kl", dict(student_softcap=2.5), "none", 6),
        ("logprobs", "bucket", "jsd", dict(beta=0.7, student_logit_scale=0.8), "mean", 4),
    ]
    for values, tail, div, extra, red, k in modes:
        hs, ws, bs, ht, _, _, y, up = _fused_head(gen, torch.float32)
        t = hs.double().nan_to_num(0.0) @ ws.double().t() + torch.randn(
            N, V, generator=gen, dtype=torch.float64)
        idx = t.topk(k, -1).indices
        idx[4, k - 2:] = -1  # padding
        if len(bounds) > 1:
            idx[5] = torch.arange(k)  # every index on the first rank
            idx[6] = torch.arange(V - k, V)  # every index on the last rank
        vals = (torch.log_softmax(t, -1) if values == "logprobs" else t)
        vals = vals.gather(1, idx.clamp_min(0)).float()
        kw = dict(values=values, tail=tail, divergence=div, reduction=red, chunk_size=4,
                  **extra)
        _fused_compare(ctx, fn, (hs, ws, bs, ((idx, vals), {})),
                       (hs, ws[a:b], bs[a:b], ((idx, vals), {})), y, up, kw, worst,
                       "topk_f32", rec)
    out["fused"] = worst
    out["fused_ran"] = sorted(rec)

    # refused on every rank alike, before the loop: float64 heads (the cuda softcap and
    # rescale kernels), and the top-k options the CUDA two-phase launcher lacks
    hs, ws, bs, ht, wt, bt, y, up = _fused_head(gen, torch.float64)
    hs = hs.nan_to_num(0.0).to(dev)
    ws, wt, y = ws[a:b].to(dev), wt[a:b].to(dev), y.to(dev)
    idx = torch.stack([torch.randperm(V, generator=gen)[:4] for _ in range(N)]).to(dev)
    vals = torch.randn(N, 4, generator=gen).to(dev)
    kw = dict(vocab_parallel=_vp(ctx), backend="cuda")
    msgs = []
    for call in (
        lambda: K.fused_linear_kd_loss(hs, ws, ht.to(dev), wt, y, **kw),
        lambda: K.fused_linear_topk_kd_loss(hs.float(), ws.float(), idx, vals, y,
                                            hard_label_weight=0.3, **kw),
        lambda: K.fused_linear_topk_kd_loss(hs.float(), ws.float(), idx, vals, y,
                                            divergence="taid", taid_t=0.5, **kw),
    ):
        with B.recording() as calls:
            try:
                call()
                msgs.append(None)
            except K.BackendUnavailableError as e:
                msgs.append(str(e))
        msgs.append(sorted(set(calls)))
    out["fused_refusals"] = msgs


CASES = (_kd_cases, _kd_nonfinite_cases, _topk_cases, _topk_nonfinite_cases, _bytes_cases,
         _fused_cases)


def check_results(results, *, fake: bool, one_shard: bool = False):
    """The thresholds every run meets (float32 kernels against the float32 torch path:
    float32 rounding; float64 against float64 to 1e-12, row by row to 1e-9)."""
    for out in results:
        kd = out["kd"]
        assert out["kd_recorded_cuda"] and out["topk_recorded_cuda"], out
        assert kd["f32_loss"] < 5e-6 and kd["f32_grad"] < 5e-6 and kd["f32_grad_row"] < 2e-5, kd
        assert kd["mixed_loss"] < 5e-6 and kd["mixed_grad"] < 5e-6, kd
        # bf16 student: float32 compute, the gradient rounded once to bf16
        assert kd["bf16_loss"] < 5e-6 and kd["bf16_grad"] < 1e-2, kd
        # float64: the torch paths' softplus is cut at 20 (2e-9 absolute in jsd's and
        # skew reverse KL's g), so against them 1e-9; against the 100-digit oracle, row by
        # row (row 1's q_{j*} rounds to 1, a gradient of ~1e-55: only the pivot's closed
        # forms keep it), 1e-11
        assert kd["f64_loss"] < 1e-12 and kd["f64_grad"] < 1e-9, kd
        assert kd["f64_grad_row"] < 1e-9 and kd["f64_vp_row"] < 1e-9, kd
        assert kd.get("f64_oracle_row", 0.0) < 1e-11, kd
        assert kd["ignored_grad"] == 0.0 and kd["ignored_loss"] == 0.0, kd
        for div, r in out["kd_nonfinite"].items():
            assert r["loss_nan"] == [True] * 3 and r["grad_nan"] == [True] * 3, (div, r)
            assert r["ignored_zero"] and r["others_finite"], (div, r)
            assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, (div, r)
        tk = out["topk"]
        assert tk["f64_loss"] < 1e-12 and tk["f64_grad"] < 1e-12, tk
        assert tk["f32_loss"] < 5e-6 and tk["f32_grad"] < 5e-6, tk
        assert tk["bf16_loss"] < 5e-6 and tk["bf16_grad"] < 1e-2, tk
        assert tk["ignored"] == 0.0, tk
        for mode, r in out["topk_nonfinite"].items():
            assert r["row5_nan"] and r["ignored_zero"], (mode, r)
            assert r["row6_nan"] == mode.endswith("bucket"), (mode, r)
            assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, (mode, r)
        if "bytes" in out:
            for key, (cuda, torch_) in out["bytes"].items():
                assert cuda == torch_, (key, out["bytes"])
            assert out["bytes"]["bucket"][0][1] == 2 and out["bytes"]["renormalize"][0][1] == 1
            if not one_shard:
                assert out["bytes"]["jsd"][0][1] == 3, out["bytes"]
        check_fused(out)
        if fake:
            assert {"kd_vp_stats", "kd_vp_partials", "kd_vp_grad", "topk_vp_gather",
                    "topk_vp_grad", "scale_rows", "softcap_fwd",
                    "softcap_bwd"} <= set(out["launches"]), out["launches"]


def check_fused(out):
    """The fused losses on backend='cuda' against the single-process torch fused loss:
    float32 heads to float32 rounding; bfloat16 heads (bf16 logits and gradients in both)
    to bf16 rounding; only cuda implementations ran, the element-wise steps among them."""
    fu = out["fused"]
    # [loss, hidden grad (all-reduced), gathered weight grad, gathered bias grad]
    assert max(fu["kd_f32"]) < 1e-5 and max(fu["topk_f32"]) < 1e-5, fu
    assert max(fu["kd_bf16"]) < 3e-2, fu
    ran = out["fused_ran"]
    assert {be for _, be in ran} == {"cuda"}, ran
    assert {("fused_linear_kd_loss_vocab_parallel", "cuda"),
            ("fused_linear_topk_kd_loss_vocab_parallel", "cuda"), ("softcap_fwd", "cuda"),
            ("softcap_bwd", "cuda"), ("scale_rows", "cuda")} <= {tuple(r) for r in ran}, ran
    r = out["fused_refusals"]
    assert "backend='cuda'" in r[0] and "float64" in r[0], r
    assert "hard_label_weight > 0" in r[2] and "divergence='taid'" in r[4], r
    assert r[1] == r[3] == r[5] == [], r  # nothing ran


# --------------------------------------------------------------- without a GPU


def _dist_gather(x):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return parts


def _host_case(case):
    """A run_ranks case: `case` on this gloo rank with the fake extension."""

    def run(rank, out):
        ctx = dict(rank=rank, bounds=BOUNDS, device="cpu", gather=_dist_gather)
        with fake_extension() as fake:
            case(ctx, out)
        out.setdefault("launches", []).extend(sorted(set(fake.launches)))

    return run


def _host_kd(rank, out):
    _host_case(_kd_cases)(rank, out)


def _host_kd_nonfinite(rank, out):
    _host_case(_kd_nonfinite_cases)(rank, out)


def _host_topk(rank, out):
    _host_case(_topk_cases)(rank, out)


def _host_topk_nonfinite(rank, out):
    _host_case(_topk_nonfinite_cases)(rank, out)


def _host_bytes(rank, out):
    _host_case(_bytes_cases)(rank, out)


def _host_fused(rank, out):
    _host_case(_fused_cases)(rank, out)


def _host_refusals(rank, out):
    """Without the fake: 'cuda' on CPU tensors raises on every rank, before any collective."""
    a, b = BOUNDS[rank]
    msgs = []
    for call in (
        lambda: K.kd_loss(torch.randn(3, b - a), torch.randn(3, b - a),
                          vocab_parallel=K.VocabParallel(a, b), backend="cuda"),
        lambda: K.topk_kd_loss(torch.randn(3, b - a), torch.zeros(3, 2, dtype=torch.long),
                               torch.zeros(3, 2), values="logprobs",
                               vocab_parallel=K.VocabParallel(a, b), backend="cuda"),
    ):
        try:
            call()
            msgs.append(None)
        except K.BackendUnavailableError as e:
            msgs.append(str(e))
    out["refusals"] = msgs


@pytest.fixture(scope="module")
def host_results(tmp_path_factory):
    cases = (_host_kd, _host_kd_nonfinite, _host_topk, _host_topk_nonfinite, _host_bytes,
             _host_fused, _host_refusals)
    return run_ranks(cases, len(BOUNDS), tmp_path_factory.mktemp("vpc"))


def test_cuda_launchers_on_the_fake_module_match_single_process_torch(host_results):
    check_results(host_results, fake=True)


def test_cuda_on_cpu_tensors_is_refused_alike_on_every_rank(host_results):
    for out in host_results:
        for msg in out["refusals"]:
            assert msg is not None and "backend='cuda'" in msg, out["refusals"]
            assert "needs CUDA tensors" in msg, out["refusals"]


def test_backend_choice_is_local():
    from kdkernels.kd.parallel import vocab_parallel_backend

    cpu = torch.device("cpu")
    with pytest.raises(K.BackendUnavailableError, match="needs CUDA tensors"):
        vocab_parallel_backend("cuda", cpu, "topk_kd_loss")
    assert vocab_parallel_backend("auto", cpu) == "torch"
    with fake_extension():  # a usable extension on a GPU: cuda runs, auto stays torch
        assert vocab_parallel_backend("cuda", cpu) == "cuda"
        assert vocab_parallel_backend("auto", cpu) == "torch"


def test_threaded_harness_on_the_fake_module():
    """The GPU test's thread harness (below), run here on the fake extension: the same
    results as the gloo ranks."""
    with fake_extension() as fake:
        outs = run_threads(CASES, BOUNDS, "cpu")
    for out in outs:
        out["launches"] = sorted(set(fake.launches))
    check_results(outs, fake=True)


# --------------------------------------------------------------- on a GPU

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@requires_gpu
def test_gpu_two_shards_as_threads():
    """The real kernels on two shards of one GPU (threads as ranks: cross-shard pivots,
    ties, NaN on one shard, top-k indices on both shards)."""
    check_results(run_threads(CASES, BOUNDS, "cuda:0"), fake=False)


def _nccl_main(rank, port, world, path):
    """One NCCL rank: the cases through torch.distributed (the whole vocabulary on one rank
    when world == 1), and the profiler's kernel names."""
    import json

    from _helpers import kernels_launched

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    bounds = [(0, V)] if world == 1 else BOUNDS
    out: dict = {}
    try:
        ctx = dict(rank=rank, bounds=bounds, device=f"cuda:{rank}", gather=_dist_gather)
        for case in CASES:
            case(ctx, out)
        vp = K.VocabParallel(*bounds[rank])
        a, b = bounds[rank]
        s = torch.randn(8, V, device=f"cuda:{rank}")

        def step():
            x = s[:, a:b].clone().requires_grad_()
            K.kd_loss(x, s[:, a:b] * 0.5, vocab_parallel=vp, divergence="jsd",
                      backend="cuda").backward()
            idx = torch.arange(4, device=x.device).expand(8, 4).contiguous()
            K.topk_kd_loss(x, idx, torch.full((8, 4), -2.0, device=x.device),
                           values="logprobs", tail="bucket", vocab_parallel=vp,
                           backend="cuda").backward()

        out["kernels"] = sorted(set(kernels_launched(step)))
        h = torch.randn(8, H_S, device=f"cuda:{rank}", requires_grad=True)
        w_full = torch.randn(V, H_S, device=h.device)

        def fused_step():  # the fused losses' chunk loop on cuda: softcap, launchers
            w = w_full[a:b].clone().requires_grad_()
            K.fused_linear_kd_loss(h, w, h.detach() * 0.5, w_full[a:b], vocab_parallel=vp,
                                   divergence="jsd", student_softcap=3.0, chunk_size=4,
                                   reduction="none", backend="cuda").sum().backward()
            idx = torch.arange(4, device=h.device).expand(8, 4).contiguous()
            K.fused_linear_topk_kd_loss(h, w, idx, torch.full((8, 4), -2.0, device=h.device),
                                        values="logprobs", tail="bucket", vocab_parallel=vp,
                                        backend="cuda").backward()

        out["fused_kernels"] = sorted(set(kernels_launched(fused_step)))
    finally:
        with open(f"{path}.{rank}", "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()


def _nccl_run(world: int, tmp_path) -> list[dict]:
    import json

    path = str(tmp_path / "out")
    spawn_ranks(_nccl_main, world, world, path)
    res = []
    for r in range(world):
        with open(f"{path}.{r}") as f:
            res.append(json.load(f))
    return res


@pytest.mark.gpu
@requires_gpu
def test_gpu_one_nccl_rank(tmp_path):
    """A real process group of one rank holding the whole vocabulary."""
    outs = _nccl_run(1, tmp_path)
    check_results(outs, fake=False, one_shard=True)
    for name in ("kd_vp_stats_kernel", "kd_vp_partials_kernel", "kd_vp_grad_kernel",
                 "topk_vp_gather_kernel", "topk_vp_grad_kernel", "scale_rows_kernel"):
        assert any(f"kdk::{name}" in k for k in outs[0]["kernels"]), (name, outs[0]["kernels"])
    assert not any(k.startswith("_vp") for k in outs[0]["kernels"]), outs[0]["kernels"]
    fused = outs[0]["fused_kernels"]  # the fused losses' loop: only CUDA kernels besides GEMMs
    for name in ("kd_vp_stats_kernel", "kd_vp_grad_kernel", "topk_vp_gather_kernel",
                 "topk_vp_grad_kernel", "softcap_fwd_kernel", "softcap_bwd_kernel"):
        assert any(f"kdk::{name}" in k for k in fused), (name, fused)
    assert not any(k.startswith(("_vp", "_softcap", "_scale_rows")) for k in fused), fused


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_two_nccl_ranks(tmp_path):
    check_results(_nccl_run(2, tmp_path), fake=False)
