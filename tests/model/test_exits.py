"""Exits placed by rule: resolved against the depth into the same stages, with their weights; bad rules named."""

import math

import pytest
import torch

from lego_lightning import PhasedExitLM, Stage, SupervisedExitLM
from lego_lightning.model.exits import ExitRule, as_exit_rule, exit_weights


@pytest.mark.parametrize(
    ("rule", "n_layers", "exits"),
    [
        ("all", 3, (1, 2, 3)),
        ({"every": 4}, 12, (4, 8, 12)),
        ({"every": 4}, 10, (4, 8, 10)),  # the last layer always has its exit
        ({"every": 4}, 2, (2,)),
        ({"fractions": [0.25, 0.5, 0.75]}, 12, (3, 6, 9, 12)),
        ({"fractions": [0.25, 0.5, 0.75]}, 2, (1, 2)),  # 0.5 and 1.0 round to layers 1 and 1 (halves up)
        ({"fractions": [0.3333, 0.6667]}, 12, (4, 8, 12)),
        ({"fractions": [1.0]}, 5, (5,)),
        ([4, 8], 12, (4, 8, 12)),
        ({"layers": [8, 4, 4]}, 12, (4, 8, 12)),
    ],
)
def test_a_rule_resolves_into_stages_that_tile_the_depth(rule, n_layers, exits):
    stages = as_exit_rule(rule).stages(n_layers)
    assert tuple(s.exit_layer for s in stages) == exits
    assert [s.layers[0] for s in stages] == [1, *(e + 1 for e in exits[:-1])]


def test_the_explicit_stages_and_the_rule_build_the_same_model():
    by_rule = SupervisedExitLM(vocab_size=40, n_layers=6, d_model=16, n_heads=2, max_seq_len=16, exits={"every": 2})
    explicit = [Stage((1, 2), 1 / 3), Stage((3, 4), 1 / 3), Stage((5, 6), 1 / 3)]
    by_stages = SupervisedExitLM(vocab_size=40, n_layers=6, d_model=16, n_heads=2, max_seq_len=16, stages=explicit)
    assert by_rule.config.stages == by_stages.config.stages
    assert by_rule.exit_loss_weights == pytest.approx(by_stages.exit_loss_weights)
    assert by_rule.hparams["exits"]["every"] == 2  # the rule, not its resolution, rebuilds the module


@pytest.mark.parametrize(
    ("scale", "expected"),
    [
        ("final", [0, 0, 0, 1]),
        ("uniform", [1, 1, 1, 1]),
        ("l", [2, 4, 6, 8]),
        ("sqrt_l", [math.sqrt(k) for k in (2, 4, 6, 8)]),
        ("inv_l", [1 / 2, 1 / 4, 1 / 6, 1 / 8]),
        ("inv_sqrt_l", [1 / math.sqrt(k) for k in (2, 4, 6, 8)]),
        ("sum_l", [2, 6, 12, 20]),  # torchtune's cumulative sum over the exits' layers
    ],
)
def test_loss_weight_scales_follow_the_exits_depth_and_sum_to_one(scale, expected):
    weights = exit_weights(scale, [2, 4, 6, 8])
    assert weights == pytest.approx([w / sum(expected) for w in expected])
    stages = ExitRule(every=2, loss_weights=scale).stages(8)
    assert [s.loss_weight for s in stages] == pytest.approx(weights)


def test_a_number_weights_every_exit_and_the_final_weight_and_lr_scale_apply():
    stages = ExitRule(fractions=(0.5,), loss_weights=1.0, final_loss_weight=0.0, lr_scale=0.5).stages(4)
    assert [(s.layers, s.loss_weight, s.lr_scale) for s in stages] == [((1, 2), 1.0, 0.5), ((3, 4), 0.0, 0.5)]


def test_the_rule_round_trips_through_its_plain_form():
    rule = ExitRule(fractions=(0.25, 0.5), loss_weights="sqrt_l", final_loss_weight=0.5)
    assert as_exit_rule(rule.to_dict()) == rule
    module = SupervisedExitLM(vocab_size=40, n_layers=4, d_model=16, n_heads=2, max_seq_len=16, exits=rule)
    rebuilt = SupervisedExitLM(**module.hparams)
    assert rebuilt.config.stages == module.config.stages


@pytest.mark.parametrize(
    ("rule", "n_layers", "message"),
    [
        ({"layers": [0, 4]}, 12, r"exits.layers=\[0, 4\] names layer 0: layers are numbered from 1"),
        ({"layers": [4, 13]}, 12, r"exits.layers=\[4, 13\] names layer 13, past the model's depth: allowed 1..12"),
        ([2, 5], 4, r"names layer 5, past the model's depth: allowed 1..4"),
        ({"fractions": [0.5, 1.5]}, 12, r"exits.fractions=\[0.5, 1.5\] has 1.5: each must be in \(0, 1\]"),
        ({"fractions": [0.0]}, 12, r"exits.fractions=\[0.0\] has 0.0: each must be in \(0, 1\]"),
        ({"every": 0}, 12, r"exits.every=0 is not allowed: a positive integer"),
        ({"every": 2, "layers": [4]}, 12, r"give exactly one of layers, every, fractions"),
        ({}, 12, r"give exactly one of layers, every, fractions"),
        ({"every": 2, "loss_weights": "cubic"}, 12, r"exits.loss_weights='cubic' is not allowed: .* 'sqrt_l'"),
        ({"every": 2, "loss_weights": "final", "final_loss_weight": 0}, 12, r"every loss weight is 0"),
        ({"every": 2, "weight": 1}, 12, r"exits has unknown fields \['weight'\]"),
        ("half", 12, r"exits='half' is not allowed: 'all', a list of layer numbers"),
    ],
)
def test_a_bad_rule_is_refused_naming_the_field_when_the_module_is_built(rule, n_layers, message):
    with pytest.raises(ValueError, match=message):
        SupervisedExitLM(vocab_size=40, n_layers=n_layers, d_model=16, n_heads=2, max_seq_len=16, exits=rule)


def test_stages_and_a_rule_together_are_refused():
    with pytest.raises(ValueError, match=r"model.stages and model.exits were both given"):
        SupervisedExitLM(vocab_size=40, n_layers=4, stages=[Stage((1, 4))], exits="all")


def test_a_plan_names_its_exits_by_place_so_it_fits_any_depth():
    plan = [
        {"layers": None, "train": ["exit first"], "loss_weights": {"first": 1.0}},
        {"train": ["layers above exit first"], "loss_weights": {"last": 1.0}, "tokens": "hard", "hard_exit": "first"},
    ]
    with pytest.raises(ValueError, match=r"phases\[0\].layers=None is not allowed: .* \(with model.pretrained"):
        PhasedExitLM(phases=plan, vocab_size=40, d_model=16, n_heads=2, max_seq_len=16, exits={"fractions": [0.5]})
    for depth, first in ((2, 1), (6, 3), (9, 5)):
        plan[0]["layers"] = depth
        module = PhasedExitLM(
            phases=plan, vocab_size=40, d_model=16, n_heads=2, max_seq_len=16, exits={"fractions": [0.5]}
        )
        assert module.config.exit_layers == (first, depth)
        assert set(module.plan[0].trained) == {("exit", first)} and module.plan[0].loss_weights == {
            first: 1.0,
            depth: 0.0,
        }
        assert set(module.plan[1].trained) == {("layer", i) for i in range(first + 1, depth + 1)}
        assert module.plan[1].hard_exit == first and module.plan[1].loss_weights == {first: 0.0, depth: 1.0}
        # The same module from its saved hyperparameters (as a checkpoint rebuilds it).
        assert PhasedExitLM(**module.hparams).config.stages == module.config.stages


@pytest.mark.parametrize(
    ("phase", "message"),
    [
        ({"train": ["exit middle"]}, r"'exit middle' is not a part; allowed .* 'layers above exit K'"),
        ({"train": ["layers above exit last"]}, r"'layers above exit last' names no layer: exit 4 follows"),
        ({"train": ["exit first"], "loss_weights": {"middle": 1.0}}, r"phases\[1\].loss_weights='?\{'middle'"),
        ({"train": ["exit first"], "hard_exit": "middle", "tokens": "hard"}, r"phases\[1\].hard_exit='middle'"),
    ],
)
def test_a_bad_reference_to_an_exit_names_the_phase(phase, message):
    plan = [{"layers": 4}, phase]
    with pytest.raises(ValueError, match=message):
        PhasedExitLM(phases=plan, vocab_size=40, d_model=16, n_heads=2, max_seq_len=16, exits={"every": 2})


def test_a_module_built_by_rule_trains(tmp_path):
    from tests.helpers import quiet_trainer, synthetic

    torch.manual_seed(0)
    module = SupervisedExitLM(
        vocab_size=64, n_layers=4, d_model=16, n_heads=2, max_seq_len=16, exits={"every": 2, "loss_weights": "l"}
    )
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(module, synthetic())
    assert module.exit_loss_weights == pytest.approx([1 / 3, 2 / 3])
    assert {"val/exit2/ppl", "val/exit4/ppl"} <= set(trainer.callback_metrics)
