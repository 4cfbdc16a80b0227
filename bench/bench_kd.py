"""pytest-benchmark suite: the `kd` family (forward, backward, forward+backward)."""

from _common import family_suite

test_kd = family_suite(__file__)
