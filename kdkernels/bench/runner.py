"""Run cases through the harness and collect one result row per case.

Shared with the pytest-benchmark suites in `bench/`: `result_row` (bytes, FLOPs, floor),
`warm_up` (build + one untimed call, with the backend check) and `failure` (what an
exception means for a row).

Labels: a provider of ours, `kdkernels[<b>]`, passes `backend=<b>` explicitly; its
first call runs inside `kdkernels._core.backend.recording()` and every dispatch recorded
there must have run `<b>` (helper tables included). Otherwise the row is an error
("ran torch (kd_loss), not triton") and no timing is reported under that label.

Time budget (`run_cases(deadline=...)`): base-shape cases always run; a sweep or compile
group (one op at one shape) runs only while its estimated time, scaled from the op's
base-shape group, fits in what is left; the others are cut, listed with `BUDGET_NOTE`.
"""

from __future__ import annotations

import gc
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .._core.backend import recording
from .floors import Floors
from .harness import Timing, peak_memory, synchronize, time_fn
from .model import BASE, SWEEP, Case, dtype_name, shape_key, shape_str
from .providers import Unavailable, label_mismatch

BUDGET_NOTE = "cut by the time budget (--time-budget)"


@dataclass
class Result:
    op: str
    family: str
    mode: str
    provider: str
    shape: dict
    dtype: str
    status: str = "ok"  # ok | unavailable | error | oom | skipped
    note: str = ""
    timing: Timing | None = None
    peak_bytes: float = float("nan")
    nbytes: float = 0.0
    flops: float = 0.0
    floor_s: float = float("nan")
    floor_kind: str = ""
    first_call_s: float = float("nan")  # the first warm-up call (compile time for `compile`)
    priority: int = BASE
    wall_s: float = 0.0  # wall time this case took in the run (inputs, warm-up, memory)
    vocab_key: str = "V"
    tokens_key: str = "N"
    extra: dict = field(default_factory=dict)

    @property
    def shape_str(self) -> str:
        return shape_str(self.shape)

    @property
    def ratio(self) -> float:
        if self.timing is None or not self.floor_s or self.floor_s != self.floor_s:
            return float("nan")
        return self.timing.median / self.floor_s

    @property
    def cut_by_budget(self) -> bool:
        return self.status == "skipped" and self.note == BUDGET_NOTE


# -- shared with bench/ ----------------------------------------------------------------


class WrongBackend(Exception):
    """A `kdkernels[<b>]` provider ran something other than backend <b>."""


@contextmanager
def backend_check(provider: str):
    """Run the block under `recording()`; raise WrongBackend when `provider`'s label is
    not what ran (a no-op for providers that are not ours)."""
    with recording() as calls:
        yield calls
    why = label_mismatch(provider, calls)
    if why is not None:
        raise WrongBackend(why)


def warm_up(case: Case, inputs: dict) -> tuple[Callable, Callable]:
    """(pre, fn) for `case` after one untimed call (compilation, autotuning, lazy imports),
    with the backend check. Raises what the provider raises (see `failure`)."""
    pre, fn = case.build(inputs)
    with backend_check(case.provider):
        fn(pre())
        synchronize(case.device)
    return pre, fn


def _is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None),
                                  getattr(torch, "OutOfMemoryError", None)) if t)
    return isinstance(e, oom_types + (MemoryError,)) or "out of memory" in str(e).lower()


def failure(e: BaseException) -> tuple[str, str]:
    """(status, note) of a case whose provider raised `e`."""
    if isinstance(e, Unavailable):
        return "unavailable", str(e)
    if type(e).__name__ == "BackendUnavailableError":
        return "unavailable", str(e).splitlines()[0]
    if isinstance(e, WrongBackend):
        return "error", str(e)
    if _is_oom(e):
        return "oom", "out of memory"
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
    return "error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"


# -- the runner ------------------------------------------------------------------------


def result_row(case: Case, floors: Floors | None = None) -> Result:
    """The row of `case`, not yet measured: its bytes, FLOPs and (given floors) floor."""
    nbytes, flops = case.cost()
    r = Result(op=case.op, family=case.spec.family, mode=case.mode, provider=case.provider,
               shape=dict(case.shape), dtype=dtype_name(case.dtype), nbytes=nbytes,
               flops=flops, priority=case.priority, vocab_key=case.spec.vocab_key,
               tokens_key=case.spec.tokens_key)
    if floors is not None:
        r.floor_s = floors.floor_s(nbytes, flops, case.dtype)
        r.floor_kind = floors.floor_kind(nbytes, flops, case.dtype)
    return r


class Runner:
    """Runs cases in order, reusing each op's inputs across providers and modes.

    `say(text)`, when given, is told which case is being measured (the progress bar)."""

    ROUNDS = 3

    def __init__(self, device: torch.device, floors: Floors, *, target_s: float,
                 min_reps: int, max_reps: int, say: Callable[[str], None] | None = None):
        self.device = device
        self.floors = floors
        self.target_s = target_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self.say = say
        self._inputs_key = None
        self._inputs = None
        self._broken: dict[tuple, tuple[str, str]] = {}  # (op, provider, shape, dtype) -> why

    def release(self) -> None:
        self._inputs_key = self._inputs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def skip(self, case: Case, why: str) -> Result:
        r = result_row(case)
        r.status, r.note = "skipped", why
        return r

    def run(self, case: Case) -> Result:
        return self.run_group([case])[0]

    def _tell(self, text: str) -> None:
        if self.say is not None:
            self.say(text)

    def run_group(self, cases: list[Case]) -> list[Result]:
        """Run cases that share inputs, interleaving their timed calls in rounds.

        Each case is prepared in turn (warm-up, peak memory, one timed call to size its
        repetitions); then `ROUNDS` rounds each time every case a few more calls. Load
        from elsewhere on the machine (a shared CPU) then falls on all providers alike
        instead of on whichever happened to run at that moment.
        """
        live = []
        results = []
        for case in cases:
            self._tell(f"{case.op} {case.provider} {case.mode} {shape_str(case.shape)}")
            t0 = time.monotonic()
            r = result_row(case, self.floors)
            prepared = self._guard(case, r, self._prepare, case, r, check_broken=True)
            r.wall_s += time.monotonic() - t0
            results.append(r)
            if prepared is not None:
                live.append((case, r, *prepared))
        for i in range(self.ROUNDS):
            for case, r, pre, fn, reps in live:
                if r.status != "ok":
                    continue
                self._tell(f"{case.op} {case.provider} {case.mode} {shape_str(case.shape)} "
                           f"(round {i + 1}/{self.ROUNDS})")
                n = max(1, -(-(reps - 1) // self.ROUNDS))  # ceil((reps - 1) / ROUNDS)
                t0 = time.monotonic()
                t = self._guard(case, r, time_fn, fn, device=self.device, pre=pre, warmup=0,
                                min_reps=n, max_reps=n, target_s=0.0)
                r.wall_s += time.monotonic() - t0
                if t is not None:
                    r.timing.times.extend(t.times)
        return results

    def _guard(self, case: Case, r: Result, f, *args, check_broken=False, **kwargs):
        """f(*args, **kwargs), turning a failure into the result's status (None returned)."""
        bkey = (case.op, case.provider, shape_key(case.shape), case.dtype)
        if check_broken and bkey in self._broken:  # failed in another mode: don't pay again
            r.status, r.note = self._broken[bkey]
            r.timing = None
            return None
        try:
            return f(*args, **kwargs)
        except Exception as e:  # one failing provider must not stop the run
            r.status, r.note = failure(e)
        r.timing = None
        self._broken[bkey] = (r.status, r.note)
        if r.status == "oom":
            self.release()
        return None

    def _prepare(self, case: Case, r: Result):
        """Inputs, warm-up (with the backend check), peak memory and one timed call;
        returns (pre, fn, reps)."""
        if self._inputs_key != case.input_key:
            self.release()
            self._inputs = case.make_inputs()
            self._inputs_key = case.input_key
        pre, fn = case.build(self._inputs)
        one = dict(device=self.device, pre=pre, min_reps=1, max_reps=1, target_s=0.0)
        if self.device.type == "cuda":
            warmup = 2 if case.provider == "compile" else 1
            with backend_check(case.provider):
                t = time_fn(fn, warmup=warmup, **one)
            r.first_call_s = t.warmup_times[0]
            r.peak_bytes = float(peak_memory(fn, device=self.device, pre=pre))
        else:
            # CPU: the memory call (profiled, untimed) doubles as the warm-up; compile gets
            # one more warm-up first, so the profiled call is never the compiling one.
            warmup = 1
            with backend_check(case.provider):
                if case.provider == "compile":
                    r.first_call_s = time_fn(fn, warmup=0, **one).times[0]
                    warmup = 2
                r.peak_bytes = float(peak_memory(fn, device=self.device, pre=pre))
            t = time_fn(fn, warmup=0, **one)
            t.warmup = warmup
        r.timing = t
        est = max(t.times[0], 1e-7)
        reps = int(min(self.max_reps, max(self.min_reps, -(-self.target_s // est))))
        return pre, fn, reps


# -- a run, within a time budget -------------------------------------------------------


def _groups(cases: list[Case]):
    """Consecutive cases sharing inputs and priority (one op at one shape)."""
    group: list[Case] = []
    for c in cases:
        if group and (c.input_key, c.priority) != (group[0].input_key, group[0].priority):
            yield group
            group = []
        group.append(c)
    if group:
        yield group


class _Estimates:
    """Wall seconds a group should take, from the op's base-shape group: each case's base
    wall time, scaled by its floor at this shape over its floor at the base shape (never
    below 1: small shapes still pay the warm-up and the timed rounds)."""

    def __init__(self, floors: Floors):
        self.floors = floors
        self._base: dict[tuple, tuple[float, float]] = {}  # (op, provider, mode, dtype) -> ...

    def _floor(self, case: Case) -> float:
        nbytes, flops = case.cost()
        return self.floors.floor_s(nbytes, flops, case.dtype)

    def learn(self, group: list[Case], results: list[Result]) -> None:
        for c, r in zip(group, results):
            self._base[(c.op, c.provider, c.mode, c.dtype)] = (r.wall_s, self._floor(c))

    def seconds(self, group: list[Case]) -> float:
        total = 0.0
        for c in group:
            known = self._base.get((c.op, c.provider, c.mode, c.dtype))
            if known is None:
                continue  # nothing to scale from (compile, or an op with no base run)
            wall, floor = known
            scale = self._floor(c) / floor if floor > 0 else 1.0
            total += wall * max(1.0, scale)
        return total


def run_cases(cases: list[Case], runner: Runner, *, deadline: float | None, progress=None,
              between=None) -> list[Result]:
    """Run `cases` in order, a group of cases sharing inputs at a time; `between()` is called
    once before the first group past the base shapes (the CLI runs the cpu-memory group
    there). With a `deadline` (time.monotonic()), groups past the base shapes that would
    not finish before it are cut (status skipped, note BUDGET_NOTE); the run goes on with
    the next group, which may be smaller."""
    results = []
    called = False
    estimates = _Estimates(runner.floors)
    for group in _groups(cases):
        if between is not None and not called and group[0].priority >= SWEEP:
            runner.release()
            between()
            called = True
        c = group[0]
        left = None if deadline is None else deadline - time.monotonic()
        if c.priority > BASE and left is not None and (
                left <= 0 or estimates.seconds(group) > left):
            if progress is not None:
                progress.set_postfix_str(f"cut: {c.op} {shape_str(c.shape)}", refresh=True)
            results.extend(runner.skip(case, BUDGET_NOTE) for case in group)
        else:
            rs = runner.run_group(group)
            if c.priority == BASE:
                estimates.learn(group, rs)
            results.extend(rs)
        if progress is not None:
            progress.update(len(group))
    if between is not None and not called:
        runner.release()
        between()
    runner.release()
    return results
