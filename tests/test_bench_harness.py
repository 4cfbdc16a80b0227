"""The benchmark harness measured on calls whose cost is known.

Timing: sleeps of known length (warm-up excluded, untimed `pre` excluded). Memory: a
call that allocates known tensors (peak, not final; what existed before excluded). The
fresh-process RSS measurement: a call that writes a known number of bytes. And one
end-to-end run of `kdkernels bench` on the tiny preset.
"""

from __future__ import annotations

import csv
import os
import time

import pytest
import torch
from _helpers import requires_gpu

from kdkernels.bench import cpumem
from kdkernels.bench.floors import Floors
from kdkernels.bench.harness import Timing, _quantile, peak_memory, time_fn

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
