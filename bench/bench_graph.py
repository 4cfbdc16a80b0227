"""pytest-benchmark suite: the `graph` family (forward, backward, forward+backward)."""

from _common import family_suite

test_graph = family_suite(__file__)
