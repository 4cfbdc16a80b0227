"""Timing and peak-memory measurement, correct by construction.

Timing
    - Warm-up calls run first and are never timed (compilation, autotuning, lazy
      initialisation, allocator growth all land there).
    - On a GPU each call is bracketed by CUDA events recorded on the current stream and
      read after a synchronise; the L2 cache is flushed (a 256 MiB write) before every
      call, outside the events, so small shapes are not timed from a warm cache.
    - On the CPU each call is bracketed by `time.perf_counter`.
    - The number of timed calls adapts to the cost of one call (`target_s` of timed work,
      between `min_reps` and `max_reps`); the report is the median with the 25th/75th
      percentiles (IQR) and the minimum.
    - `pre()` (untimed) runs before every call and its result is passed to `fn`: it
      clears gradients, or runs the forward pass when only the backward is timed.

Memory: peak bytes allocated *during* one call, above what was allocated before it
(inputs, and whatever `pre()` left alive, are excluded; tensors the call leaves alive,
such as `.grad`, are included because they were allocated during it).
    - GPU: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
      `memory_allocated()` before the call.
    - CPU: the allocation events of PyTorch's CPU allocator, recorded by the profiler
      (`profile_memory=True`) around one call; the peak of their running sum. This counts
      tensors, not allocator or library scratch made with plain malloc; the process-level
      check (peak RSS in a fresh subprocess) is `kdkernels.bench.cpumem`.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_L2_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    """Seconds per timed call (warm-up calls excluded)."""

    times: list[float]
    warmup: int
    warmup_times: list[float] = field(default_factory=list)

    @property
    def reps(self) -> int:
        return len(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def q25(self) -> float:
        return _quantile(self.times, 0.25)

    @property
    def q75(self) -> float:
        return _quantile(self.times, 0.75)

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @property
    def min(self) -> float:
        return min(self.times)


def _quantile(xs: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), no numpy needed."""
    ys = sorted(xs)
    if len(ys) == 1:
        return ys[0]
    pos = q * (len(ys) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ys) - 1)
    return ys[lo] + (ys[hi] - ys[lo]) * (pos - lo)


class _Timer:
    """One timed call on `device`: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._flush = None
        if self.cuda:
            self._flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self, fn, arg) -> float:
        if self.cuda:
            self._flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(arg) if arg is not _NO_ARG else fn()
            end.record()
            torch.cuda.synchronize()
            del out
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        out = fn(arg) if arg is not _NO_ARG else fn()
        dt = time.perf_counter() - t0
        del out
        return dt


_NO_ARG = object()


def time_fn(
    fn: Callable,
    *,
    device: torch.device | str = "cpu",
    pre: Callable | None = None,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    target_s: float = 0.3,
) -> Timing:
    """Time `fn` (called as fn(pre()) when `pre` is given, else fn()).

    `warmup` untimed calls first (at least 1 is recommended: the first call of most
    kernels pays for compilation or autotuning); then timed calls until `target_s` of
    timed work or `max_reps`, at least `min_reps`.
    """
    device = torch.device(device)
    timer = _Timer(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm_times = []
    for _ in range(warmup):
        arg = pre() if pre is not None else _NO_ARG
        warm_times.append(timer(fn, arg))
    times: list[float] = []
    budget_reps = max_reps
    while len(times) < budget_reps:
        arg = pre() if pre is not None else _NO_ARG
        times.append(timer(fn, arg))
        if len(times) == 1:
            est = max(times[0], 1e-7)
            budget_reps = int(min(max_reps, max(min_reps, math.ceil(target_s / est))))
    return Timing(times=times, warmup=warmup, warmup_times=warm_times)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence C++-level stderr (the profiler's start/stop lines and allocator warnings)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(fd, 2)
    finally:
        os.close(fd)


def _cpu_peak(fn, arg) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(arg) if arg is not _NO_ARG else fn()
            del out
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            extra = node.extra_fields
            if extra.device.type == "cpu":
                events.append((node.start_time_ns, extra.alloc_size))
    events.sort(key=lambda e: e[0])
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def peak_memory(fn: Callable, *, device: torch.device | str = "cpu",
                pre: Callable | None = None) -> int:
    """Peak bytes allocated during one call of `fn`, above the bytes allocated before it."""
    device = torch.device(device)
    arg = pre() if pre is not None else _NO_ARG
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(arg) if arg is not _NO_ARG else fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    return _cpu_peak(fn, arg)


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
