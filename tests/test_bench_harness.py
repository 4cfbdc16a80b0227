"""The benchmark harness measured on calls whose cost is known.

Timing: sleeps of known length (warm-up excluded, untimed `pre` excluded). Memory: a
call that allocates known tensors (peak, not final; what existed before excluded). The
fresh-process RSS measurement: a call that writes a known number of bytes. Rows are
labelled with the backend that ran (a wrong label is an error, never a timing); the time
budget trims sweeps but keeps every op's base shape and plot. And one end-to-end run of
`kdkernels bench` on the tiny preset.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import time

import pytest
import torch
from _helpers import requires_gpu

from kdkernels._core.backend import TABLES
from kdkernels.bench import cpumem
from kdkernels.bench.cases import select_cases
from kdkernels.bench.floors import Floors
from kdkernels.bench.harness import Timing, _quantile, peak_memory, time_fn
from kdkernels.bench.model import BASE, SWEEP, Sweep
from kdkernels.bench.providers import label_mismatch, ours_factory
from kdkernels.bench.report import budget_lines, markdown, write_plots
from kdkernels.bench.runner import BUDGET_NOTE, Runner, WrongBackend, run_cases, warm_up
from kdkernels.bench.specs import families

MIB = 1 << 20


def test_quantiles_and_iqr():
    t = Timing(times=[4.0, 1.0, 3.0, 2.0, 5.0], warmup=0)
    assert t.median == 3.0
    assert t.q25 == 2.0 and t.q75 == 4.0 and t.iqr == 2.0
    assert t.min == 1.0
    assert _quantile([1.0, 2.0], 0.5) == 1.5


def test_time_fn_measures_a_sleep_and_excludes_warmup():
    calls = []

    def fn():
        time.sleep(0.3 if not calls else 0.02)  # the first call is slow (like compilation)
        calls.append(1)

    t = time_fn(fn, warmup=1, min_reps=5, max_reps=5, target_s=0.0)
    assert t.reps == 5 and len(calls) == 6
    assert t.warmup_times[0] >= 0.3
    assert max(t.times) < 0.25  # the slow first call is not among the timed ones
    assert 0.02 <= t.median < 0.06  # sleep(0.02) plus scheduling noise on a busy machine


def test_time_fn_excludes_pre_and_adapts_reps():
    def pre():
        time.sleep(0.05)
        return 0.01

    t = time_fn(lambda d: time.sleep(d), pre=pre, warmup=1, min_reps=3, max_reps=50,
                target_s=0.05)
    assert 0.01 <= t.median < 0.045  # pre()'s 50 ms never counted
    assert 3 <= t.reps <= 6  # ~0.05 s of timed work at ~10 ms a call


def test_cpu_peak_memory_of_known_allocations():
    def fn():
        a = torch.ones(32 * MIB // 4)  # 32 MiB ...
        del a
        b = torch.ones(16 * MIB // 4)  # ... freed before 16 MiB: the peak is 32 MiB, not 48
        return b

    peak = peak_memory(fn)
    assert 32 * MIB <= peak <= 33 * MIB


def test_cpu_peak_memory_excludes_what_existed_before():
    def pre():
        return torch.ones(64 * MIB // 4)  # an input: allocated before the call

    peak = peak_memory(lambda x: x * 2, pre=pre)  # the call allocates one 64 MiB output
    assert 64 * MIB <= peak <= 65 * MIB


def test_cpu_peak_memory_counts_gradients_left_alive():
    x = torch.randn(1024, 1024, requires_grad=True)  # 4 MiB

    def fn():
        (x * 3).sum().backward()

    peak = peak_memory(fn)
    assert 4 * MIB <= peak <= 13 * MIB  # x.grad (kept) + at most the transient x*3 and grad


def test_floor_arithmetic():
    fl = Floors(device="cpu", copy_bytes_per_s=1e9,
                gemm_flops_per_s={"float32": 1e12, "bfloat16": 4e12})
    assert fl.floor_s(2e9, 0, torch.float32) == pytest.approx(2.0)
    assert fl.floor_s(1e6, 8e12, torch.float32) == pytest.approx(8.0)
    assert fl.floor_s(1e6, 8e12, torch.bfloat16) == pytest.approx(2.0)
    assert fl.floor_kind(1e6, 8e12, torch.float32) == "gemm"
    assert fl.floor_kind(2e9, 1.0, torch.float32) == "copy"


# -- labels: the backend that ran ------------------------------------------------------

CPU = torch.device("cpu")
FLOORS = Floors(device="cpu", copy_bytes_per_s=1e10, gemm_flops_per_s={"float32": 1e11})


def _runner() -> Runner:
    return Runner(CPU, FLOORS, target_s=0.0, min_reps=1, max_reps=2)


def _kd_case(provider: str = "kdkernels[torch]"):
    (case,) = select_cases(CPU, ops=["kd.forward_kl"], providers=[provider], shapes="tiny:base",
                           modes=["forward+backward"])
    return case


def test_label_mismatch_checks_every_recorded_call():
    assert label_mismatch("kdkernels[triton]", [("kd_loss", "triton"),
                                                ("scale_rows", "triton")]) is None
    assert label_mismatch("kdkernels[triton,wacc]", [("fused_linear_kd_loss", "triton")]) is None
    assert label_mismatch("kdkernels[triton]", [("kd_loss", "triton"), ("scale_rows", "torch")]) \
        == "ran torch (scale_rows), not triton"
    assert label_mismatch("kdkernels[cuda]", []) == "no kdkernels dispatch was recorded " \
        "(expected cuda)"
    assert label_mismatch("eager", [("kd_loss", "torch")]) is None  # not one of ours


def test_row_of_the_backend_that_ran_is_ok():
    (r,) = _runner().run_group([_kd_case()])
    assert r.status == "ok", r.note
    assert r.timing is not None and r.timing.median > 0


def test_provider_whose_backend_differs_is_an_error_not_a_timing():
    # A provider labelled triton whose calls run torch (here: the torch provider relabelled)
    fake = dataclasses.replace(_kd_case(), provider="kdkernels[triton]")
    rows = _runner().run_group([fake, dataclasses.replace(fake, mode="forward")])
    for r in rows:  # the second mode reuses the first one's verdict
        assert r.status == "error" and r.timing is None
        assert r.note.startswith("ran torch (kd_loss") and r.note.endswith(", not triton")
    md = markdown({"versions": {}, "device": "cpu", "device_type": "cpu", "date": ""}, FLOORS,
                  rows, [])
    # no column or timing under that label: its one mention is the "Not measured" row
    assert [ln for ln in md.splitlines() if "kdkernels[triton]" in ln] == [
        f"| kd.forward_kl | kdkernels[triton] | error | {rows[0].note} | 2 |"]
    with pytest.raises(WrongBackend, match="ran torch"):  # the bench/ suites' warm-up
        warm_up(fake, fake.make_inputs())


def test_table_falling_back_silently_is_caught(monkeypatch):
    # kd_loss's table ignoring an explicit backend=cuda and running torch instead
    (table,) = [t for t in TABLES if t.op == "kd_loss"]
    monkeypatch.setattr(table, "resolve", lambda backend, device, **facts: "torch")
    call = lambda fn, x, **kw: fn(x["s"], x["t"], **kw)
    case = dataclasses.replace(_kd_case(), provider="kdkernels[cuda]",
                               factory=ours_factory("kd_loss", call, "cuda"))
    (r,) = _runner().run_group([case])
    assert r.status == "error" and r.timing is None
    assert r.note.startswith("ran torch (kd_loss") and r.note.endswith(", not cuda")


# -- the time budget -------------------------------------------------------------------


def test_sweep_alternates_axes():
    sw = Sweep({"N": 2, "V": 8}, {"V": [4, 8, 16], "N": [1, 4]})
    assert [(s["N"], s["V"], p) for s, p in sw.shapes()] == [
        (2, 8, BASE), (2, 4, SWEEP), (1, 8, SWEEP), (4, 8, SWEEP), (2, 16, SWEEP)]


def test_sweeps_run_round_robin_over_ops():
    cases = select_cases(CPU, ops=["kd.forward_kl", "graph"], providers=["eager"],
                         shapes="tiny", modes=["forward+backward"])
    assert [(c.op, c.priority) for c in cases] == [
        ("kd.forward_kl", BASE), ("graph", BASE), ("kd.forward_kl", SWEEP), ("graph", SWEEP)]


def test_spent_budget_keeps_every_base_shape_and_plot(tmp_path):
    cases = select_cases(CPU, ops=["kd.forward_kl", "graph", "pld"],
                         providers=["kdkernels*", "eager"], shapes="tiny",
                         modes=["forward+backward"])
    results = run_cases(cases, _runner(), deadline=time.monotonic() - 1.0)
    base = [r for r in results if r.priority == BASE]
    swept = [r for r in results if r.priority != BASE]
    ops = {"kd.forward_kl", "graph", "pld", "pld.topk"}  # pld.topk has no sweep at all
    assert {r.op for r in base} == ops
    assert all(r.status == "ok" for r in base), [r.note for r in base]
    assert swept and all(r.status == "skipped" and r.note == BUDGET_NOTE for r in swept)
    cut = budget_lines(results)
    assert cut[0] == "## Cut by the time budget"
    assert "| kd.forward_kl | N=8,V=64 | float32 | forward+backward | eager, kdkernels[torch] |" \
        in cut
    md = markdown({"versions": {}, "device": "cpu", "device_type": "cpu", "date": ""}, FLOORS,
                  results, [])
    assert "## Cut by the time budget" in md and "| graph | G=2,T=4,V=96,k=4 | float32 |" in md
    assert BUDGET_NOTE not in md.split("## Cut by the time budget")[0]  # not "Not measured"
    plots = write_plots(str(tmp_path), results) if _has_matplotlib() else None
    if plots is not None:
        assert sorted(os.path.basename(p) for p in plots) == sorted(f"{op}.png" for op in ops)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_family_has_a_pytest_benchmark_file():
    bench_dir = pathlib.Path(__file__).resolve().parents[1] / "bench"
    files = {p.stem.removeprefix("bench_") for p in bench_dir.glob("bench_*.py")}
    assert files == set(families())


@pytest.mark.skipif(cpumem.available() is not None, reason="needs Linux /proc")
def test_fresh_process_rss_of_a_known_allocation():
    res = cpumem.selftest(256 * MIB)
    assert res.status == "ok", res.note
    assert res.hwm_reset
    assert 250 * MIB <= res.peak_delta <= 280 * MIB


def test_cli_tiny_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    from kdkernels.__main__ import main

    out = tmp_path / "bench"
    rc = main(["bench", "--ops", "kd.forward_kl", "--shapes", "tiny", "--providers",
               "kdkernels*,eager", "--modes", "fwd+bwd", "--out", str(out), "--quiet",
               "--target-time", "0.01"])
    assert rc == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    timing = [r for r in rows if r["group"] == "timing" and r["metric"] == "time_median"]
    assert {r["provider"] for r in timing} == {"kdkernels[torch]", "eager"}
    assert {r["shape"] for r in timing} == {"N=8,V=96", "N=8,V=64"}
    assert all(float(r["value"]) > 0 for r in timing)
    assert {r["metric"] for r in rows if r["group"] == "floor"} == {"bandwidth", "throughput"}
    assert all(r["device"] and r["versions"] and r["date"] for r in rows)
    md = (out / "results.md").read_text()
    assert "kd.forward_kl" in md and "kdkernels[torch]" in md and "eager" in md
    assert os.path.exists(out / "plots" / "kd.forward_kl.png")


@requires_gpu
def test_cuda_event_timing_scales_with_kernel_length():
    torch.cuda._sleep(1000)
    t1 = time_fn(lambda: torch.cuda._sleep(20_000_000), device="cuda", min_reps=5, max_reps=5)
    t2 = time_fn(lambda: torch.cuda._sleep(40_000_000), device="cuda", min_reps=5, max_reps=5)
    assert 1.6 < t2.median / t1.median < 2.4


@requires_gpu
def test_cuda_peak_memory_of_known_allocations():
    def fn():
        a = torch.empty(64 * MIB, dtype=torch.uint8, device="cuda")
        del a
        return torch.empty(16 * MIB, dtype=torch.uint8, device="cuda")

    assert peak_memory(fn, device="cuda") == 64 * MIB
