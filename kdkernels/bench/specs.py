"""The benchmark registry: every benchmarked op, its inputs, costs, providers and shapes.

`kdkernels bench` (cli, runner) and the pytest-benchmark suites in `bench/` both take
their cases from here (through `kdkernels.bench.cases.select_cases`); nothing else lists
ops, shapes or providers. The data model (OpSpec, Sweep, Case) is `kdkernels.bench.model`.
Inputs are logits ~ N(0, 2²) unless said otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .. import DIVERGENCES
from ..kd.params import NEEDS_LABELS
from . import naive, peers
from .model import OpSpec, Sweep
from .providers import auto_backend, eager_and_compile, ours_factory, provider_name, with_ours
from .sampled import sampled_specs
from .uld import uld_specs

GPU_VOCABS = [32000, 128256, 151936, 262144]
LOGIT_STD = 2.0
SINKHORN_EPS = 0.1


def _logits(shape, dtype, device, *, gen_scale=LOGIT_STD):
    x = torch.randn(*shape, device=device, dtype=dtype)
    return x.mul_(gen_scale)


# -- costs -----------------------------------------------------------------------------


def _cost_logits_pair(n_elems: Callable[[dict], int], rows: Callable[[dict], int]):
    """Student and teacher [rows, V] in, a loss out; backward also writes dS."""

    def cost(shape, e, mode):
        nv = n_elems(shape)
        if mode == "forward":
            return 2 * nv * e + 4 * rows(shape), 0.0
        return 3 * nv * e, 0.0

    return cost


def _cost_fused(shape, e, mode):
    n, h, v = shape["N"], shape["H"], shape["V"]
    read = (2 * n * h + 2 * v * h) * e
    f_fwd = 2.0 * n * v * (2 * h)
    f_bwd = 4.0 * n * v * h  # dS @ W (grad hidden) and dSᵀ @ h (grad weight)
    if mode == "forward":
        return read + 4, f_fwd
    write = n * h * e + v * h * 4  # grad hidden, grad weight accumulated in float32
    if mode == "backward":
        return read + write, f_bwd
    return read + write, f_fwd + f_bwd


def _cost_fused_topk(shape, e, mode):
    """Hidden states and the head read, the teacher's k indices (int64) and values read;
    one GEMM forward, two backward (grad hidden, grad weight accumulated in float32)."""
    n, h, v, k = shape["N"], shape["H"], shape["V"], shape["k"]
    read = (n * h + v * h) * e + n * k * (8 + e)
    f_fwd = 2.0 * n * v * h
    f_bwd = 4.0 * n * v * h
    if mode == "forward":
        return read + 4, f_fwd
    write = n * h * e + v * h * 4
    if mode == "backward":
        return read + write, f_bwd
    return read + write, f_fwd + f_bwd


def _cost_sinkhorn(shape, e, mode):
    """The cost matrix read once, the potentials written; and the iterations' work: each
    (row, column) update pair touches every one of the B² entries twice."""
    b = shape["B"]
    return b * b * e + 2 * b * 4, 2.0 * b * b * shape["iters"]


def _cost_sinkhorn_loss(shape, e, mode):
    """Both logit tensors read once (the gradient written once with a backward), and the
    pairwise cost's work: C_ij = Σ_v c(x_iv, y_jv) is 2·B²·V operations, its backward
    G_iv = Σ_j C̄_ij φ(x_iv, y_jv) another 2·B²·V (the solver's B² per iteration is
    negligible next to them at V >= 2048)."""
    b, v = shape["B"], shape["V"]
    nbytes, _ = _cost_logits_pair(lambda s: s["B"] * s["V"], lambda s: 1)(shape, e, mode)
    flops = 2.0 * b * b * v
    return nbytes, flops if mode in ("forward", "backward") else 2 * flops


def _cost_topk(shape, e, mode):
    n, v, k = shape["N"], shape["V"], shape["k"]
    read = n * v * e + n * k * (8 + e)
    return (read + 4, 0.0) if mode == "forward" else (read + n * v * e, 0.0)


_KD_EXTRA = {"taid": {"taid_t": 0.5}}
_LIGER_KD = ("forward_kl", "jsd", "tvd")


def _kd_inputs(div, s, dt, dev):
    x = {"s": _logits((s["N"], s["V"]), dt, dev), "t": _logits((s["N"], s["V"]), dt, dev)}
    if div in NEEDS_LABELS:  # dkd, nkd read the row's label
        x["y"] = torch.randint(0, s["V"], (s["N"],), device=dev)
    return x


def _kd_spec(div: str) -> OpSpec:
    kw = _KD_EXTRA.get(div, {})

    def call_ours(fn, x, **be):
        return fn(x["s"], x["t"], x.get("y"), divergence=div, **kw, **be)

    def call_eager(fn, x):
        return fn(x["s"], x["t"], div, labels=x.get("y"), **kw)

    def providers(device):
        extra = eager_and_compile(naive.kd_eager, call_eager)
        if div in _LIGER_KD:
            extra["liger"] = functools.partial(peers.liger_kd, device, div)
        if div == "jsd":
            extra["trl-formula"] = peers.trl_jsd
        return with_ours("kd_loss", call_ours, device, extra)

    primary = div == "forward_kl"
    gpu_axes = {"V": GPU_VOCABS, "N": [4096, 8192, 16384, 32768]} if primary else {
        "V": GPU_VOCABS}
    return OpSpec(
        name=f"kd.{div}",
        family="kd",
        make_inputs=lambda s, dt, dev: _kd_inputs(div, s, dt, dev),
        grad_inputs=("s",),
        cost=_cost_logits_pair(lambda s: s["N"] * s["V"], lambda s: s["N"]),
        providers=providers,
        presets={
            "cpu": Sweep({"N": 128, "V": 32000},
                         {"V": [8192, 32000, 65536], "N": [32, 128, 512]}),
            "gpu": Sweep({"N": 8192, "V": 128256}, gpu_axes),
            "tiny": Sweep({"N": 8, "V": 96}, {"V": [64, 96]}),
        },
        primary=primary,
        compile_on_cpu=div in ("forward_kl", "jsd"),
    )


def _fused_spec(div: str) -> OpSpec:
    op = "fused_linear_kd_loss"

    def call_ours(fn, x, **kw):
        return fn(x["hs"], x["ws"], x["ht"], x["wt"], divergence=div, **kw)

    def call_eager(fn, x):
        return fn(x["hs"], x["ws"], x["ht"], x["wt"], div)

    def providers(device):
        extra = eager_and_compile(naive.fused_linear_eager, call_eager)
        if device.type == "cuda":  # the opt-in low-memory weight-gradient accumulation
            extra[provider_name(auto_backend(op, device), "wacc")] = ours_factory(
                op, call_ours, auto_backend(op, device), weight_grad_accumulation="weight")
        if div == "jsd":
            extra["liger"] = functools.partial(peers.liger_fused_jsd, device)
            extra["liger-chunked"] = functools.partial(peers.liger_chunked_jsd, device)
        return with_ours(op, call_ours, device, extra)

    def make(s, dt, dev):
        n, h, v = s["N"], s["H"], s["V"]
        std = h ** -0.5
        return {
            "hs": _logits((n, h), dt, dev, gen_scale=1.0),
            "ws": _logits((v, h), dt, dev, gen_scale=LOGIT_STD * std),
            "ht": _logits((n, h), dt, dev, gen_scale=1.0),
            "wt": _logits((v, h), dt, dev, gen_scale=LOGIT_STD * std),
            "y": torch.randint(0, v, (n,), device=dev),
        }

    primary = div == "forward_kl"
    gpu_axes = {"V": GPU_VOCABS}
    if primary:
        gpu_axes.update({"N": [4096, 8192, 16384, 32768], "H": [2048, 4096, 8192]})
    return OpSpec(
        name=f"fused_linear.{div}",
        family="fused_linear",
        make_inputs=make,
        grad_inputs=("hs", "ws"),
        cost=_cost_fused,
        providers=providers,
        presets={
            "cpu": Sweep({"N": 128, "H": 256, "V": 32000},
                         {"V": [8192, 32000], "N": [64, 128, 256]}),
            "gpu": Sweep({"N": 8192, "H": 4096, "V": 128256}, gpu_axes),
            "tiny": Sweep({"N": 8, "H": 16, "V": 96}),
        },
        primary=primary,
    )


def _teacher_topk(n, v, k, dt, dev):
    """A teacher's top-k (values, int64 indices) of N(0, 2²) logits, a block of rows at a
    time (no N×V temporary)."""
    vals = torch.empty(n, k, dtype=dt, device=dev)
    idx = torch.empty(n, k, dtype=torch.long, device=dev)
    rows = max(1, (1 << 22) // v)
    for r0 in range(0, n, rows):
        tv, ti = _logits((min(rows, n - r0), v), dt, dev).topk(k, -1)
        vals[r0 : r0 + rows], idx[r0 : r0 + rows] = tv, ti
    return vals, idx


def _fused_topk_spec() -> OpSpec:
    op = "fused_linear_topk_kd_loss"

    def call_ours(fn, x, **kw):
        return fn(x["hs"], x["ws"], x["idx"], x["vals"], **kw)

    def call_eager(fn, x):
        return fn(x["hs"], x["ws"], x["idx"], x["vals"])

    def providers(device):
        return with_ours(op, call_ours, device,
                         eager_and_compile(naive.fused_linear_topk_eager, call_eager))

    def make(s, dt, dev):
        n, h, v, k = s["N"], s["H"], s["V"], s["k"]
        vals, idx = _teacher_topk(n, v, k, dt, dev)
        return {
            "hs": _logits((n, h), dt, dev, gen_scale=1.0),
            "ws": _logits((v, h), dt, dev, gen_scale=LOGIT_STD * h ** -0.5),
            "idx": idx,
            "vals": vals,
        }

    return OpSpec(
        name="fused_linear.topk",
        family="fused_linear",
        make_inputs=make,
        grad_inputs=("hs", "ws"),
        cost=_cost_fused_topk,
        providers=providers,
        presets={
            "cpu": Sweep({"N": 128, "H": 256, "V": 32000, "k": 64}),
            "gpu": Sweep({"N": 8192, "H": 4096, "V": 128256, "k": 64}, {"V": GPU_VOCABS}),
            "tiny": Sweep({"N": 8, "H": 16, "V": 96, "k": 8}),
        },
    )


def _pld_spec(topk: bool) -> OpSpec:
    def call(fn, x, **be):
        kw = {"top_k": x["K"]} if topk else {}
        return fn(x["s"], x["t"], **kw, **be)

    def providers(device):
        return with_ours("plackett_luce_loss", call, device,
                          eager_and_compile(naive.pld_eager, call))

    def make(s, dt, dev):
        return {"s": _logits((s["N"], s["V"]), dt, dev), "t": _logits((s["N"], s["V"]), dt, dev),
                "K": s.get("K")}

    k = {"K": 64} if topk else {}
    return OpSpec(
        name="pld.topk" if topk else "pld",
        family="pld",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost_logits_pair(lambda s: s["N"] * s["V"], lambda s: s["N"]),
        providers=providers,
        presets={
            "cpu": Sweep({"N": 32, "V": 32000, **k},
                         {"V": [8192, 32000], "N": [16, 32, 64]}),
            "gpu": Sweep({"N": 4096, "V": 128256, **k},
                         {"V": GPU_VOCABS, **({} if topk else {"N": [1024, 4096, 16384]})}),
            "tiny": Sweep({"N": 8, "V": 96, **({"K": 8} if topk else {})}),
        },
        primary=not topk,
    )


def _sinkhorn_spec() -> OpSpec:
    def call(fn, x, **be):
        return fn(x["C"], epsilon=SINKHORN_EPS, n_iters=x["iters"], **be)

    def providers(device):
        extra = eager_and_compile(naive.sinkhorn_eager, call)
        extra["pot"] = functools.partial(peers.pot_sinkhorn, SINKHORN_EPS)
        return with_ours("sinkhorn", call, device, extra)

    return OpSpec(
        name="sinkhorn",
        family="sinkhorn",
        make_inputs=lambda s, dt, dev: {
            "C": torch.rand(s["B"], s["B"], device=dev, dtype=torch.float32).to(dt),
            "iters": s["iters"],
        },
        grad_inputs=(),
        cost=_cost_sinkhorn,
        providers=providers,
        presets={
            "cpu": Sweep({"B": 256, "iters": 20}, {"B": [64, 256, 512]}),
            "gpu": Sweep({"B": 4096, "iters": 20}, {"B": [1024, 4096, 16384]}),
            "tiny": Sweep({"B": 16, "iters": 5}),
        },
        primary=True,
        vocab_key="B",
        tokens_key="B",
    )


def _sinkhorn_loss_spec() -> OpSpec:
    def call(fn, x, **be):
        return fn(x["s"], x["t"], epsilon=SINKHORN_EPS, n_iters=x["iters"], **be)

    def providers(device):
        extra = eager_and_compile(naive.sinkhorn_loss_eager, call)
        extra["pot"] = functools.partial(peers.pot_sinkhorn_loss, SINKHORN_EPS)
        return with_ours("sinkhorn_loss", call, device, extra)

    def make(s, dt, dev):
        return {"s": _logits((s["B"], s["V"]), dt, dev), "t": _logits((s["B"], s["V"]), dt, dev),
                "iters": s["iters"]}

    return OpSpec(
        name="sinkhorn_loss",
        family="sinkhorn",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost_sinkhorn_loss,
        providers=providers,
        presets={
            "cpu": Sweep({"B": 64, "V": 8192, "iters": 20},
                         {"V": [2048, 8192, 32000], "B": [32, 64, 128]}),
            "gpu": Sweep({"B": 256, "V": 128256, "iters": 20},
                         {"V": GPU_VOCABS, "B": [64, 256, 1024]}),
            "tiny": Sweep({"B": 8, "V": 64, "iters": 5}),
        },
        primary=True,
        tokens_key="B",
    )


def _topk_spec() -> OpSpec:
    def call(fn, x, **be):
        return fn(x["s"], x["idx"], x["vals"], **be)

    def providers(device):
        return with_ours("topk_kd_loss", call, device,
                          eager_and_compile(naive.topk_kd_eager, call))

    def make(s, dt, dev):
        n, v, k = s["N"], s["V"], s["k"]
        vals, idx = torch.empty(n, k, dtype=dt, device=dev), torch.empty(n, k, dtype=torch.long,
                                                                        device=dev)
        rows = max(1, (1 << 22) // v)  # teacher logits a block at a time: no N×V temporary
        for r0 in range(0, n, rows):
            t = _logits((min(rows, n - r0), v), dt, dev)
            tv, ti = t.topk(k, -1)
            vals[r0 : r0 + rows], idx[r0 : r0 + rows] = tv, ti
        return {"s": _logits((n, v), dt, dev), "idx": idx, "vals": vals}

    return OpSpec(
        name="topk_kd",
        family="topk",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost_topk,
        providers=providers,
        presets={
            "cpu": Sweep({"N": 256, "V": 32000, "k": 64},
                         {"V": [8192, 32000, 65536], "N": [64, 256, 1024]}),
            "gpu": Sweep({"N": 8192, "V": 128256, "k": 64},
                         {"V": GPU_VOCABS, "N": [4096, 8192, 16384, 32768]}),
            "tiny": Sweep({"N": 8, "V": 96, "k": 8}),
        },
        primary=True,
        compile_on_cpu=True,
    )


def _graph_spec() -> OpSpec:
    def call(fn, x, **be):
        return fn(x["s"], x["t"], x["k"], **be)

    def providers(device):
        return with_ours("graph_on_logits_loss", call, device,
                          eager_and_compile(naive.graph_loss_eager, call))

    def make(s, dt, dev):
        shp = (s["G"], s["T"], s["V"])
        return {"s": _logits(shp, dt, dev), "t": _logits(shp, dt, dev), "k": s["k"]}

    return OpSpec(
        name="graph",
        family="graph",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost_logits_pair(lambda s: s["G"] * s["T"] * s["V"], lambda s: s["G"]),
        providers=providers,
        presets={
            "cpu": Sweep({"G": 2, "T": 64, "V": 32000, "k": 16},
                         {"V": [8192, 32000], "T": [32, 64, 128]}),
            "gpu": Sweep({"G": 8, "T": 1024, "V": 128256, "k": 16},
                         {"V": GPU_VOCABS, "T": [512, 1024, 2048]}),
            "tiny": Sweep({"G": 2, "T": 8, "V": 96, "k": 4}, {"T": [4, 8]}),
        },
        primary=True,
        tokens_key="T",
    )


def all_specs() -> list[OpSpec]:
    """Every benchmarked op, in report order."""
    return [
        *(_kd_spec(d) for d in DIVERGENCES),
        _fused_spec("forward_kl"),
        _fused_spec("jsd"),
        _fused_topk_spec(),
        _pld_spec(False),
        _pld_spec(True),
        _sinkhorn_spec(),
        _sinkhorn_loss_spec(),
        _topk_spec(),
        _graph_spec(),
        *uld_specs(),
        *sampled_specs(),
    ]


def get_spec(name: str) -> OpSpec:
    for spec in all_specs():
        if spec.name == name:
            return spec
    raise KeyError(f"unknown benchmark op {name!r}")


def families() -> list[str]:
    """The op families, in report order (one pytest-benchmark file each: bench/bench_<f>.py)."""
    return list(dict.fromkeys(s.family for s in all_specs()))
