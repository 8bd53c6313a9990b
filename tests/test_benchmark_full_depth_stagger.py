"""The stagger benchmark's request lengths: one length in step; out of step, spread around it, neighbours apart."""

import itertools
import statistics

from benchmarks.full_depth_stagger import lengths_of


def test_in_step_every_request_has_the_same_length():
    assert lengths_of(32, 96, 0) == [96] * 32


def test_out_of_step_lengths_spread_around_the_mean_and_neighbours_end_apart():
    lengths = lengths_of(36, 96, 16)
    assert min(lengths) == 80 and max(lengths) == 112
    assert statistics.mean(lengths) == 96  # 36 requests: every length four times
    assert all(a != b for a, b in itertools.pairwise(lengths))
    assert len(set(lengths[:8])) == 8  # a batch of 8 slots starts with 8 different lengths
