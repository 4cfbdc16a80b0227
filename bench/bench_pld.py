"""pytest-benchmark suite: the `pld` family (forward, backward, forward+backward)."""

from __future__ import annotations

from _common import params, run_case


@params(["pld"])
def test_pld(benchmark, floors, case):
    run_case(benchmark, floors, case)
