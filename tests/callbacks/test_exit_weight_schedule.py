import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lego_lightning import Stage
from lego_lightning.callbacks import ExitWeightSchedule
from lego_lightning.data import SyntheticDataModule
from tests.helpers import quiet_trainer, tiny_lm

STAGES = [Stage((1, 1), 0.5), Stage((2, 3), 0.5)]


class WeightRecorder(Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = list(pl_module.exit_loss_weights)


def data():
    return SyntheticDataModule(vocab_size=64, seq_len=16, batch_size=16, n_train=64, n_val=16)


def expected(step):
    t = min(1.0, step / 4)
    return [pytest.approx(0.9 + t * (0.1 - 0.9)), pytest.approx(0.1 + t * (0.9 - 0.1))]


def test_weights_move_linearly_per_step_and_the_loss_uses_them(tmp_path):
    recorder = WeightRecorder()
    schedule = ExitWeightSchedule(start=[0.9, 0.1], end=[0.1, 0.9], duration=4, unit="steps")
    lm = tiny_lm(stages=STAGES)
    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[schedule, recorder]).fit(lm, data())
    assert sorted(recorder.seen) == list(range(6))
    for step, weights in recorder.seen.items():
        assert weights == expected(step)


def test_each_weight_is_logged_under_the_layer_its_exit_follows(tmp_path):
    schedule = ExitWeightSchedule(start=[0.9, 0.1], end=[0.1, 0.9], duration=4, unit="epochs")
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[schedule])
    trainer.fit(tiny_lm(stages=STAGES), data())  # exits after layers 1 and 3
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/exit_weight/")}
    assert logged == {"train/exit_weight/1": pytest.approx(0.9), "train/exit_weight/3": pytest.approx(0.1)}


def test_per_epoch_schedule(tmp_path):
    recorder = WeightRecorder()
    schedule = ExitWeightSchedule(start=[1.0, 0.0], end=[0.0, 1.0], duration=2, unit="epochs")
    lm = tiny_lm(stages=STAGES)
    quiet_trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[schedule, recorder]).fit(lm, data())
    per_epoch = [recorder.seen[s] for s in (0, 4, 8)]  # 4 steps per epoch
    assert per_epoch == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]


def test_resumed_run_has_the_weights_of_the_uninterrupted_run(tmp_path):
    full = WeightRecorder()
    quiet_trainer(
        tmp_path / "a",
        max_steps=6,
        limit_val_batches=0,
        callbacks=[ExitWeightSchedule([0.9, 0.1], [0.1, 0.9], 4, "steps"), full],
    ).fit(tiny_lm(stages=STAGES), data())
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", save_last=True, every_n_train_steps=1)
    quiet_trainer(
        tmp_path / "b",
        max_steps=2,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[ExitWeightSchedule([0.9, 0.1], [0.1, 0.9], 4, "steps"), ckpt],
    ).fit(tiny_lm(stages=STAGES), data())
    resumed = WeightRecorder()
    lm = tiny_lm(stages=STAGES)
    quiet_trainer(
        tmp_path / "b",
        max_steps=6,
        limit_val_batches=0,
        callbacks=[ExitWeightSchedule([0.9, 0.1], [0.1, 0.9], 4, "steps"), resumed],
    ).fit(lm, data(), ckpt_path=ckpt.last_model_path)
    assert sorted(resumed.seen) == [2, 3, 4, 5]
    assert all(resumed.seen[s] == full.seen[s] for s in resumed.seen)
    assert lm.exit_loss_weights == full.seen[5]


def test_wrong_number_of_weights_fails_at_setup(tmp_path):
    schedule = ExitWeightSchedule(start=[0.3, 0.3, 0.4], end=[0.1, 0.1, 0.8], duration=2)
    with pytest.raises(ValueError, match="ExitWeightSchedule has 3 weights but the module has 2 exits"):
        quiet_trainer(tmp_path, max_steps=1, callbacks=[schedule]).fit(tiny_lm(stages=STAGES), data())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": [0.5], "end": [0.5, 0.5], "duration": 2}, "same non-zero length"),
        (
            {"start": [0.0, 0.0], "end": [0.5, 0.5], "duration": 2},
            r"start must be finite weights >= 0, not all 0",
        ),
        ({"start": [0.5, 0.5], "end": [-0.1, 1.0], "duration": 2}, r"end must be finite weights"),
        ({"start": [0.5, 0.5], "end": [0.5, 0.5], "duration": 0}, "duration must be a positive integer"),
        (
            {"start": [0.5, 0.5], "end": [0.5, 0.5], "duration": 2, "unit": "batches"},
            "unit must be 'epochs' or 'steps'",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitWeightSchedule(**kwargs)


def test_a_rule_is_resolved_against_the_modules_exits(tmp_path):
    recorder = WeightRecorder()
    schedule = ExitWeightSchedule(start="final", end="sum_l", duration=2, unit="steps")
    lm = tiny_lm(n_layers=4, exits={"every": 2})  # exits after layers 2 and 4: sum_l is 2, 2 + 4
    quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[schedule, recorder]).fit(lm, data())
    assert recorder.seen[0] == [0.0, 1.0]
    assert recorder.seen[1] == pytest.approx([0.125, 0.875])  # half-way from (0, 1) to (0.25, 0.75)
    assert recorder.seen[2] == pytest.approx([0.25, 0.75])


def test_rotational_trains_one_earlier_exit_at_a_time_beside_the_last(tmp_path):
    recorder = WeightRecorder()
    schedule = ExitWeightSchedule(end="uniform", curriculum="rotational", period=2, unit="steps")
    lm = tiny_lm(n_layers=4, exits="all")
    trainer = quiet_trainer(tmp_path, max_steps=8, limit_val_batches=0, callbacks=[schedule, recorder])
    trainer.fit(lm, data())
    on = {step: [i for i, w in enumerate(weights) if w > 0] for step, weights in recorder.seen.items()}
    # Exits after layers 1, 2, 3 take turns every 2 steps; the last is always on.
    assert on == {0: [0, 3], 1: [0, 3], 2: [1, 3], 3: [1, 3], 4: [2, 3], 5: [2, 3], 6: [0, 3], 7: [0, 3]}
    assert all(sum(w) == pytest.approx(1.0) and max(w) == pytest.approx(0.5) for w in recorder.seen.values())
    # An exit out of its turn runs no head: a step computes the losses of two exits.
    lm.set_exit_loss_weights(schedule.weights_at(2))
    ids = torch.randint(0, 64, (2, 16))
    assert set(lm.exit_losses(ids, ids)) == {2, 4}


def test_rotational_keeps_the_end_weights_of_the_exits_it_turns_on(tmp_path):
    schedule = ExitWeightSchedule(end=[0.0, 0.2, 0.2, 0.6], curriculum="rotational", unit="steps")
    schedule.setup(None, tiny_lm(n_layers=4, exits="all"), "fit")
    # Exit 1 has weight 0 at the end, so only exits 2 and 3 take turns; their pair sums to the end's 1.0.
    assert schedule.weights_at(0) == pytest.approx([0.0, 0.25, 0.0, 0.75])
    assert schedule.weights_at(1) == pytest.approx([0.0, 0.0, 0.25, 0.75])
    assert schedule.weights_at(2) == schedule.weights_at(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": "cubic", "end": "uniform", "duration": 2}, r"start='cubic' is not a rule: allowed \('final'"),
        ({"end": [0.5, 0.5], "duration": 2}, "the gradual curriculum needs start, end and duration"),
        ({"start": "final", "end": "l", "duration": 2, "curriculum": "rotational"}, "rotational takes end and period"),
        ({"end": "l", "curriculum": "rotational", "period": 0}, "period must be a positive integer"),
        ({"end": "l", "curriculum": "spiral"}, r"curriculum='spiral' is not one of \('gradual', 'rotational'\)"),
    ],
)
def test_bad_curricula(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitWeightSchedule(**kwargs)
