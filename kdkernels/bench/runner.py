"""Select cases, run them through the harness, and collect one result row per case."""

from __future__ import annotations

import fnmatch
import gc
import time
import traceback
from dataclasses import dataclass, field

import torch

from .cases import MODES, PRESET_ALIASES, Case, OpSpec, _key, all_specs, dtype_name, shape_str
from .floors import Floors
from .harness import Timing, peak_memory, time_fn
from .providers import Unavailable, provider_name


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
    priority: int = 0
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


def _match(name: str, family: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p in ("all", "*") or p == family or fnmatch.fnmatchcase(name, p):
            return True
        if fnmatch.fnmatchcase(name, p + ".*"):
            return True
    return False


def provider_matches(provider: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    for p in patterns:
        if fnmatch.fnmatchcase(provider, p) or provider.startswith(p + "["):
            return True
    return False


def parse_shapes(arg: str | None, device: torch.device) -> tuple[str, bool, list[dict] | None]:
    """--shapes: a preset (cpu|small, gpu|llm, tiny), optionally ':base' (no sweep), or
    explicit overrides 'N=4096,V=32000;N=8192' applied to each op's base shape.

    Returns (preset, sweep, overrides).
    """
    default = "gpu" if device.type == "cuda" else "cpu"
    if not arg:
        return default, True, None
    preset, _, mod = arg.partition(":")
    preset = PRESET_ALIASES.get(preset, preset)
    if "=" not in arg:
        if preset not in ("cpu", "gpu", "tiny"):
            raise ValueError(f"--shapes: unknown preset {preset!r} (cpu|small, gpu|llm, tiny)")
        if mod not in ("", "base"):
            raise ValueError(f"--shapes: unknown modifier {mod!r} (only ':base')")
        return preset, mod != "base", None
    overrides = []
    for part in arg.split(";"):
        shp = {}
        for kv in part.split(","):
            k, eq, v = kv.partition("=")
            if not eq:
                raise ValueError(f"--shapes: expected KEY=VALUE, got {kv!r}")
            shp[k.strip()] = int(v)
        overrides.append(shp)
    return default, False, overrides


def select_cases(
    device: torch.device,
    *,
    ops: list[str] | None = None,
    providers: list[str] | None = None,
    shapes: str | None = None,
    modes: list[str] | None = None,
    dtypes: list[torch.dtype] | None = None,
) -> list[Case]:
    """The cases to run, in run order (base shapes first, then sweeps, then compile)."""
    preset, sweep, overrides = parse_shapes(shapes, device)
    if dtypes is None:
        dtypes = [torch.bfloat16] if preset == "gpu" else [torch.float32]
    modes = modes or list(MODES)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r} (forward, backward, forward+backward)")
    cases: list[Case] = []
    specs = [s for s in all_specs() if ops is None or _match(s.name, s.family, ops)]
    for spec in specs:
        shape_list = _shapes_for(spec, preset, sweep and (device.type == "cuda" or spec.primary),
                                 overrides)
        provs = spec.providers(device)
        for prov, factory in provs.items():
            if not provider_matches(prov, providers):
                continue
            if prov == "compile" and preset == "cpu" and not (spec.compile_on_cpu or providers):
                continue
            for shape, prio in shape_list:
                if prov == "compile" and prio > 0 and not spec.primary and not providers:
                    continue  # one graph per shape: secondary variants compile the base only
                if device.type == "cuda" and prio > 0 and not providers and prov == provider_name(
                        "torch"):
                    continue  # the exact torch path on a GPU: the base shape is enough
                if preset == "cpu" and prio > 0 and not providers and prov not in (
                        "eager", provider_name("torch")):
                    continue  # CPU sweeps: ours vs eager; peers and compile at the base shape
                for dt in dtypes:
                    for mode in spec.modes:
                        if mode not in modes:
                            continue
                        if preset == "cpu" and prio > 0 and mode != spec.modes[-1]:
                            continue  # CPU sweeps: forward+backward only (10-minute budget)
                        p = 2 if prov == "compile" else prio
                        cases.append(Case(spec, prov, factory, shape, dt, mode, device, p))
    order = {s.name: i for i, s in enumerate(all_specs())}
    cases.sort(key=lambda c: (c.priority, order[c.op], _key(c.shape) != _key(
        c.spec.presets[preset].base), str(c.shape), str(c.dtype), c.provider,
        MODES.index(c.mode)))
    return cases


def _shapes_for(spec: OpSpec, preset: str, sweep: bool, overrides) -> list[tuple[dict, int]]:
    sw = spec.presets[preset]
    if overrides is None:
        return sw.shapes(sweep)
    out = []
    for ov in overrides:
        shp = dict(sw.base)
        shp.update({k: v for k, v in ov.items() if k in shp})
        if all(_key(shp) != _key(s) for s, _ in out):
            out.append((shp, 0))
    return out


def _is_oom(e: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch.cuda, "OutOfMemoryError", None),
                                  getattr(torch, "OutOfMemoryError", None)) if t)
    return isinstance(e, oom_types + (MemoryError,)) or "out of memory" in str(e).lower()


def _result_for(case: Case) -> Result:
    nbytes, flops = case.cost()
    return Result(op=case.op, family=case.spec.family, mode=case.mode, provider=case.provider,
                  shape=dict(case.shape), dtype=dtype_name(case.dtype), nbytes=nbytes,
                  flops=flops, priority=case.priority, vocab_key=case.spec.vocab_key,
                  tokens_key=case.spec.tokens_key)


class Runner:
    """Runs cases in order, reusing each op's inputs across providers and modes."""

    def __init__(self, device: torch.device, floors: Floors, *, target_s: float,
                 min_reps: int, max_reps: int):
        self.device = device
        self.floors = floors
        self.target_s = target_s
        self.min_reps = min_reps
        self.max_reps = max_reps
        self._inputs_key = None
        self._inputs = None
        self._broken: dict[tuple, str] = {}  # (op, provider, shape, dtype) -> reason

    def release(self) -> None:
        self._inputs_key = self._inputs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def skip(self, case: Case, why: str) -> Result:
        r = _result_for(case)
        r.status, r.note = "skipped", why
        return r

    def run(self, case: Case) -> Result:
        return self.run_group([case])[0]

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
            t0 = time.monotonic()
            r = _result_for(case)
            r.floor_s = self.floors.floor_s(r.nbytes, r.flops, case.dtype)
            r.floor_kind = self.floors.floor_kind(r.nbytes, r.flops, case.dtype)
            prepared = self._guard(case, r, self._prepare, case, r, check_broken=True)
            r.wall_s += time.monotonic() - t0
            results.append(r)
            if prepared is not None:
                live.append((case, r, *prepared))
        for _ in range(self.ROUNDS):
            for case, r, pre, fn, reps in live:
                if r.status != "ok":
                    continue
                n = max(1, -(-(reps - 1) // self.ROUNDS))  # ceil((reps - 1) / ROUNDS)
                t0 = time.monotonic()
                t = self._guard(case, r, time_fn, fn, device=self.device, pre=pre, warmup=0,
                                min_reps=n, max_reps=n, target_s=0.0)
                r.wall_s += time.monotonic() - t0
                if t is not None:
                    r.timing.times.extend(t.times)
        return results

    ROUNDS = 3

    def _guard(self, case: Case, r: Result, f, *args, check_broken=False, **kwargs):
        """f(*args, **kwargs), turning a failure into the result's status (None returned)."""
        bkey = (case.op, case.provider, _key(case.shape), case.dtype)
        if check_broken and bkey in self._broken:  # failed in another mode: don't pay again
            r.status, r.note = self._broken[bkey]
            r.timing = None
            return None
        try:
            return f(*args, **kwargs)
        except Unavailable as e:
            r.status, r.note = "unavailable", str(e)
        except Exception as e:  # one failing provider must not stop the run
            if _is_oom(e):
                r.status, r.note = "oom", "out of memory"
            elif type(e).__name__ == "BackendUnavailableError":
                r.status, r.note = "unavailable", str(e).splitlines()[0]
            else:
                r.status = "error"
                tb = traceback.extract_tb(e.__traceback__)
                where = f" at {tb[-1].filename.split('/')[-1]}:{tb[-1].lineno}" if tb else ""
                r.note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{where}"
        r.timing = None
        self._broken[bkey] = (r.status, r.note)
        if r.status == "oom":
            self.release()
        return None

    def _prepare(self, case: Case, r: Result):
        """Inputs, warm-up, peak memory and one timed call; returns (pre, fn, reps)."""
        if self._inputs_key != case.input_key:
            self.release()
            self._inputs = case.make_inputs()
            self._inputs_key = case.input_key
        pre, fn = case.build(self._inputs)
        one = dict(device=self.device, pre=pre, min_reps=1, max_reps=1, target_s=0.0)
        if self.device.type == "cuda":
            warmup = 2 if case.provider == "compile" else 1
            t = time_fn(fn, warmup=warmup, **one)
            r.first_call_s = t.warmup_times[0]
            r.peak_bytes = float(peak_memory(fn, device=self.device, pre=pre))
        else:
            # CPU: the memory call (profiled, untimed) doubles as the warm-up; compile gets
            # one more warm-up first, so the profiled call is never the compiling one.
            warmup = 1
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


def _groups(cases: list[Case]):
    """Consecutive cases sharing inputs and priority."""
    group: list[Case] = []
    for c in cases:
        if group and (c.input_key, c.priority) != (group[0].input_key, group[0].priority):
            yield group
            group = []
        group.append(c)
    if group:
        yield group


def run_cases(cases: list[Case], runner: Runner, *, deadline: float | None, progress=None,
              between=None) -> list[Result]:
    """Run `cases` in order, a group of cases sharing inputs at a time; `between()` is called
    once before the first case of priority >= 1 (the CLI runs the cpu-memory group there)."""
    results = []
    called = False
    for group in _groups(cases):
        if between is not None and not called and group[0].priority >= 1:
            runner.release()
            between()
            called = True
        if progress is not None:
            c = group[0]
            progress.set_postfix_str(
                f"{c.op} {shape_str(c.shape)} ({len(group)} cases)"[:70], refresh=True)
        if deadline is not None and time.monotonic() > deadline:
            results.extend(runner.skip(c, "time budget spent (--time-budget)") for c in group)
        else:
            results.extend(runner.run_group(group))
        if progress is not None:
            progress.update(len(group))
    if between is not None and not called:
        runner.release()
        between()
    runner.release()
    return results
