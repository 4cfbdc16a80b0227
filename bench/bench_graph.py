"""pytest-benchmark suite: the `graph` family (forward, backward, forward+backward)."""

from __future__ import annotations

from _common import params, run_case


@params(["graph"])
def test_graph(benchmark, floors, case):
    run_case(benchmark, floors, case)
