"""pytest-benchmark suite: the `sampled` family (the sampled-KD loss: forward, backward,
forward+backward; the sampler: forward)."""

from _common import family_suite

test_sampled = family_suite(__file__)
