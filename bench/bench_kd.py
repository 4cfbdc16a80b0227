"""pytest-benchmark suite: the `kd` family (forward, backward, forward+backward)."""

from __future__ import annotations

from _common import params, run_case


@params(["kd"])
def test_kd(benchmark, floors, case):
    run_case(benchmark, floors, case)
