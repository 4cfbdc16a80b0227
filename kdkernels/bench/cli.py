"""`kdkernels bench` (also `python -m kdkernels bench`, `make bench`)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shlex
import sys
import time

import torch

from . import cpumem, vocabpar
from .cases import provider_matches, select_cases
from .floors import measure_floors
from .model import MODES, parse_dtype
from .providers import versions
from .report import budget_lines, markdown, write_csv, write_plots
from .runner import Runner, run_cases

_MODE_ALIASES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward",
                 "fwdbwd": "forward+backward"}
CPU_TIME_BUDGET_S = 480.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdkernels bench",
        description="Benchmark every kdkernels op against eager PyTorch, torch.compile and "
        "installed peers (Liger-Kernel, TRL's formula, POT), with the device's copy/GEMM floor "
        "measured in the same run. Writes results.csv, results.md and plots/ under --out.",
    )
    p.add_argument("--ops", help="comma-separated op names (kd.jsd), families (kd, fused_linear, "
                   "pld, sinkhorn, topk, graph) or shell patterns; 'cpu-memory' or "
                   "'cpu-memory:PATTERN' adds the fresh-process memory group (default: all ops, "
                   "plus cpu-memory when the device is a CPU); 'vocab-parallel' or "
                   "'vocab-parallel:PATTERN' adds the 2-rank communication group (only "
                   "on request)")
    p.add_argument("--shapes", help="a preset: cpu|small, gpu|llm, tiny (append ':base' to skip "
                   "the sweeps), or overrides of each op's base shape such as "
                   "'N=4096,V=32000;N=8192,V=32000' (default: the preset for the device)")
    p.add_argument("--providers", help="comma-separated shell patterns over provider names: "
                   "kdkernels (all our backends), kdkernels[torch|triton|cuda], eager, compile, "
                   "liger, liger-chunked, trl-formula, pot (default: all that apply)")
    p.add_argument("--modes", help="comma-separated: fwd, bwd, fwd+bwd (default: all)")
    p.add_argument("--dtypes", help="comma-separated: fp32, bf16, fp16 (default: fp32 on the "
                   "cpu preset, bf16 on the gpu preset)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    p.add_argument("--out", default=os.path.join("bench", "out"),
                   help="output folder (default bench/out); 'results' means "
                   "bench/results/<device>-<date>/, the folder for results worth committing")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds the run should fit in (default "
                   f"{CPU_TIME_BUDGET_S:g} on a CPU, none on a GPU; 0: none). Every op's base "
                   "shape (and the cpu-memory group) always runs; sweep points and compile "
                   "cases that would not fit are cut, every sweep alike, and listed in "
                   "results.md and on stdout")
    p.add_argument("--target-time", type=float, default=None,
                   help="seconds of timed calls per case (default 0.2 CPU, 0.5 GPU)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _split(arg: str | None) -> list[str] | None:
    if not arg:
        return None
    return [x.strip() for x in arg.split(",") if x.strip()]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class _Progress:
    """tqdm when installed, else a line every few cases."""

    def __init__(self, total: int, quiet: bool):
        self._bar = None
        self.n, self.total, self.quiet = 0, total, quiet
        if quiet:
            return
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="kdkernels bench", unit="case", file=sys.stderr,
                             dynamic_ncols=True)
        except ImportError:
            pass

    def set_postfix_str(self, s: str, refresh: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(s[:80], refresh=refresh)

    def update(self, k: int = 1) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
        elif not self.quiet and (self.n % 10 == 0 or self.n == self.total):
            print(f"kdkernels bench: {self.n}/{self.total} cases", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _ops_split(ops: list[str] | None, device: torch.device):
    """(timing op patterns or None = all, cpu-memory patterns, vocab-parallel patterns);
    for each group None = skip, [] = all. vocab-parallel runs only on request."""
    if ops is None:
        return None, ([] if device.type == "cpu" else None), None
    timing, groups = [], {"cpu-memory": None, "vocab-parallel": None}
    for o in ops:
        name, _, pat = o.partition(":")
        if name in groups:
            groups[name] = groups[name] if groups[name] is not None else []
            if pat:
                groups[name].append(pat)
        else:
            timing.append(o)
    return timing, groups["cpu-memory"], groups["vocab-parallel"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t_start = time.monotonic()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("kdkernels bench: --device cuda but no CUDA device is visible", file=sys.stderr)
            return 2
    modes = None
    if args.modes:
        modes = [_MODE_ALIASES.get(m, m) for m in _split(args.modes)]
        bad = [m for m in modes if m not in MODES]
        if bad:
            print(f"kdkernels bench: unknown mode(s) {bad}; use fwd, bwd, fwd+bwd", file=sys.stderr)
            return 2
    try:
        dtypes = [parse_dtype(d) for d in _split(args.dtypes)] if args.dtypes else None
        op_pats, mem_pats, vp_pats = _ops_split(_split(args.ops), device)
        cases = select_cases(device, ops=op_pats, providers=_split(args.providers),
                             shapes=args.shapes, modes=modes, dtypes=dtypes) \
            if op_pats is None or op_pats else []
    except ValueError as e:
        print(f"kdkernels bench: {e}", file=sys.stderr)
        return 2
    mem_cases = cpumem.select(mem_pats) if mem_pats is not None else []
    if args.providers and mem_cases:
        mem_cases = [c for c in mem_cases if provider_matches(c.provider, _split(args.providers))]
    vp_tiny = (args.shapes or "").startswith("tiny")
    vp_cases = vocabpar.select(vp_pats, vp_tiny) if vp_pats is not None else []
    if args.providers:  # each case's backend (kdkernels[torch], [triton], [cuda])
        vp_cases = [c for c in vp_cases if provider_matches(c.provider, _split(args.providers))]
    if args.list:
        for c in cases:
            print(c.label())
        for c in mem_cases:
            print(f"cpu-memory {c.id} {c.shape}")
        for c in vp_cases:
            print(f"vocab-parallel {c.id} {c.shape} V={c.vocabs[0]},{c.vocabs[1]}")
        print(f"{len(cases)} timing cases, {len(mem_cases)} cpu-memory cases, "
              f"{len(vp_cases)} vocab-parallel cases")
        return 0

    now = _dt.datetime.now(_dt.timezone.utc)
    dev_name = device_name(device)
    out = args.out
    if out == "results":
        out = os.path.join("bench", "results", f"{slug(dev_name)}-{now:%Y-%m-%d}")
    os.makedirs(out, exist_ok=True)
    budget = args.time_budget
    if budget is None:
        budget = CPU_TIME_BUDGET_S if device.type == "cpu" else 0.0
    deadline = t_start + budget if budget and budget > 0 else None
    target = args.target_time or (0.5 if device.type == "cuda" else 0.2)

    progress = _Progress(len(cases) + len(mem_cases) + len(vp_cases), args.quiet)
    progress.set_postfix_str("measuring the floor", refresh=True)
    floors = measure_floors(device, quick=(args.shapes or "").startswith("tiny"))
    runner = Runner(device, floors, target_s=target, min_reps=5 if device.type == "cuda" else 3,
                    max_reps=100 if device.type == "cuda" else 20,
                    say=lambda text: progress.set_postfix_str(text, refresh=True))
    mem_results: list = []
    vp_results: list = []

    def run_groups():
        mem_results.extend(cpumem.run_all(mem_cases, progress))
        vp_results.extend(vocabpar.run_all(vp_cases, vp_tiny, vp_pats, progress=progress))

    try:
        results = run_cases(cases, runner, deadline=deadline, progress=progress,
                            between=run_groups if mem_cases or vp_cases else None)
    finally:
        progress.close()
    meta = {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": dev_name,
        "device_type": device.type,
        "versions": versions(),
        "wall_s": time.monotonic() - t_start,
        "command": "kdkernels bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                           else sys.argv[1:])),
    }
    csv_path = os.path.join(out, "results.csv")
    md_path = os.path.join(out, "results.md")
    write_csv(csv_path, meta, floors, results, mem_results, vp_results)
    plots = [] if args.no_plots else write_plots(os.path.join(out, "plots"), results)
    md = markdown(meta, floors, results, mem_results, vp_results)
    if plots:
        md += "\n## Plots\n\n" + "\n".join(
            f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots) + "\n"
    with open(md_path, "w") as f:
        f.write(md)
    head = md.split("\n## All results")[0]
    print(head)
    cut = budget_lines(results)
    if cut:
        print("\n".join(cut))
    n_ok = sum(r.status == "ok" for r in results)
    n_cut = sum(r.cut_by_budget for r in results)
    print(f"{n_ok}/{len(results)} timing cases measured"
          + (f" ({n_cut} cut by the {budget:g} s time budget)" if n_cut else "")
          + f", {len(mem_results)} cpu-memory cases, {len(vp_results)} vocab-parallel cases; "
          f"{time.monotonic() - t_start:.0f} s. Wrote {csv_path}, {md_path}"
          + (f", {len(plots)} plots in {os.path.join(out, 'plots')}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
