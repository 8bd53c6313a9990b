"""The progressive benchmark's same-run step timing: real modules from the committed configs, both phases."""

import pytest

from benchmarks.progressive import cost, step_cost


def test_step_cost_times_both_methods_in_both_phases_with_phase_two_frozen(corpus):
    steps = step_cost(corpus, vocab_cap=None, rounds=2, per_round=1)
    assert steps["batch"][1] == 32  # the configs' block length, on a real batch from the data module
    for phase in (1, 2):
        times = steps[f"phase{phase}_step_s"]
        assert set(times) == {"standard", "deep_supervision"}
        # One ratio per alternating round, each of the two steps timed in that round.
        paired = [d / s for d, s in zip(times["deep_supervision"]["values"], times["standard"]["values"])]
        assert len(paired) == 2 and all(r > 0 for r in paired)
        assert steps[f"phase{phase}_step_ratio"]["values"] == pytest.approx(paired)
    # Phase 2 froze the embedding and layers 1-3, and a step gave none of them a gradient.
    assert steps["frozen_parameters"] > 0
    assert steps["frozen_parameters_without_grad"] == steps["frozen_parameters"]


def test_the_cost_section_puts_the_same_run_step_ratio_beside_the_flops_ratio():
    rows = [
        {"method": m, "phase1_train_flops_per_token": f1, "phase2_train_flops_per_token": f2}
        for m, f1, f2 in (("standard", 100.0, 50.0), ("deep_supervision", 250.0, 175.0))
    ]
    ratio = {"values": [2.0, 2.2], "mean": 2.1, "std": 0.14}
    steps = {"phase1_step_ratio": ratio, "phase2_step_ratio": ratio, "frozen_parameters": 4}
    said = cost(rows, {**steps, "frozen_parameters_without_grad": 4})
    assert "Phase 1: deep supervision spends 2.50x standard's training FLOPs" in said
    assert "Phase 2: deep supervision spends 3.50x" in said
    assert "a training step takes 2.10 ± 0.14x standard's (timed in one process" in said
    assert "4 of 4 frozen parameters received no gradient" in said
    assert "no same-run step time was measured" in cost(rows, None)
    assert cost(rows[:1], None) == ""  # one method alone has nothing to compare
