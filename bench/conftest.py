"""pytest-benchmark suites over the same cases as `kdkernels bench`.

Run: `pytest bench` (or one file, `pytest bench/bench_kd.py`), optionally with
`--benchmark-json out.json`. Not collected by the default test run (pyproject's
testpaths is `tests`). Environment knobs (see ENVS.md):
KDKERNELS_BENCH_SHAPES (a --shapes value, default the device's preset, base shapes only),
KDKERNELS_BENCH_PROVIDERS (comma-separated provider patterns), KDKERNELS_BENCH_DEVICE.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(parent, file_path):
    # Files here are named bench_*.py so that a plain `pytest` never picks them up; a file
    # named on the command line is collected by pytest itself.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def floors():
    from _common import device

    from kdkernels.bench.floors import measure_floors

    return measure_floors(device())
