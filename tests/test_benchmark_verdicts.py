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


def progressive_runs(method, patience, phase2_ppls, s_per_epoch=1.0):
    """Rows as ``benchmarks.progressive.run_one`` stores them, one per seed."""
    return [
        {
            "method": method,
            "seed": seed,
            "patience": patience,
            "phase1_ppl": ppl + 1.0,
            "phase2_ppl": ppl,
            "phase1_epochs": 7,
            "phase2_epochs": 2,
            "phase1_s_per_epoch": s_per_epoch,
            "phase2_s_per_epoch": s_per_epoch,
        }
        for seed, ppl in enumerate(phase2_ppls)
    ]


def test_progressive_says_whether_the_short_patience_conclusion_holds_at_the_long_one():
    from benchmarks.progressive import convergence

    rows = (
        progressive_runs("standard", 1, [160.0, 161.0, 159.0])
        + progressive_runs("deep_supervision", 1, [159.5, 160.5, 158.5], s_per_epoch=3.0)
        + progressive_runs("standard", 3, [158.0, 158.1, 157.9])
        + progressive_runs("deep_supervision", 3, [156.0, 156.1, 155.9], s_per_epoch=2.0)
    )
    said = convergence(rows, 1, 3)
    # Within the spread at patience 1 (0.5 apart, std 1 each), beyond it at patience 3 (2 apart, std 0.1 each);
    # standard moves 2.0 between patiences, beyond its two spreads added (1 + 0.1).
    assert "Phase 2: deep supervision's PPL against standard's is not told apart at patience 1 and lower at " in said
    assert "patience 3: the conclusion changes." in said
    assert "- standard: phase-2 PPL at patience 3 against patience 1: -2.0, beyond the seed spread" in said
    assert "3.00x, 3.00x at patience 1; 2.00x, 2.00x at patience 3." in said

    same = [r for r in rows if r["patience"] == 1] + [{**r, "patience": 3} for r in rows if r["patience"] == 1]
    assert "the conclusion holds" in convergence(same, 1, 3)
    assert "changes" not in convergence(same, 1, 3)
    assert convergence([r for r in rows if r["method"] == "standard"], 1, 3) == ""  # nothing to compare
