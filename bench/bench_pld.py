"""pytest-benchmark suite: the `pld` family (forward, backward, forward+backward)."""

from _common import family_suite

test_pld = family_suite(__file__)
