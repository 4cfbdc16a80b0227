"""The fused linear losses over a vocabulary-parallel LM head (docs/vocab_parallel.md,
"The fused form") on 2 and 3 gloo ranks with uneven shards of V = 37, against the
single-process fused loss holding the whole head: the loss, the hidden-state gradient
(after the all-reduce, or summed by the test with reduce_hidden_grad=False) and the
gathered weight/bias gradients; the same for backend='triton' (on 2 ranks; without a GPU
the kernels run under TRITON_INTERPRET=1) and for DTensor heads sharded on the vocabulary
rows on a CPU device mesh. One spawned job per world size runs every case; each rank
writes its measured errors to a file that the tests then check."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
from _helpers import run_ranks

import kdkernels as K
from kdkernels._core.backend import recording
from kdkernels.parallel import count_bytes

# the spawned workers import this module: Triton must see TRITON_INTERPRET before import
if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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


@contextmanager
def _launcher_calls():
    """Count the calls of the Triton two-phase launchers (kd and top-k) in the block."""
    import kdkernels.kd.parallel_triton as kt
    import kdkernels.topk.parallel_triton as tt

    calls = {"kd": 0, "topk": 0}
    saved = kt.kd_fwd_vocab_parallel_triton, tt.topk_kd_fwd_vocab_parallel_triton

    def spy(key, fn):
        def run(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)
        return run

    kt.kd_fwd_vocab_parallel_triton = spy("kd", saved[0])
    tt.topk_kd_fwd_vocab_parallel_triton = spy("topk", saved[1])
    try:
        yield calls
    finally:
        kt.kd_fwd_vocab_parallel_triton, tt.topk_kd_fwd_vocab_parallel_triton = saved


def _errors(got, ref, bounds=None):
    """[loss, hidden grad, weight grad, bias grad] relative errors of a result against a
    single-process one (a vocabulary-parallel result's weight and bias gradients gathered
    from the ranks' rows of `bounds`); inf when any is not finite
    (every case's inputs are finite but for ignored rows' hidden states, so all must stay
    finite, else the NaN-tolerant comparison would compare nothing)."""
    gw, gb = got[2], got[3]
    if bounds is not None:
        gw = _gather_rows(gw, bounds) if gw is not None else None
        gb = _gather_rows(gb, bounds) if gb is not None else None
    errs = [_rel(got[0], ref[0]), _rel(got[1], ref[1]), _rel(gw, ref[2]), _rel(gb, ref[3])]
    finite = bool(got[0].isfinite().all()) and bool(got[1].isfinite().all())
    return [e if finite else math.inf for e in errs]


def _compare(rank, bounds, fn, full, local, y, up, kw, vp, worst, tag, **opts):
    """Run the single-process loss on `full` and the vocabulary-parallel one on `local`
    ((hs, ws, bs, teacher)); record the relative errors under `tag`."""
    ref = _run(fn, *full, y, up, kw, **opts)
    got = _run(fn, *local, y, up, dict(kw, vocab_parallel=vp), **opts)
    errs = _errors(got, ref, bounds)
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

    def triton_outside_the_interpreter():
        os.environ["TRITON_INTERPRET"] = "0"  # a CPU tensor: triton cannot run here
        try:
            K.fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b], vocab_parallel=vp,
                                   backend="triton")
        finally:
            os.environ["TRITON_INTERPRET"] = "1"

    for call in (
        triton_outside_the_interpreter,
        lambda: K.fused_linear_topk_kd_loss(hs, ws[a:b], torch.zeros(B, T, 2, dtype=torch.long),
                                            torch.zeros(B, T, 2), vocab_parallel=vp,
                                            backend="cuda"),
        lambda: K.fused_linear_kd_loss(hs, ws[a:b], ht, wt[a:b], vocab_parallel=vp,
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


# --- backend='triton' (2 ranks) --------------------------------------------------------

def _compare_triton(bounds, fn, full, local, y, up, kw, vp, dtype):
    """backend='triton' with `vp` on `local` against the single-process torch result on
    `full` ("vp"), and the single-process triton result against the same ("sp": the
    rounding of the triton backend's own float32 steps, e.g. its softcap kernels); what
    ran in the vocabulary-parallel call: recording()'s (op, backend) pairs and the Triton
    launchers' call counts."""
    ref = _run(fn, *full, y, up, dict(kw, backend="torch"))
    same = _run(fn, *full, y, up, dict(kw, backend="triton"))
    with recording() as rec, _launcher_calls() as launched:
        got = _run(fn, *local, y, up, dict(kw, vocab_parallel=vp, backend="triton"))
    softcap = any("softcap" in key for key in kw)
    # float64 throughout: float64 heads without the triton backend's float32 element-wise
    # kernels (the softcap and its chain rule; the per-row rescale of reduction='none')
    exact = dtype == torch.float64 and not softcap and kw["reduction"] != "none"
    return dict(vp=_errors(got, ref, bounds), sp=_errors(same, ref), f64=dtype == torch.float64,
                exact=exact, softcap=softcap, rec=sorted(set(rec)), launched=launched)


def _triton_cases(rank, bounds, out):
    """backend='triton' against the single-process torch result: every divergence family,
    softcaps, logit scales, hard labels, ignored rows (one with a NaN hidden state), the
    three reductions, float64 and float32; records what ran."""
    a, b = bounds[rank]
    vp = K.VocabParallel(a, b)
    gen = torch.Generator().manual_seed(21)
    fn = K.fused_linear_kd_loss
    configs = [  # (divergence, extra keywords, reduction, dtype)
        ("forward_kl", dict(temperature=2.0, hard_label_weight=0.3, student_softcap=3.0,
                            teacher_softcap=4.0), "mean", torch.float64),
        ("reverse_kl", dict(student_logit_scale=1.7, teacher_logit_scale=0.6), "sum",
         torch.float64),
        ("jsd", dict(beta=0.3, student_softcap=2.5), "none", torch.float64),
        ("tvd", {}, "mean", torch.float64),
        ("taid", dict(taid_t=0.6, temperature=0.7, hard_label_weight=0.5), "none",
         torch.float64),
        ("skew_reverse_kl", dict(alpha=0.3, teacher_softcap=2.5), "sum", torch.float64),
        ("jsd", dict(student_softcap=3.0, hard_label_weight=0.2), "mean", torch.float32),
    ]
    res = []
    for div, extra, red, dtype in configs:
        hs, ws, bs, ht, wt, bt, y, up = _head(gen, dtype, std=2.0)
        kw = dict(divergence=div, reduction=red, chunk_size=5, **extra)
        res.append(_compare_triton(bounds, fn, (hs, ws, bs, _kd_t(ht, wt, bt)),
                                   (hs, ws[a:b], bs[a:b], _kd_t(ht, wt[a:b], bt[a:b])), y, up,
                                   kw, vp, dtype))
    fn = K.fused_linear_topk_kd_loss
    modes = [  # (values, tail, divergence, extra, reduction, k, dtype)
        ("logits", "renormalize", "forward_kl", dict(temperature=1.5), "mean", 5,
         torch.float64),
        ("logprobs", "bucket", "reverse_kl", dict(student_softcap=2.5), "none", 6,
         torch.float64),
        ("logprobs", "bucket", "jsd", dict(beta=0.7, student_logit_scale=0.8), "sum", 4,
         torch.float64),
        ("logprobs", "bucket", "forward_kl", dict(student_softcap=3.0), "mean", 5,
         torch.float32),
    ]
    for values, tail, div, extra, red, k, dtype in modes:
        hs, ws, bs, idx, vals, y, up = _topk_inputs(gen, k, values == "logprobs", dtype)
        kw = dict(values=values, tail=tail, divergence=div, reduction=red, chunk_size=5,
                  **extra)
        res.append(_compare_triton(bounds, fn, (hs, ws, bs, ((idx, vals), {})),
                                   (hs, ws[a:b], bs[a:b], ((idx, vals), {})), y, up, kw, vp,
                                   dtype))
    out["triton"] = res


# --- DTensor heads ----------------------------------------------------------------------

def _dt_run(fn, hs, ws, bs, teacher, y, kw, mesh, place, hidden_place=None):
    """One call with the student (and teacher) head as DTensors with `place` (the
    hidden state a DTensor too with `hidden_place`): loss, the gradients (full tensors),
    and what the gradients are (DTensor placements, or 'plain')."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def dt(x, grad=False):
        return distribute_tensor(x.clone(), mesh, place).requires_grad_(grad)

    h = (hs.clone() if hidden_place is None
         else distribute_tensor(hs.clone(), mesh, hidden_place)).requires_grad_()
    w, bias = dt(ws, True), dt(bs, True)
    t_args, t_kw = teacher
    if "teacher_bias" in t_kw:  # the kd loss: the teacher head sharded alike
        t_args = (t_args[0], dt(t_args[1]))
        t_kw = {"teacher_bias": dt(t_kw["teacher_bias"])}
    loss = fn(h, w, *t_args, y, student_bias=bias, **t_kw, **kw)
    loss.backward()

    def full(g):
        return g.full_tensor() if isinstance(g, DTensor) else g

    def kind(g):
        return str(tuple(g.placements)) if isinstance(g, DTensor) else "plain"

    return ((loss, full(h.grad), full(w.grad), full(bias.grad)),
            [kind(loss), kind(h.grad), kind(w.grad), kind(bias.grad),
             w.to_local().shape[0]])


def _dtensor_cases(rank, bounds, out):
    """Weights and biases as DTensors: Shard(0) on a 1-D mesh and on the TP dim of a 2-D
    mesh (torch's own uneven split of V = 37), a replicated hidden state, a fully
    replicated head; each against the single-process result. Then the placements that
    must raise, before anything runs."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    world = len(bounds)
    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    gen = torch.Generator().manual_seed(31)
    hs, ws, bs, ht, wt, bt, y, up = _head(gen, torch.float64, std=2.0)
    kd = dict(divergence="jsd", beta=0.4, hard_label_weight=0.2, student_softcap=3.0,
              chunk_size=5)
    teacher = _kd_t(ht, wt, bt)
    ref = _run(K.fused_linear_kd_loss, hs, ws, bs, teacher, y, up, kd)
    res = {}
    for name, m, place, hidden in (
        ("shard", mesh, [Shard(0)], None),
        ("shard_replicated_hidden", mesh, [Shard(0)], [Replicate()]),
        ("shard_2d", mesh2, [Replicate(), Shard(0)], None),
        ("replicate", mesh, [Replicate()], [Replicate()]),
    ):
        got, kinds = _dt_run(K.fused_linear_kd_loss, hs, ws, bs, teacher, y, kd, m, place,
                             hidden)
        res[name] = dict(err=[_rel(g, r) for g, r in zip(got, ref)], kinds=kinds)
    hs2, ws2, bs2, idx, vals, y2, up2 = _topk_inputs(gen, 5, True, torch.float64)
    tk = dict(values="logprobs", tail="bucket", divergence="jsd", chunk_size=5)
    ref = _run(K.fused_linear_topk_kd_loss, hs2, ws2, bs2, ((idx, vals), {}), y2, up2, tk)
    rep_idx = distribute_tensor(idx, mesh, [Replicate()])
    rep_vals = distribute_tensor(vals, mesh, [Replicate()])
    got, kinds = _dt_run(K.fused_linear_topk_kd_loss, hs2, ws2, bs2,
                         ((rep_idx, rep_vals), {}), y2, tk, mesh, [Shard(0)], [Replicate()])
    res["topk"] = dict(err=[_rel(g, r) for g, r in zip(got, ref)], kinds=kinds)

    def sharded(x, placements=None, m=mesh):
        return distribute_tensor(x.clone(), m, list(placements or [Shard(0)]))

    a, b = (int(o) for o in _dt_offsets(sharded(ws)))
    fn = K.fused_linear_kd_loss
    bad = {
        "shard_hidden_dim": lambda: fn(hs, sharded(ws, (Shard(1),)), ht, sharded(wt), y),
        "teacher_replicated": lambda: fn(hs, sharded(ws), ht, sharded(wt, (Replicate(),)), y),
        "plain_bias": lambda: fn(hs, sharded(ws), ht, sharded(wt), y, student_bias=bs[a:b]),
        "sharded_hidden": lambda: fn(sharded(hs), sharded(ws), ht, sharded(wt), y),
        "with_vocab_parallel": lambda: fn(hs, sharded(ws), ht, sharded(wt), y,
                                          vocab_parallel=K.VocabParallel(a, b)),
        "partial": lambda: fn(hs, DTensor.from_local(ws[a:b].clone(), mesh, [Partial()]), ht,
                              sharded(wt), y),
        "both_mesh_dims": lambda: fn(hs, sharded(ws, (Shard(0), Shard(0)), mesh2), ht,
                                     sharded(wt, (Shard(0), Shard(0)), mesh2), y),
        "sharded_indices": lambda: K.fused_linear_topk_kd_loss(
            hs2, sharded(ws2), sharded(idx, (Shard(1),)), vals, y2),
    }
    errors = {}
    for name, call in bad.items():
        with recording() as rec, count_bytes() as sent:
            try:
                call()
                msg = None
            except ValueError as e:
                msg = str(e)
        errors[name] = dict(msg=msg, ran=rec, sent=sent)
    out["dtensor"] = dict(res=res, errors=errors)


def _dt_offsets(x):
    """(start, stop) of this rank's rows of a Shard(0) DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(x.shape, x.device_mesh,
                                                          x.placements)
    return offset[0], offset[0] + shape[0]


@pytest.fixture(scope="module", params=[2, 3])
def results(request, tmp_path_factory):
    world = request.param
    cases = [_kd_cases, _partial_hidden_cases, _topk_cases, _error_cases, _dtensor_cases]
    if world == 2:
        cases.append(_triton_cases)  # the interpreter is slow: one world size
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
        assert "BackendUnavailableError" in e[0] and "TRITON_INTERPRET=1" in e[0], e
        # backend='cuda' exists for both fused losses (tests/test_vocab_parallel_cuda.py
        # runs it through a fake extension): on CPU tensors it is refused for the device
        for msg, op in ((e[1], "fused_linear_topk_kd_loss"), (e[2], "fused_linear_kd_loss")):
            assert "BackendUnavailableError" in msg and "backend='cuda'" in msg, e
            assert f"{op}_vocab_parallel:" in msg and "needs CUDA tensors" in msg, e
        assert "ValueError" in e[3] and "stop - start" in e[3], e
        assert "same chunk_size" in e[4], e
        assert "requires_grad" in e[5], e
        assert "labels must be in [0, 37)" in e[6], e
        assert e[7] < 1e-5 and e[8] < 1e-5, e


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


def test_triton_matches_single_process(results):
    if "triton" not in results[0]:
        pytest.skip("backend='triton' runs on 2 ranks only")
    for out in results:
        for case in out["triton"]:
            # [loss, hidden grad (all-reduced), gathered weight grad, gathered bias grad]
            vp, sp = case["vp"], case["sp"]
            if case["exact"]:
                # the two-phase kernels compute float64 heads in float64
                assert max(vp) < 1e-11, case
            else:
                # float32 heads, or the triton softcap / row-rescale kernels (float32 for
                # every dtype, as in the single-process triton loop): no worse than twice
                # that loop's own error against the same torch result
                assert max(vp) <= 2 * max(sp) + 1e-11, case
                assert max(vp) < (1e-6 if case["f64"] else 1e-5), case
            # only triton implementations ran (no silent torch step), the loop among them,
            # and the two-phase Triton launcher of its divergence step on every chunk
            rec, launched = case["rec"], case["launched"]
            assert {be for _, be in rec} == {"triton"}, case
            ops = {op for op, _ in rec}
            is_kd = "fused_linear_kd_loss_vocab_parallel" in ops
            assert is_kd != ("fused_linear_topk_kd_loss_vocab_parallel" in ops), case
            assert launched["kd" if is_kd else "topk"] >= 3, case  # N = 12, chunks of 5
            assert launched["topk" if is_kd else "kd"] == 0, case
            if case["softcap"]:
                assert "softcap_fwd" in ops, case
    ops = {op for case in results[0]["triton"] for op, _ in case["rec"]}
    # the softcap's chain rule (and the row rescale of 'none'), the backward's rescale
    # (mean / sum): the element-wise steps ran on triton too
    assert {"softcap_bwd", "scale_rows"} <= ops, ops


def test_dtensor_heads_match_single_process(results):
    want = {"shard": "(Shard(dim=0),)", "shard_replicated_hidden": "(Shard(dim=0),)",
            "shard_2d": "(Replicate(), Shard(dim=0))", "replicate": "(Replicate(),)",
            "topk": "(Shard(dim=0),)"}
    for out in results:
        res = out["dtensor"]["res"]
        for name, r in res.items():
            assert max(r["err"]) < 1e-11, (name, r)
            loss_kind, h_kind, w_kind, b_kind, rows = r["kinds"]
            assert loss_kind == "plain", r
            # the gradients are DTensors with the weight's (and hidden state's) placements
            assert w_kind == want[name] and b_kind == want[name], (name, r)
            replicated = name in ("shard_replicated_hidden", "replicate", "topk")
            assert h_kind == ("(Replicate(),)" if replicated else "plain"), (name, r)


def test_dtensor_shards_are_torchs_uneven_split(results):
    # V = 37: 19 + 18 on 2 ranks, 13 + 13 + 11 on 3 (start/stop from the shards' offsets)
    rows = [out["dtensor"]["res"]["shard"]["kinds"][4] for out in results]
    assert sum(rows) == V and rows == sorted(rows, reverse=True) and len(set(rows)) > 1, rows
    assert rows == [out["dtensor"]["res"]["shard_2d"]["kinds"][4] for out in results]
    assert [out["dtensor"]["res"]["replicate"]["kinds"][4] for out in results] == [V] * len(rows)


def test_dtensor_bad_placements_raise_before_any_work(results):
    for out in results:
        errors = out["dtensor"]["errors"]
        expect = {
            "shard_hidden_dim": "student_weight: a DTensor here must be Replicate(), or Shard(0)",
            "teacher_replicated": "must be sharded alike",
            "plain_bias": "must be sharded alike",
            "sharded_hidden": "student_hidden: a DTensor here must be Replicate() on every",
            "with_vocab_parallel": "not both",
            "partial": "student_weight: a DTensor here must be",
            "both_mesh_dims": "student_weight: a DTensor here must be",
            "sharded_indices": "teacher_topk_indices: a DTensor here must be Replicate()",
        }
        assert set(errors) == set(expect)
        for name, want in expect.items():
            e = errors[name]
            assert e["msg"] is not None and want in e["msg"], (name, e)
            assert e["ran"] == [] and e["sent"] == [], (name, e)
