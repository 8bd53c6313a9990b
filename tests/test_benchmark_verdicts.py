"""The rule every study's verdicts use: a difference counts only beyond both rows' seed spread."""

import pytest

from benchmarks.common import agreement, differ, direction, grouped_verdict, versus


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


def test_a_conclusion_needs_two_seeds_on_both_sides_to_hold_or_change():
    assert direction([10.0, 10.1, 9.9], [11.0, 11.1, 10.9]) == "lower"
    assert direction([10.0, 10.6, 9.4], [11.0, 11.6, 10.4]) == "not told apart"
    assert direction([10.0], [11.0, 11.1, 10.9]) == "one seed"
    assert agreement(["lower", "lower"]) == "holds"
    assert agreement(["lower", "not told apart"]) == "changes"
    assert agreement(["lower", "one seed"]) == "needs more seeds"


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
    assert "3.00x, 3.00x at patience 1; 2.00x, 2.00x at patience 3 (from the training runs" in said

    same = [r for r in rows if r["patience"] == 1] + [{**r, "patience": 3} for r in rows if r["patience"] == 1]
    assert "the conclusion holds" in convergence(same, 1, 3)
    assert "changes" not in convergence(same, 1, 3)
    assert convergence([r for r in rows if r["method"] == "standard"], 1, 3) == ""  # nothing to compare


def char_runs(method, patience, ppls, epochs=30, routed=True):
    """Runs as ``benchmarks.char_study.run_one`` stores them, one per seed."""
    extra = {"routed_ppl": 0.0, "flops_ratio": 0.95, "layers_ratio": 0.80} if routed else {}
    return [
        {"method": method, "seed": seed, "patience": patience, "epochs": epochs, "final_exit_ppl": ppl, **extra}
        for seed, ppl in enumerate(ppls)
    ]


def test_char_study_says_which_conclusions_of_patience_0_hold_at_patience_3():
    from benchmarks.char_study import convergence

    runs = (
        char_runs("standard", 0, [9.3, 9.4, 9.2], routed=False)
        + char_runs("deed", 0, [9.4, 9.6, 9.2])
        + char_runs("aux_loss", 0, [8.0, 8.1, 7.9])
        + char_runs("standard", 3, [9.0, 9.1, 8.9], epochs=80, routed=False)
        + char_runs("deed", 3, [8.0, 8.1, 7.9], epochs=40)
        + char_runs("aux_loss", 3, [8.0])  # one seed so far
        + char_runs("asymmetric_aux_0.8", 0, [9.0, 9.1, 8.9])  # never run at patience 3: left out
    )
    said = convergence(runs, 0, 3, max_epochs=80)
    assert "- deed against standard: not told apart at patience 0, lower at patience 3: the conclusion changes." in said
    assert (
        "- aux_loss against standard: lower at patience 0, one seed at patience 3: the conclusion needs more seeds."
        in said
    )
    assert "- standard: final-exit PPL at patience 3 against patience 0: -0.30, beyond the seed spread" in said
    assert "Ranking of these 3 methods at patience 0 (best first): aux_loss, standard, deed." in said
    assert "Ranking of these 3 methods at patience 3 (best first): aux_loss, deed, standard." in said
    assert "adds +15.0% to the layers-only ratio at patience 0 and +15.0% at patience 3" in said
    assert "not converged: standard." in said
    assert "Seeds at the cap: standard 3 of 3." in said
    assert "asymmetric_aux_0.8" not in said
    assert convergence([r for r in runs if r["patience"] == 0], 0, 3, max_epochs=80) == ""


def test_a_grouped_verdict_names_the_groups_that_have_members_and_needs_two_seeds():
    groups = [("higher at exits", [1, 2]), ("lower at exits", []), ("not told apart at exits", [3])]
    assert grouped_verdict(groups, seeds=3) == "higher at exits [1, 2]; not told apart at exits [3]"
    assert grouped_verdict(groups, seeds=1) == "one seed, so no verdict"
