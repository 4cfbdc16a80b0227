"""Outputs of a run: a tidy CSV, a markdown table, and PNG plots.

CSV (`results.csv`): one row per (case, metric), every row stamped with the date, the
device, and the versions, so files from different runs concatenate:
    date, device, device_type, versions, group, op, mode, provider, shape, dtype,
    metric, value, unit, status, note
groups: `floor` (copy bandwidth, GEMM throughput), `timing` (the suite), `cpu-memory`,
`vocab-parallel`.
metrics, timing: time_median, time_q25, time_q75, time_iqr, time_min (ms, warm-up
excluded), reps, first_call (s, compile only), peak_memory (MiB allocated during one call
above what existed before), bytes and flops (what the op must move / compute), floor (ms),
time_over_floor, case_wall (s the case took in the run). cpu-memory: peak_delta (MiB of
peak RSS above the inputs), grad, inputs, ratio_to_grad, bound, time_median (s),
time_vs_eager, pass (1/0). vocab-parallel (one shape per vocabulary size): bytes_per_step
(B all-reduced per rank per forward+backward step, the largest over the ranks),
bytes_per_row, allreduce_calls, time_rank<r> (s per step on rank r); on the larger V's
shape also bytes_ratio (larger V ÷ smaller V: 1 when the bytes do not depend on V) and
pass (1/0). A case that did not run has one `status` row saying why.
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict

from .cpumem import MemResult
from .floors import Floors
from .model import MODES, shape_str
from .runner import BUDGET_NOTE, Result
from .vocabpar import VPResult

MIB = float(1 << 20)
CSV_FIELDS = ("date", "device", "device_type", "versions", "group", "op", "mode", "provider",
              "shape", "dtype", "metric", "value", "unit", "status", "note")


def _fmt_time(s: float) -> str:
    if s != s:
        return "–"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def _fmt_mib(b: float) -> str:
    if b != b:
        return "–"
    if b >= (1 << 30):
        return f"{b / (1 << 30):.2f} GiB"
    return f"{b / MIB:.3g} MiB"


def _fmt_ratio(x: float) -> str:
    if x != x or math.isinf(x):
        return "–"
    return f"{x:.3g}×"


# -- CSV -------------------------------------------------------------------------------


def write_csv(path: str, meta: dict, floors: Floors, results: list[Result],
              mem: list[MemResult], vp: list[VPResult] | None = None) -> None:
    stamp = {
        "date": meta["date"],
        "device": meta["device"],
        "device_type": meta["device_type"],
        "versions": ";".join(f"{k}={v}" for k, v in meta["versions"].items()),
    }
    rows = []

    def add(group, op, mode, provider, shape, dtype, metric, value, unit, status="ok", note=""):
        rows.append({**stamp, "group": group, "op": op, "mode": mode, "provider": provider,
                     "shape": shape, "dtype": dtype, "metric": metric,
                     "value": "" if value is None else f"{value:.6g}", "unit": unit,
                     "status": status, "note": note})

    add("floor", "copy", "", "torch", f"bytes={floors.copy_size}", "float32", "bandwidth",
        floors.copy_bytes_per_s / 1e9, "GB/s", note="bytes moved (read + write) per second")
    for dt, v in floors.gemm_flops_per_s.items():
        add("floor", "gemm", "", "torch", f"M=N=K={floors.gemm_size}", dt, "throughput",
            v / 1e12, "TFLOP/s")
    for r in results:
        base = ("timing", r.op, r.mode, r.provider, r.shape_str, r.dtype)
        if r.status != "ok" or r.timing is None:
            add(*base, "status", None, "", r.status, r.note)
            continue
        t = r.timing
        add(*base, "time_median", t.median * 1e3, "ms")
        add(*base, "time_q25", t.q25 * 1e3, "ms")
        add(*base, "time_q75", t.q75 * 1e3, "ms")
        add(*base, "time_iqr", t.iqr * 1e3, "ms")
        add(*base, "time_min", t.min * 1e3, "ms")
        add(*base, "reps", t.reps, "calls")
        if r.first_call_s == r.first_call_s:
            add(*base, "first_call", r.first_call_s, "s", note="includes compilation")
        add(*base, "peak_memory", r.peak_bytes / MIB, "MiB")
        add(*base, "bytes", r.nbytes, "B")
        add(*base, "flops", r.flops, "FLOP")
        add(*base, "floor", r.floor_s * 1e3, "ms", note=r.floor_kind)
        add(*base, "time_over_floor", r.ratio, "x")
        add(*base, "case_wall", r.wall_s, "s")
    for m in mem:
        c = m.case
        base = ("cpu-memory", c.op, "forward+backward", c.provider, shape_str(c.shape), "float32")
        if m.status != "ok":
            add(*base, "status", None, "", m.status, m.note)
            continue
        add(*base, "peak_delta", m.peak_delta / MIB, "MiB", note=m.note or "peak RSS above inputs")
        add(*base, "grad", m.grad_bytes / MIB, "MiB")
        add(*base, "inputs", m.input_bytes / MIB, "MiB")
        add(*base, "ratio_to_grad", m.ratio_to_grad, "x")
        b = c.bound_bytes(m.grad_bytes)
        if b is not None:
            add(*base, "bound", b / MIB, "MiB", note=f"{c.bound_text()} ({c.source})")
        add(*base, "time_median", m.time_s, "s",
            note=f"{len(m.times)} timed call(s) after {c.warmup} warm-up")
        if c.compare:
            add(*base, f"time_vs_{c.compare}", m.time_vs_compare, "x")
        if m.passed is not None:
            add(*base, "pass", 1.0 if m.passed else 0.0, "bool")
    for r in vp or []:
        c = r.case
        prov = _vp_provider(r)
        for v in c.vocabs:
            base = ("vocab-parallel", c.op, "forward+backward", prov, shape_str(c.shape_at(v)),
                    "float32")
            if r.status != "ok":
                add(*base, "status", None, "", r.status, r.note)
                continue
            add(*base, "bytes_per_step", max(r.bytes[str(v)]), "B",
                note="all-reduced per rank per forward+backward step "
                     f"(ranks: {', '.join(map(str, r.bytes[str(v)]))})")
            add(*base, "bytes_per_row", max(r.bytes[str(v)]) / c.shape["N"], "B")
            add(*base, "allreduce_calls", max(r.calls[str(v)]), "calls")
            for rank, t in enumerate(r.times[str(v)]):
                add(*base, f"time_rank{rank}", t, "s",
                    note=f"median of {c.reps} step(s) after 1 warm-up")
            if v == c.vocabs[-1]:
                add(*base, "bytes_ratio", r.ratio, "x", note=f"V={v} ÷ V={c.vocabs[0]}")
                add(*base, "pass", 1.0 if r.passed else 0.0, "bool",
                    note="bytes independent of V (and equal on every rank)")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)


# -- markdown --------------------------------------------------------------------------


def _vp_provider(r: VPResult) -> str:
    """The provider column of a vocab-parallel row: the backend recorded while it ran (the
    one asked for, on a row that did not run), the collective backend and the number of
    ranks (kdkernels[torch] gloo×2)."""
    return r.provider


def _fmt_bytes(b: float) -> str:
    """Exact byte counts (the vocab-parallel check compares them exactly)."""
    return "–" if b != b else f"{b:,.0f} B"


def _rank_times(r: VPResult, v: int) -> str:
    return " / ".join(_fmt_time(t) for t in r.rank_times(v))


def vocab_parallel_lines(vp: list[VPResult]) -> list[str]:
    """The markdown section of the vocab-parallel group ([] when it did not run)."""
    if not vp:
        return []
    lines = ["", "## vocab-parallel: bytes communicated per step", "",
             "forward+backward with `vocab_parallel=` on 2 ranks (each holds V/2 columns), "
             "float32 inputs; bytes all-reduced per rank per step "
             "(`kdkernels.parallel.count_bytes()`), at two vocabulary sizes; time per step "
             "on each rank (median); the provider is the backend recorded while the steps "
             "ran. Check: the bytes are the same at both V (O(N)).", "",
             "| op | provider | shape | V | bytes / step / rank | bytes / row | ratio | "
             "time / step / rank | check |", "|---|---|---|---|---|---|---|---|---|"]
    for r in vp:
        c = r.case
        small, large = c.vocabs
        shp = shape_str(c.shape)
        if r.status != "ok":
            lines.append(f"| {c.op} | {_vp_provider(r)} | {shp} | {small} → {large} | "
                         f"{r.status}: {r.note.replace('|', '/')} | | | | |")
            continue

        check = {True: "PASS", False: "**FAIL**", None: ""}[r.passed]
        lines.append(
            f"| {c.op} | {_vp_provider(r)} | {shp} | {small} → {large} | "
            f"{_fmt_bytes(r.step_bytes(small))} → {_fmt_bytes(r.step_bytes(large))} | "
            f"{r.bytes_per_row(small):g} → {r.bytes_per_row(large):g} | {r.ratio:.3g} | "
            f"{_rank_times(r, small)} → {_rank_times(r, large)} | {check} |")
    return lines


def _cell(r: Result) -> str:
    if r.status != "ok" or r.timing is None:
        return {"oom": "OOM", "error": "error", "skipped": "not run"}.get(r.status, r.status)
    t = r.timing
    return (f"{_fmt_time(t.median)} ±{_fmt_time(t.iqr / 2)} · {_fmt_ratio(r.ratio)} · "
            f"{_fmt_mib(r.peak_bytes)}")


def _providers_in(rows: list[Result]) -> list[str]:
    order = []
    for r in rows:
        if r.provider not in order:
            order.append(r.provider)
    ours = sorted(p for p in order if p.startswith("kdkernels"))
    return ours + [p for p in order if not p.startswith("kdkernels")]


def _wide_table(rows: list[Result], lead_cols: list[str], lead) -> list[str]:
    provs = [p for p in _providers_in(rows)
             if any(r.provider == p and r.status == "ok" for r in rows)]
    groups: OrderedDict = OrderedDict()
    for r in rows:
        groups.setdefault(lead(r), {})[r.provider] = r
    out = ["| " + " | ".join(lead_cols + provs) + " |",
           "|" + "---|" * (len(lead_cols) + len(provs))]
    for key, by_p in groups.items():
        if not any(by_p.get(p) is not None and by_p[p].status == "ok" for p in provs):
            continue
        cells = [_cell(by_p[p]) if p in by_p else "" for p in provs]
        out.append("| " + " | ".join(list(key) + cells) + " |")
    return out


def summary_rows(results: list[Result]) -> list[Result]:
    """forward+backward (forward for forward-only ops) at each op's base shape."""
    out = []
    ops = list(OrderedDict.fromkeys(r.op for r in results))
    for op in ops:
        base = _base_shape([r for r in results if r.op == op])
        rs = [r for r in results if r.op == op and r.shape == base]
        modes = {r.mode for r in rs}
        mode = "forward+backward" if "forward+backward" in modes else "forward"
        out.extend(r for r in rs if r.mode == mode)
    return out


def markdown(meta: dict, floors: Floors, results: list[Result], mem: list[MemResult],
             vp: list[VPResult] | None = None) -> str:
    v = meta["versions"]
    lines = [
        "# kdkernels benchmark",
        "",
        f"- device: **{meta['device']}** ({meta['device_type']})",
        f"- date: {meta['date']}; run time {meta.get('wall_s', float('nan')):.0f} s; "
        f"command: `{meta.get('command', '')}`",
        "- versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
        "",
        "Each cell: median time ±half the interquartile range · time ÷ floor · peak memory "
        "allocated during the call. "
        "Floor = max(bytes ÷ copy bandwidth, matmul FLOPs ÷ GEMM throughput), both "
        "measured below in this run; 1× is the speed of light on this device.",
        "",
        "## Floors",
        "",
        "| floor | size | measured |",
        "|---|---|---|",
        f"| copy bandwidth (bytes read + written) | {_fmt_mib(floors.copy_size)} | "
        f"{floors.copy_bytes_per_s / 1e9:.1f} GB/s |",
    ]
    for dt, val in floors.gemm_flops_per_s.items():
        lines.append(f"| GEMM {dt} | {floors.gemm_size}³ | {val / 1e12:.3g} TFLOP/s |")
    summ = summary_rows(results)
    if summ:
        lines += ["", "## Summary: every op at its base shape",
                  "", "forward+backward (the Sinkhorn solver: forward).", ""]
        lines += _wide_table(summ, ["op", "mode", "shape", "dtype"],
                             lambda r: (r.op, r.mode, r.shape_str, r.dtype))
    if mem:
        lines += ["", "## cpu-memory: the CPU fallback at real sizes", "",
                  "forward+backward in a fresh process per case, float32; peak Δ = peak RSS "
                  "above the RSS after the inputs were built (gradients included).", "",
                  "| op | provider | shape | peak Δ | grad | Δ ÷ grad | bound | time | vs "
                  "eager | check |", "|---|---|---|---|---|---|---|---|---|---|"]
        for m in mem:
            c = m.case
            if m.status != "ok":
                lines.append(f"| {c.op} | {c.provider} | {shape_str(c.shape)} | "
                             f"{m.status}: {m.note} | | | {c.bound_text()} | | | |")
                continue
            check = {True: "PASS", False: "**FAIL**", None: ""}[m.passed]
            vs = _fmt_ratio(m.time_vs_compare) if c.compare else ""
            lines.append(
                f"| {c.op} | {c.provider} | {shape_str(c.shape)} | {_fmt_mib(m.peak_delta)} | "
                f"{_fmt_mib(m.grad_bytes)} | {m.ratio_to_grad:.3f} | {c.bound_text()} | "
                f"{_fmt_time(m.time_s)} | {vs} | {check} |")
    lines += vocab_parallel_lines(vp or [])
    ops = list(OrderedDict.fromkeys(r.op for r in results))
    if ops:
        lines += ["", "## All results", ""]
    for op in ops:
        rs = [r for r in results if r.op == op]
        rs.sort(key=lambda r: (MODES.index(r.mode), r.priority == 2))
        table = _wide_table(rs, ["mode", "shape", "dtype"],
                            lambda r: (r.mode, r.shape_str, r.dtype))
        if len(table) > 2:
            lines += [f"### {op}", ""] + table + [""]
    missing = OrderedDict()
    for r in results:
        if r.status != "ok" and not r.cut_by_budget:
            missing.setdefault((r.op, r.provider, r.status, r.note), 0)
            missing[(r.op, r.provider, r.status, r.note)] += 1
    if missing:
        lines += ["## Not measured", "", "| op | provider | status | why | cases |",
                  "|---|---|---|---|---|"]
        for (op, prov, st, note), n in missing.items():
            lines.append(f"| {op} | {prov} | {st} | {note.replace('|', '/')} | {n} |")
    cut = budget_lines(results)
    if cut:
        lines += [""] + cut
    return "\n".join(lines) + "\n"


def budget_lines(results: list[Result]) -> list[str]:
    """The cases the time budget cut, one row per op, shape and dtype ([] if none)."""
    cut: OrderedDict = OrderedDict()  # (op, shape, dtype) -> {mode: [providers]}
    for r in results:
        if r.cut_by_budget:
            by_mode = cut.setdefault((r.op, r.shape_str, r.dtype), OrderedDict())
            by_mode.setdefault(r.mode, []).append(r.provider)
    if not cut:
        return []
    n = sum(r.cut_by_budget for r in results)
    lines = ["## Cut by the time budget", "",
             f"{n} case(s) {BUDGET_NOTE}: every op kept its base shape; these sweep points "
             "and compile cases did not fit (a longer --time-budget, or fewer --ops, runs "
             "them).", "", "| op | shape | dtype | modes | providers |", "|---|---|---|---|---|"]
    for (op, shp, dt), by_mode in cut.items():
        rows: OrderedDict = OrderedDict()  # providers -> modes cut with exactly those
        for mode, provs in by_mode.items():
            rows.setdefault(", ".join(provs), []).append(mode)
        for provs, modes in rows.items():
            lines.append(f"| {op} | {shp} | {dt} | {', '.join(modes)} | {provs} |")
    return lines


# -- plots -----------------------------------------------------------------------------


def _base_shape(rows: list[Result]) -> dict | None:
    """The op's base shape: the one its priority-0 cases ran at."""
    return next((r.shape for r in rows if r.priority == 0), rows[0].shape if rows else None)


def _sweeps(rows: list[Result], base: dict | None) -> dict[str, list[Result]]:
    """axis -> rows whose shape differs from the op's base shape in that key only."""
    if base is None:
        return {}
    out: dict[str, list[Result]] = {}
    for r in rows:
        diff = [k for k in base if r.shape.get(k) != base[k]]
        if len(diff) == 0:
            for k in base:
                out.setdefault(k, []).append(r)
        elif len(diff) == 1:
            out.setdefault(diff[0], []).append(r)
    swept = {k: v for k, v in out.items() if len({r.shape[k] for r in v}) > 1}
    if swept or not rows:
        return swept
    # nothing swept (a base-only preset, or a sweep the time budget cut): the base points
    key = rows[0].vocab_key if rows[0].vocab_key in base else next(iter(base))
    return {key: [r for r in rows if r.shape == base]}


def write_plots(out_dir: str, results: list[Result]) -> list[str]:
    """One PNG per op with at least one measured case: time and peak memory against each
    swept axis (vocab, tokens, ...); an op with no sweep point gets its base-shape points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for op in OrderedDict.fromkeys(r.op for r in results):
        rows = [r for r in results if r.op == op and r.status == "ok"]
        modes = {r.mode for r in rows}
        mode = "forward+backward" if "forward+backward" in modes else "forward"
        rows = [r for r in rows if r.mode == mode]
        base = _base_shape(rows)
        sweeps = _sweeps(rows, base)
        if not sweeps:
            continue
        axes_keys = sorted(sweeps, key=lambda k: (k != rows[0].vocab_key, k))
        fig, axs = plt.subplots(len(axes_keys), 2, figsize=(10, 3.6 * len(axes_keys)),
                                squeeze=False)
        for i, key in enumerate(axes_keys):
            for prov in _providers_in(sweeps[key]):
                pts = sorted((r.shape[key], r) for r in sweeps[key] if r.provider == prov)
                if not pts:
                    continue
                xs = [x for x, _ in pts]
                axs[i][0].plot(xs, [r.timing.median * 1e3 for _, r in pts], "o-", label=prov)
                axs[i][1].plot(xs, [r.peak_bytes / MIB for _, r in pts], "o-", label=prov)
            fixed = ", ".join(f"{k}={v}" for k, v in base.items() if k != key)
            if len({r.shape[key] for r in sweeps[key]}) == 1:
                fixed += "; base shape only"
            for j, (ylab, title) in enumerate((("median time (ms)", "time"),
                                               ("peak memory (MiB)", "memory"))):
                ax = axs[i][j]
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(key)
                ax.set_ylabel(ylab)
                ax.set_title(f"{op} {mode}: {title} vs {key} ({fixed})", fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"{op} ({rows[0].dtype})", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
