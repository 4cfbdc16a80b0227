"""Benchmark specs of `uld_loss` (docs/uld.md) and its eager baseline.

The teacher has a different vocabulary: V_t = V + V/8 (e.g. 128256 → 144288, about the
ratio of a Qwen to a Llama tokenizer). `uld` is the full loss (both vocabularies sorted),
`uld.topk` keeps the first k = 64 sorted positions. Registered in `specs.all_specs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import OpSpec, Sweep
from .providers import eager_and_compile, with_ours

TOPK = 64


def teacher_vocab(v: int) -> int:
    return v + v // 8


def uld_eager(s, t, *, top_k=None):
    """What a training script writes (TRL GOLD's formula): both softmaxes over the full
    vocabularies, sorted descending, the shorter zero-padded, the L1 distance per row
    (over the first k positions with top_k), the mean over rows; autograd for the
    gradient through the sort and the softmax."""
    ps = torch.softmax(s, -1).sort(-1, descending=True).values
    pt = torch.softmax(t.detach(), -1).sort(-1, descending=True).values
    width = max(ps.shape[-1], pt.shape[-1])
    ps = F.pad(ps, (0, width - ps.shape[-1]))
    pt = F.pad(pt, (0, width - pt.shape[-1]))
    if top_k is not None:
        ps, pt = ps[:, :top_k], pt[:, :top_k]
    return (ps - pt).abs().sum(-1).mean()


def _cost(shape, e, mode):
    """Both logit tensors read once, the loss written; backward also writes dS."""
    n, v = shape["N"], shape["V"]
    read = n * (v + teacher_vocab(v)) * e
    if mode == "forward":
        return read + 4, 0.0
    return read + n * v * e, 0.0


def _spec(topk: bool) -> OpSpec:
    def call(fn, x, **be):
        return fn(x["s"], x["t"], **({"top_k": x["k"]} if topk else {}), **be)

    def providers(device):
        return with_ours("uld_loss", call, device, eager_and_compile(uld_eager, call))

    def make(shape, dt, dev):
        n, v = shape["N"], shape["V"]
        s = torch.randn(n, v, device=dev, dtype=dt).mul_(2.0)
        t = torch.randn(n, teacher_vocab(v), device=dev, dtype=dt).mul_(2.0)
        return {"s": s, "t": t, "k": shape.get("k")}

    k = {"k": TOPK} if topk else {}
    return OpSpec(
        name="uld.topk" if topk else "uld",
        family="uld",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost,
        providers=providers,
        presets={
            "cpu": Sweep({"N": 64, "V": 32000, **k},
                         {"V": [8192, 32000], "N": [32, 64, 128]} if not topk else {}),
            "gpu": Sweep({"N": 4096, "V": 128256, **k},
                         {"V": [32000, 128256, 151936, 262144],
                          **({} if topk else {"N": [1024, 4096, 16384]})}),
            "tiny": Sweep({"N": 8, "V": 96, **({"k": 8} if topk else {})}),
        },
        primary=not topk,
    )


def uld_specs() -> list[OpSpec]:
    return [_spec(False), _spec(True)]
