"""pytest-benchmark suite: the `sinkhorn` family (forward, backward, forward+backward)."""

from __future__ import annotations

from _common import params, run_case


@params(["sinkhorn"])
def test_sinkhorn(benchmark, floors, case):
    run_case(benchmark, floors, case)
