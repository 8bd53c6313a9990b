"""benchmarks/exits_added.py's verdicts follow the seed-spread rule of every study here."""

from benchmarks.exits_added import observations


def seed_row(seed, added, scratch):
    """A stored row: each exit's PPL for the exits added afterwards and for deep supervision."""
    sweep = [{"flops_ratio": 0.85, "ppl": 120.0}, {"flops_ratio": 1.0, "ppl": 100.0}]

    def model(ppls):
        return {"exits": {str(k): {"ppl": p, "bpb": None} for k, p in enumerate(ppls, 1)}, "learned": sweep,
                "max_prob": sweep}  # fmt: skip

    tuned = {**model(added), "trunk_unchanged": True, "epochs": 2}
    return {"seed": seed, "exit_tuned": tuned, "deep_supervision": {**model(scratch), "epochs": 8},
            "standard": {"epochs": 8}}  # fmt: skip


def test_each_exit_is_worse_better_or_not_told_apart_by_the_seed_spread():
    rows = [
        seed_row(0, [200.0, 150.0, 100.0, 90.0], [150.0, 151.0, 120.0, 95.0]),
        seed_row(1, [201.0, 140.0, 101.0, 90.5], [151.0, 149.0, 121.0, 95.5]),
    ]
    said = "\n".join(observations(rows))
    assert "worse after layer(s) [1]; better after layer(s) [3]; not told apart after layer(s) [2]" in said
    assert "bit-identical to the exported model: True" in said
    assert "the standard model's is the lower" in said  # 90 against 95 at the final exit
    assert "best exit is after layer 2, not the last" not in said  # from scratch: 95 at layer 4 is its best


def test_a_from_scratch_best_exit_below_the_last_is_said():
    rows = [seed_row(0, [200.0, 150.0, 100.0, 90.0], [150.0, 85.0, 120.0, 95.0])]
    said = "\n".join(observations(rows))
    assert "Deep supervision's best exit is after layer 2, not the last" in said


def test_one_seed_gives_no_verdict():
    said = "\n".join(observations([seed_row(0, [200.0, 150.0, 100.0, 90.0], [150.0, 151.0, 120.0, 95.0])]))
    assert "Added exits are one seed, so no verdict." in said
    assert "worse after" not in said
