"""Benchmark specs of random-sampling KD (docs/sampled_kd.md) and their eager baselines.

`sampled_kd` times the loss on a stored record (k = 64 draws per token of N(0, 2²)
teacher logits, drawn once while the inputs are built, a block of rows at a time: no
N×V teacher tensor is kept); its backends are `topk_kd_loss`'s, on which it runs.
`sample_teacher` times the sampler itself (forward only). Registered in
`specs.all_specs`; the cpu-memory case is in `cpumem.MEM_CASES`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import OpSpec, Sweep
from .providers import eager_and_compile, our_backends, ours_factory, provider_name

DRAWS = 64
_STD = 2.0


def sampled_kd_eager(s, idx, w):
    """What a training script writes: the full log_softmax, gathered at the sampled ids,
    Σ p̂ (log p̂ − log q) per row, the mean over rows; autograd for the gradient."""
    logq = F.log_softmax(s, -1).gather(-1, idx.clamp_min(0).long())
    ok = (idx >= 0) & (w > 0)
    lw = torch.where(ok, w, 1.0).log()
    return torch.where(ok, w * (lw - logq), 0.0).sum(-1).mean()


def sample_eager(t, k):
    """torch.multinomial over the full softmax, k draws with replacement per row."""
    return torch.multinomial(torch.softmax(t.float(), -1), k, replacement=True)


def _record(n, v, dt, dev):
    """(indices, weights) of k = DRAWS draws per row, the teacher logits made a block of
    rows at a time."""
    from .. import sample_teacher

    idx = torch.empty(n, min(DRAWS, v), dtype=torch.int32, device=dev)
    w = torch.empty(n, min(DRAWS, v), dtype=torch.float32, device=dev)
    rows = max(1, (1 << 22) // v)
    gen = torch.Generator(device=dev).manual_seed(0)
    for r0 in range(0, n, rows):
        t = torch.randn(min(rows, n - r0), v, dtype=dt, device=dev).mul_(_STD)
        smp = sample_teacher(t, DRAWS, generator=gen)
        idx[r0 : r0 + rows], w[r0 : r0 + rows] = smp.indices, smp.weights
    return idx, w


def _cost_loss(shape, e, mode):
    """The student row read once and its gradient written once; the record (id, weight)."""
    n, v, k = shape["N"], shape["V"], shape["k"]
    read = n * v * e + n * k * 8
    return (read + 4, 0.0) if mode == "forward" else (read + n * v * e, 0.0)


def _cost_sampler(shape, e, mode):
    """The teacher row read once; the ids and weights written."""
    n, v, k = shape["N"], shape["V"], shape["k"]
    return n * v * e + n * k * 8, 0.0


def _loss_spec() -> OpSpec:
    def call_ours(fn, x, **be):
        from .. import TeacherSamples

        return fn(x["s"], TeacherSamples(x["idx"], x["w"], x["s"].shape[-1], draws=DRAWS), **be)

    def call_eager(fn, x):
        return fn(x["s"], x["idx"], x["w"])

    def providers(device):
        out = {provider_name(be): ours_factory("sampled_kd_loss", call_ours, be)
               for be in our_backends("topk_kd_loss", device)}
        out.update(eager_and_compile(sampled_kd_eager, call_eager))
        return out

    def make(shape, dt, dev):
        n, v = shape["N"], shape["V"]
        idx, w = _record(n, v, dt, dev)
        return {"s": torch.randn(n, v, device=dev, dtype=dt).mul_(_STD), "idx": idx, "w": w}

    k = {"k": DRAWS}
    return OpSpec(
        name="sampled_kd",
        family="sampled",
        make_inputs=make,
        grad_inputs=("s",),
        cost=_cost_loss,
        providers=providers,
        presets={
            "cpu": Sweep({"N": 256, "V": 32000, **k}, {"V": [8192, 32000, 65536]}),
            "gpu": Sweep({"N": 8192, "V": 128256, **k},
                         {"V": [32000, 128256, 151936, 262144], "N": [4096, 16384]}),
            "tiny": Sweep({"N": 8, "V": 96, **k}),
        },
        primary=True,
    )


def _sampler_spec() -> OpSpec:
    def call(fn, x, **be):
        return fn(x["t"], x["k"], **be)

    def providers(device):
        out = {provider_name(be): ours_factory("sample_teacher", call, be)
               for be in our_backends("sample_teacher", device)}
        out["eager"] = lambda: (lambda x: call(sample_eager, x))
        return out

    def make(shape, dt, dev):
        n, v = shape["N"], shape["V"]
        return {"t": torch.randn(n, v, device=dev, dtype=dt).mul_(_STD), "k": shape["k"]}

    k = {"k": DRAWS}
    return OpSpec(
        name="sample_teacher",
        family="sampled",
        make_inputs=make,
        grad_inputs=(),
        cost=_cost_sampler,
        providers=providers,
        presets={
            "cpu": Sweep({"N": 256, "V": 32000, **k}),
            "gpu": Sweep({"N": 8192, "V": 128256, **k}, {"V": [32000, 128256, 262144]}),
            "tiny": Sweep({"N": 8, "V": 96, **k}),
        },
    )


def sampled_specs() -> list[OpSpec]:
    return [_loss_spec(), _sampler_spec()]
