"""Shared by the bench_*.py suites: case selection and one pytest-benchmark run."""

from __future__ import annotations

import os

import pytest
import torch

from kdkernels.bench.cases import Case
from kdkernels.bench.harness import peak_memory, synchronize
from kdkernels.bench.providers import Unavailable
from kdkernels.bench.runner import select_cases


def device() -> torch.device:
    name = os.environ.get("KDKERNELS_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases_for(ops: list[str]) -> list[Case]:
    dev = device()
    shapes = os.environ.get("KDKERNELS_BENCH_SHAPES") or (
        "gpu:base" if dev.type == "cuda" else "cpu:base")
    provs = os.environ.get("KDKERNELS_BENCH_PROVIDERS")
    provs = [p.strip() for p in provs.split(",")] if provs else None
    return select_cases(dev, ops=ops, providers=provs, shapes=shapes)


def params(ops: list[str]):
    cases = cases_for(ops)
    return pytest.mark.parametrize("case", cases, ids=[c.label().replace(" ", "-")
                                                       for c in cases])


def run_case(benchmark, floors, case: Case) -> None:
    """Warm-up once (skips when the provider cannot run here), then benchmark.pedantic."""
    inputs = case.make_inputs()
    try:
        pre, fn = case.build(inputs)
        fn(pre())  # warm-up: compilation, autotuning, lazy imports
        synchronize(case.device)
    except Unavailable as e:
        pytest.skip(str(e))
    except Exception as e:
        if type(e).__name__ == "BackendUnavailableError":
            pytest.skip(str(e).splitlines()[0])
        raise

    def target(arg):
        out = fn(arg)
        synchronize(case.device)
        return out

    rounds = 20 if case.device.type == "cuda" else 5
    benchmark.pedantic(target, setup=lambda: ((pre(),), {}), rounds=rounds, warmup_rounds=1)
    nbytes, flops = case.cost()
    benchmark.extra_info.update({
        "op": case.op, "provider": case.provider, "mode": case.mode,
        "shape": dict(case.shape), "dtype": str(case.dtype), "bytes": nbytes, "flops": flops,
        "floor_s": floors.floor_s(nbytes, flops, case.dtype),
        "peak_memory_bytes": peak_memory(fn, device=case.device, pre=pre),
    })
