"""Shared by the bench_*.py suites: the registry's cases as pytest-benchmark tests.

Cases, providers, inputs and costs come from the registry that `kdkernels bench` runs
(`kdkernels.bench.specs`, selected by `kdkernels.bench.cases.select_cases`); the warm-up,
the backend-label check and what a failure means come from `kdkernels.bench.runner`.
"""

from __future__ import annotations

import os

import pytest
import torch

from kdkernels.bench.cases import select_cases
from kdkernels.bench.harness import peak_memory, synchronize
from kdkernels.bench.model import Case
from kdkernels.bench.runner import failure, result_row, warm_up
from kdkernels.bench.specs import families


def device() -> torch.device:
    name = os.environ.get("KDKERNELS_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases_for(family: str) -> list[Case]:
    dev = device()
    shapes = os.environ.get("KDKERNELS_BENCH_SHAPES") or (
        "gpu:base" if dev.type == "cuda" else "cpu:base")
    provs = os.environ.get("KDKERNELS_BENCH_PROVIDERS")
    provs = [p.strip() for p in provs.split(",")] if provs else None
    return select_cases(dev, ops=[family], providers=provs, shapes=shapes)


def family_suite(path: str):
    """The test of `bench/bench_<family>.py`: one benchmark per case of that family."""
    family = os.path.basename(path).removeprefix("bench_").removesuffix(".py")
    if family not in families():
        raise ValueError(f"{path}: {family!r} is not a benchmark family ({families()})")
    cases = cases_for(family)

    @pytest.mark.parametrize("case", cases, ids=[c.label().replace(" ", "-") for c in cases])
    def test(benchmark, floors, case):
        run_case(benchmark, floors, case)

    test.__name__ = test.__qualname__ = f"test_{family}"
    return test


def run_case(benchmark, floors, case: Case) -> None:
    """Warm-up once (skips when the provider cannot run here; fails when a kdkernels[<b>]
    provider ran another backend), then benchmark.pedantic."""
    try:
        pre, fn = warm_up(case, case.make_inputs())
    except Exception as e:
        status, note = failure(e)
        if status == "unavailable":
            pytest.skip(note)
        raise

    def target(arg):
        out = fn(arg)
        synchronize(case.device)
        return out

    rounds = 20 if case.device.type == "cuda" else 5
    benchmark.pedantic(target, setup=lambda: ((pre(),), {}), rounds=rounds, warmup_rounds=1)
    r = result_row(case, floors)
    benchmark.extra_info.update({
        "op": r.op, "provider": r.provider, "mode": r.mode, "shape": r.shape, "dtype": r.dtype,
        "bytes": r.nbytes, "flops": r.flops, "floor_s": r.floor_s,
        "peak_memory_bytes": peak_memory(fn, device=case.device, pre=pre),
    })
