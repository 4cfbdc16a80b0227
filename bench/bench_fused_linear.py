"""pytest-benchmark suite: the `fused_linear` family (forward, backward, forward+backward)."""

from _common import family_suite

test_fused_linear = family_suite(__file__)
