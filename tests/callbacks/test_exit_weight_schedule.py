import pytest
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
