"""examples/distill_tiny_llama.py, short: the three training paths (eager formula,
kd_loss, fused_linear_kd_loss through the Transformers integration) start from the same
weights and data and must give the same loss curve to float32 rounding."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "distill_tiny_llama.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("distill_tiny_llama", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_three_paths_agree_over_50_steps(example):
    runs = {p: example.run_path(p, steps=50, vocab=512, seq=16, batch=2)
            for p in example.PATHS}
    for r in runs.values():
        assert len(r["losses"]) == 50
        first, last = r["losses"][:5], r["losses"][-5:]
        assert sum(last) < sum(first)  # the student learns
    paths = list(runs)
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            diff = example.max_rel_diff(runs[a]["losses"], runs[b]["losses"])
            assert diff <= 1e-4, f"{a} vs {b}: {diff:.3g}"


def test_command_line_prints_the_table():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "3", "--vocab", "256", "--seq", "8",
         "--batch", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    lines = out.splitlines()
    for path in ("eager", "kd_loss", "fused"):
        row = next(line for line in lines if line.startswith(path + " "))
        assert row.split()[3] != "-"  # a peak-memory figure from the subprocess
    assert "max relative |Δ|" in out
