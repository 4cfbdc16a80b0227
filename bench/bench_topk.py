"""pytest-benchmark suite: the `topk` family (forward, backward, forward+backward)."""

from _common import family_suite

test_topk = family_suite(__file__)
