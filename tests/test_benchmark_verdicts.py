"""The rule every study's verdicts use: a difference counts only beyond both rows' seed spread."""

import pytest

from benchmarks.common import differ, versus


def test_a_difference_inside_the_seeds_spread_is_not_told_apart():
    diff, told_apart = differ([10.0, 12.0, 14.0], [11.0, 13.0, 15.0])  # std 2 each, means 1 apart
    assert diff == pytest.approx(-1.0)
    assert not told_apart


def test_a_difference_beyond_both_spreads_added_is_told_apart():
    assert differ([10.0, 10.1, 9.9], [11.0, 11.1, 10.9]) == (pytest.approx(-1.0), True)  # std 0.1 each
    assert not differ([10.0, 10.6, 9.4], [11.0, 11.6, 10.4])[1]  # std 0.6 each: 1.0 is inside 1.2


def test_the_floor_holds_differences_smaller_than_it_as_equal():
    assert differ([1.00, 1.00], [1.02, 1.02], floor=0.03) == (pytest.approx(-0.02), False)
    assert differ([1.00, 1.00], [1.05, 1.05], floor=0.03)[1]


def test_versus_names_one_seed_instead_of_a_verdict():
    assert versus([10.0], [11.0]) == "-1.0, one seed"
    assert versus([10.0, 10.1, 9.9], [11.0, 11.1, 10.9]) == "-1.0, beyond the seed spread"
    assert versus([10.0, 10.6, 9.4], [11.0, 11.6, 10.4], digits=2) == "-1.00, within the seed spread"
