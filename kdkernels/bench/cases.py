"""The op registry: what is benchmarked, on which shapes, by whom, and what it must cost.

Each `OpSpec` names one public op in one configuration (e.g. `kd.jsd`), and gives:
- `make_inputs(shape, dtype, device)`: the input tensors (logits ~ N(0, 2²));
- `grad_inputs`: the inputs that get gradients (`requires_grad=True`);
- `cost(shape, elem_bytes, mode)`: (bytes, flops) it must at least move / compute — each
  input read once and each output written once; FLOPs only for matrix products;
- `providers(device)`: provider name -> factory; a factory returns `fn(inputs) -> loss`
  or raises `Unavailable`;
- shape sweeps per preset (`cpu`, `gpu`, `tiny`): a base shape and axes varied one at a
  time (vocabulary and tokens), for the plots.

Modes: `forward` (a training forward: inputs require grad, so whatever the op saves
for backward is counted), `backward` (the forward runs untimed before each call; only
`loss.backward()` is timed) and `forward+backward`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import naive
from .providers import (
    Unavailable,
    compiled,
    liger_attr,
    our_backends,
    ours,
    pot,
    provider_name,
    trl_generalized_jsd,
)

MODES = ("forward", "backward", "forward+backward")
PRESETS = ("cpu", "gpu", "tiny")
PRESET_ALIASES = {"small": "cpu", "llm": "gpu"}
GPU_VOCABS = [32000, 128256, 151936, 262144]
LOGIT_STD = 2.0
SINKHORN_EPS = 0.1


@dataclass(frozen=True)
class Sweep:
    """A base shape and the axes varied one at a time around it."""

    base: dict
    axes: dict = field(default_factory=dict)

    def shapes(self, sweep: bool = True) -> list[tuple[dict, int]]:
        """[(shape, priority)]: the base shape first (priority 0), then the sweep (1)."""
        out = [(dict(self.base), 0)]
        seen = {_key(self.base)}
        if not sweep:
            return out
        for axis, values in self.axes.items():
            for v in values:
                shp = dict(self.base, **{axis: v})
                if _key(shp) not in seen:
                    seen.add(_key(shp))
                    out.append((shp, 1))
        return out


def _key(shape: dict) -> tuple:
    return tuple(sorted(shape.items()))


def shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


@dataclass
class OpSpec:
    name: str
    family: str
    make_inputs: Callable[[dict, torch.dtype, torch.device], dict]
    grad_inputs: tuple[str, ...]
    cost: Callable[[dict, int, str], tuple[float, float]]
    providers: Callable[[torch.device], dict[str, Callable]]
    presets: dict[str, Sweep]
    primary: bool = False  # the family's representative: swept on the CPU too
    compile_on_cpu: bool = False  # torch.compile with a C++ compiler costs ~15 s a graph
    vocab_key: str = "V"
    tokens_key: str = "N"

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES if self.grad_inputs else ("forward",)


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


def _cost_sinkhorn(shape, e, mode):
    b = shape["B"]
    return b * b * e + 2 * b * 4, 0.0


def _cost_topk(shape, e, mode):
    n, v, k = shape["N"], shape["V"], shape["k"]
    read = n * v * e + n * k * (8 + e)
    return (read + 4, 0.0) if mode == "forward" else (read + n * v * e, 0.0)


# -- providers -------------------------------------------------------------------------


def _ours_factory(op: str, call: Callable, backend: str | None):
    def factory():
        fn = ours(op)
        if backend is None:
            return lambda x: call(fn, x)
        return lambda x: call(fn, x, backend=backend)

    return factory


def _with_ours(op: str, call: Callable, device, extra: dict) -> dict:
    out = {provider_name(be): _ours_factory(op, call, be) for be in our_backends(device)}
    out.update(extra)
    return out


def _eager_and_compile(eager: Callable, call: Callable) -> dict:
    def compile_factory():
        c = compiled(eager)
        return lambda x: call(c, x)

    return {"eager": lambda: (lambda x: call(eager, x)), "compile": compile_factory}


def _liger_kd(device, div):
    """Liger's losses take log-probs (KL, JSD) or probs (TVD): the softmax is timed too."""
    if div == "forward_kl":
        cls = liger_attr(device, "liger_kernel.transformers", "LigerKLDIVLoss")
        m = cls(reduction="batchmean", log_target=True)
        return lambda x: m(F.log_softmax(x["s"], -1), F.log_softmax(x["t"], -1))
    if div == "jsd":
        m = liger_attr(device, "liger_kernel.transformers", "LigerJSD")(beta=0.5)
        return lambda x: m(F.log_softmax(x["s"], -1), F.log_softmax(x["t"], -1))
    if div == "tvd":
        m = liger_attr(device, "liger_kernel.transformers", "LigerTVDLoss")(reduction="batchmean")
        return lambda x: m(torch.softmax(x["s"], -1), torch.softmax(x["t"], -1))
    raise Unavailable(f"Liger-Kernel has no {div}")


def _trl_factory():
    real = trl_generalized_jsd()
    if real is not None:
        return lambda x: real(x["s"], x["t"], beta=0.5, temperature=1.0, reduction="batchmean")
    return lambda x: naive.trl_jsd_formula(x["s"], x["t"], beta=0.5)


_KD_EXTRA = {"taid": {"taid_t": 0.5}}
_LIGER_KD = ("forward_kl", "jsd", "tvd")


def _kd_spec(div: str) -> OpSpec:
    kw = _KD_EXTRA.get(div, {})

    def call_ours(fn, x, **be):
        return fn(x["s"], x["t"], divergence=div, **kw, **be)

    def call_eager(fn, x):
        return fn(x["s"], x["t"], div, **kw)

    def providers(device):
        extra = _eager_and_compile(naive.kd_eager, call_eager)
        if div in _LIGER_KD:
            extra["liger"] = functools.partial(_liger_kd, device, div)
        if div == "jsd":
            extra["trl-formula"] = _trl_factory
        return _with_ours("kd_loss", call_ours, device, extra)

    primary = div == "forward_kl"
    gpu_axes = {"V": GPU_VOCABS, "N": [4096, 8192, 16384, 32768]} if primary else {
        "V": GPU_VOCABS}
    return OpSpec(
        name=f"kd.{div}",
        family="kd",
        make_inputs=lambda s, dt, dev: {
            "s": _logits((s["N"], s["V"]), dt, dev),
            "t": _logits((s["N"], s["V"]), dt, dev),
        },
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
    def call_ours(fn, x, **be):
        return fn(x["hs"], x["ws"], x["ht"], x["wt"], divergence=div, **be)

    def call_eager(fn, x):
        return fn(x["hs"], x["ws"], x["ht"], x["wt"], div)

    def liger_fused(device):
        cls = liger_attr(device, "liger_kernel.transformers", "LigerFusedLinearJSD")
        m = cls(jsd_beta=0.5, temperature=1.0)
        return lambda x: m(x["hs"], x["ws"], x["ht"], x["wt"])

    def liger_chunked(device):
        cls = liger_attr(device, "liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")
        m = cls(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, temperature=1.0)

        def run(x):
            args = (x["hs"], x["ws"], x["ht"], x["wt"], x["y"])
            try:
                return m(*args, None, None)
            except TypeError:  # releases without bias arguments
                return m(*args)

        return run

    def providers(device):
        extra = _eager_and_compile(naive.fused_linear_eager, call_eager)
        if device.type == "cuda":  # the opt-in low-memory weight-gradient accumulation
            extra["kdkernels[auto,wacc]"] = _ours_factory(
                "fused_linear_kd_loss",
                lambda fn, x: call_ours(fn, x, weight_grad_accumulation="weight"), None)
        if div == "jsd":
            extra["liger"] = functools.partial(liger_fused, device)
            extra["liger-chunked"] = functools.partial(liger_chunked, device)
        return _with_ours("fused_linear_kd_loss", call_ours, device, extra)

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


def _pld_spec(topk: bool) -> OpSpec:
    def call(fn, x, **be):
        kw = {"top_k": x["K"]} if topk else {}
        return fn(x["s"], x["t"], **kw, **be)

    def providers(device):
        return _with_ours("plackett_luce_loss", call, device,
                          _eager_and_compile(naive.pld_eager, call))

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
    def call(fn, x):
        return fn(x["C"], epsilon=SINKHORN_EPS, n_iters=x["iters"])

    def pot_factory():
        ot = pot()

        def run(x):
            c = x["C"]
            b = c.shape[-1]
            a = torch.full((b,), 1.0 / b, dtype=c.dtype, device=c.device)
            return ot.bregman.sinkhorn_log(a, a, c, SINKHORN_EPS, numItermax=x["iters"],
                                           stopThr=0.0, warn=False)

        return run

    def providers(device):
        return {"kdkernels[auto]": _ours_factory("sinkhorn", call, None),
                **_eager_and_compile(naive.sinkhorn_eager, call), "pot": pot_factory}

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

    def pot_factory():
        ot = pot()

        def run(x):
            ps = torch.softmax(x["s"], -1)
            pt = torch.softmax(x["t"], -1)
            cost = torch.cdist(ps, pt, p=1)
            b = cost.shape[-1]
            a = torch.full((b,), 1.0 / b, dtype=cost.dtype, device=cost.device)
            return ot.sinkhorn2(a, a, cost, SINKHORN_EPS, method="sinkhorn_log",
                                numItermax=x["iters"], stopThr=0.0)

        return run

    def providers(device):
        extra = _eager_and_compile(naive.sinkhorn_loss_eager, call)
        extra["pot"] = pot_factory
        return _with_ours("sinkhorn_loss", call, device, extra)

    def make(s, dt, dev):
        return {"s": _logits((s["B"], s["V"]), dt, dev), "t": _logits((s["B"], s["V"]), dt, dev),
                "iters": s["iters"]}

    return OpSpec(
        name="sinkhorn_loss",
        family="sinkhorn",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost_logits_pair(lambda s: s["B"] * s["V"], lambda s: 1),
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
        return _with_ours("topk_kd_loss", call, device,
                          _eager_and_compile(naive.topk_kd_eager, call))

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
        return _with_ours("graph_on_logits_loss", call, device,
                          _eager_and_compile(naive.graph_loss_eager, call))

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


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd",
               "taid")


def all_specs() -> list[OpSpec]:
    """Every benchmarked op, in report order."""
    return [
        *(_kd_spec(d) for d in DIVERGENCES),
        _fused_spec("forward_kl"),
        _fused_spec("jsd"),
        _pld_spec(False),
        _pld_spec(True),
        _sinkhorn_spec(),
        _sinkhorn_loss_spec(),
        _topk_spec(),
        _graph_spec(),
    ]


def get_spec(name: str) -> OpSpec:
    for spec in all_specs():
        if spec.name == name:
            return spec
    raise KeyError(f"unknown benchmark op {name!r}")


# -- cases -----------------------------------------------------------------------------


@dataclass
class Case:
    spec: OpSpec
    provider: str
    factory: Callable
    shape: dict
    dtype: torch.dtype
    mode: str
    device: torch.device
    priority: int = 0

    @property
    def op(self) -> str:
        return self.spec.name

    @property
    def input_key(self) -> tuple:
        return (self.spec.name, _key(self.shape), self.dtype, str(self.device))

    def label(self) -> str:
        return (f"{self.op} {self.mode} {shape_str(self.shape)} {dtype_name(self.dtype)} "
                f"{self.provider}")

    def cost(self) -> tuple[float, float]:
        e = torch.empty((), dtype=self.dtype).element_size()
        return self.spec.cost(self.shape, e, self.mode)

    def make_inputs(self) -> dict:
        torch.manual_seed(0)
        inputs = self.spec.make_inputs(self.shape, self.dtype, self.device)
        for k in self.spec.grad_inputs:
            inputs[k].requires_grad_(True)
        return inputs

    def build(self, inputs: dict) -> tuple[Callable, Callable]:
        """(pre, fn) for the harness; raises Unavailable when the provider cannot run."""
        loss_fn = self.factory()
        leaves = [inputs[k] for k in self.spec.grad_inputs]

        def clear():
            for t in leaves:
                t.grad = None

        if self.mode == "forward":
            def pre():
                clear()

            return pre, lambda _: loss_fn(inputs)
        if self.mode == "backward":
            def pre_bwd():
                clear()
                return loss_fn(inputs)

            return pre_bwd, lambda loss: loss.backward()

        def fwd_bwd(_):
            loss = loss_fn(inputs)
            loss.backward()
            return loss

        return clear, fwd_bwd


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (use fp32, bf16 or fp16)")
    return table[name]
