"""pytest-benchmark suite: the `fused_linear` family (forward, backward, forward+backward)."""

from __future__ import annotations

from _common import params, run_case


@params(["fused_linear"])
def test_fused_linear(benchmark, floors, case):
    run_case(benchmark, floors, case)
