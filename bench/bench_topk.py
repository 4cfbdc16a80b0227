"""pytest-benchmark suite: the `topk` family (forward, backward, forward+backward)."""

from __future__ import annotations

from _common import params, run_case


@params(["topk"])
def test_topk(benchmark, floors, case):
    run_case(benchmark, floors, case)
