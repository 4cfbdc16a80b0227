"""Which cases run, and in what order: the selection both `kdkernels bench` and the
pytest-benchmark suites in `bench/` make from the registry (`kdkernels.bench.specs`).

Run order, which is also what the time budget cuts (`kdkernels.bench.runner`):
1. every op at its base shape, every provider but `compile` (never cut);
2. the sweep points, round-robin over the ops: the first point of every op's sweep,
   then the second, ... (the axes alternate within a sweep, see `Sweep.shapes`), so a
   budget that runs out trims every sweep alike instead of dropping the last ops;
3. `compile` (one graph per shape costs seconds to compile, ~15 s on a CPU).
"""

from __future__ import annotations

import fnmatch

import torch

from .model import BASE, COMPILE, MODES, PRESET_ALIASES, PRESETS, SWEEP, Case, OpSpec, shape_key
from .providers import provider_name
from .specs import all_specs


def op_matches(name: str, family: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p in ("all", "*") or p == family or fnmatch.fnmatchcase(name, p):
            return True
        if fnmatch.fnmatchcase(name, p + ".*"):
            return True
    return False


def provider_matches(provider: str, patterns: list[str] | None) -> bool:
    """Exact names (kdkernels[torch]: brackets are not a character class here), shell
    patterns, or a prefix before '[' (kdkernels = all our backends)."""
    if not patterns:
        return True
    for p in patterns:
        if provider == p or fnmatch.fnmatchcase(provider, p) or provider.startswith(p + "["):
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
        if preset not in PRESETS:
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


def _shapes_for(spec: OpSpec, preset: str, sweep: bool, overrides) -> list[tuple[dict, int]]:
    sw = spec.presets[preset]
    if overrides is None:
        return sw.shapes(sweep)
    out = []
    for ov in overrides:
        shp = dict(sw.base)
        shp.update({k: v for k, v in ov.items() if k in shp})
        if all(shape_key(shp) != shape_key(s) for s, _ in out):
            out.append((shp, BASE))
    return out


def _wanted(spec: OpSpec, prov: str, prio: int, mode: str, preset: str, device, explicit):
    """The default trimming of a full run (an explicit --providers keeps more)."""
    if preset == "cpu" and prio > BASE and mode != spec.modes[-1]:
        return False  # CPU sweeps: forward+backward only
    if explicit:
        return True
    if prov == "compile":
        if preset == "cpu" and not spec.compile_on_cpu:
            return False
        if prio > BASE and not spec.primary:
            return False  # one graph per shape: secondary variants compile the base only
    if prio == BASE:
        return True
    if device.type == "cuda" and prov == provider_name("torch"):
        return False  # the exact torch path on a GPU: the base shape is enough
    if preset == "cpu" and prov not in ("eager", provider_name("torch")):
        return False  # CPU sweeps: ours vs eager; peers and compile at the base shape
    return True


def select_cases(
    device: torch.device,
    *,
    ops: list[str] | None = None,
    providers: list[str] | None = None,
    shapes: str | None = None,
    modes: list[str] | None = None,
    dtypes: list[torch.dtype] | None = None,
) -> list[Case]:
    """The cases to run, in run order (see the module docstring)."""
    preset, sweep, overrides = parse_shapes(shapes, device)
    if dtypes is None:
        dtypes = [torch.bfloat16] if preset == "gpu" else [torch.float32]
    modes = modes or list(MODES)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"--modes: unknown mode {m!r} (forward, backward, forward+backward)")
    specs = all_specs()
    cases: list[tuple[tuple, Case]] = []
    for op_idx, spec in enumerate(specs):
        if ops is not None and not op_matches(spec.name, spec.family, ops):
            continue
        shape_list = _shapes_for(spec, preset, sweep and (device.type == "cuda" or spec.primary),
                                 overrides)
        for prov, factory in spec.providers(device).items():
            if not provider_matches(prov, providers):
                continue
            for rank, (shape, prio) in enumerate(shape_list):
                for dt in dtypes:
                    for mode in spec.modes:
                        if mode not in modes or not _wanted(spec, prov, prio, mode, preset,
                                                            device, providers):
                            continue
                        p = COMPILE if prov == "compile" else prio
                        key = (p, rank if p != BASE else 0, op_idx, rank, str(dt), prov,
                               MODES.index(mode))
                        cases.append((key, Case(spec, prov, factory, shape, dt, mode, device,
                                                p)))
    cases.sort(key=lambda kc: kc[0])
    return [c for _, c in cases]


__all__ = ["BASE", "COMPILE", "SWEEP", "Case", "op_matches", "parse_shapes", "provider_matches",
           "select_cases"]
