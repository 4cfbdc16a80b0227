"""pytest-benchmark suite: the `sinkhorn` family (forward, backward, forward+backward)."""

from _common import family_suite

test_sinkhorn = family_suite(__file__)
