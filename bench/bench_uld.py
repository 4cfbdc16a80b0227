"""pytest-benchmark suite: the `uld` family (forward, backward, forward+backward)."""

from _common import family_suite

test_uld = family_suite(__file__)
