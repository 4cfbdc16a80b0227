"""The data model of the benchmark registry: shape sweeps, op specs and cases.

An `OpSpec` names one public op in one configuration (e.g. `kd.jsd`) and gives:
- `make_inputs(shape, dtype, device)`: the input tensors;
- `grad_inputs`: the inputs that get gradients (`requires_grad=True`);
- `cost(shape, elem_bytes, mode)`: (bytes, flops) it must at least move / compute — each
  input read once and each output written once; FLOPs only for matrix products;
- `providers(device)`: provider name -> factory; a factory returns `fn(inputs) -> loss`
  or raises `Unavailable`;
- shape sweeps per preset (`cpu`, `gpu`, `tiny`): a base shape and axes varied one at a
  time (vocabulary and tokens), for the plots.

A `Case` is one (spec, provider, shape, dtype, mode) to time. Modes: `forward` (a
training forward: inputs require grad, so whatever the op saves for backward is
counted), `backward` (the forward runs untimed before each call; only `loss.backward()`
is timed) and `forward+backward`. The specs themselves are in `kdkernels.bench.specs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MODES = ("forward", "backward", "forward+backward")
PRESETS = ("cpu", "gpu", "tiny")
PRESET_ALIASES = {"small": "cpu", "llm": "gpu"}

# Priorities: the order cases run in, and what the time budget may cut.
BASE, SWEEP, COMPILE = 0, 1, 2


def shape_key(shape: dict) -> tuple:
    return tuple(sorted(shape.items()))


def shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r} (use fp32, bf16 or fp16)")
    return table[name]


@dataclass(frozen=True)
class Sweep:
    """A base shape and the axes varied one at a time around it."""

    base: dict
    axes: dict = field(default_factory=dict)

    def shapes(self, sweep: bool = True) -> list[tuple[dict, int]]:
        """[(shape, priority)]: the base shape first (BASE), then the sweep points (SWEEP),
        the axes taken in turn (V[0], N[0], V[1], N[1], ...) so that a sweep cut short by
        the time budget still has points on every axis."""
        out = [(dict(self.base), BASE)]
        seen = {shape_key(self.base)}
        if not sweep:
            return out
        columns = [[dict(self.base, **{axis: v}) for v in values]
                   for axis, values in self.axes.items()]
        for i in range(max((len(c) for c in columns), default=0)):
            for col in columns:
                if i < len(col) and shape_key(col[i]) not in seen:
                    seen.add(shape_key(col[i]))
                    out.append((col[i], SWEEP))
        return out


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


@dataclass
class Case:
    spec: OpSpec
    provider: str
    factory: Callable
    shape: dict
    dtype: torch.dtype
    mode: str
    device: torch.device
    priority: int = BASE

    @property
    def op(self) -> str:
        return self.spec.name

    @property
    def input_key(self) -> tuple:
        return (self.spec.name, shape_key(self.shape), self.dtype, str(self.device))

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
