from unittest.mock import Mock

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lego_lightning.callbacks import PerplexityEarlyStopping
from tests.helpers import quiet_trainer


class ScriptedCurve(L.LightningModule):
    """Logs a scripted validation perplexity, one value per epoch; records every validation it ran."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__()
        self.curve = curve
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.validated_epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.weight - batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.validated_epochs.append(self.current_epoch)
        self.log("val/ppl", self.curve[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(2, 1)), batch_size=2)


#        epoch:  0    1    2    3    4    5    6    7    8    9   10
CURVE = [9.0, 8.0, 8.5, 8.1, 7.0, 7.5, 7.2, 7.1, 6.0, 5.0, 4.0]


@pytest.mark.parametrize(
    ("patience", "min_delta", "stop_epoch"),
    [
        (0, 0.0, 2),  # the first epoch without improvement
        (1, 0.0, 2),  # exactly one bad epoch, not three (SEEDS.md section 3)
        (2, 0.0, 3),
        (3, 0.0, 7),  # epochs 5, 6, 7 do not beat 7.0
        (4, 0.0, 10),  # epoch 8 improves in time; the run ends at max_epochs without stopping early
    ],
)
def test_stops_after_exactly_patience_bad_validations(tmp_path, patience, min_delta, stop_epoch):
    es = PerplexityEarlyStopping(patience=patience, min_delta=min_delta)
    module = ScriptedCurve(CURVE)
    trainer = quiet_trainer(tmp_path, max_epochs=len(CURVE), callbacks=[es])
    trainer.fit(module)
    assert es.stopped_epoch == (0 if stop_epoch == len(CURVE) - 1 else stop_epoch)
    assert module.validated_epochs == list(range(stop_epoch + 1))


def test_min_delta_ignores_small_improvements(tmp_path):
    es = PerplexityEarlyStopping(patience=1, min_delta=0.6)
    module = ScriptedCurve([9.0, 8.5, 8.0, 7.0, 6.0])  # 9.0 -> 8.5 is not an improvement of more than 0.6
    quiet_trainer(tmp_path, max_epochs=5, callbacks=[es]).fit(module)
    assert es.stopped_epoch == 1


def test_resumes_mid_patience(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    es = PerplexityEarlyStopping(patience=3)
    first = ScriptedCurve(CURVE)
    # Interrupt after epoch 6: two bad epochs (5, 6) are already counted.
    quiet_trainer(tmp_path, max_epochs=7, callbacks=[es, ckpt], enable_checkpointing=True).fit(first)
    assert es.wait_count == 2 and es.stopped_epoch == 0
    resumed_es = PerplexityEarlyStopping(patience=3)
    second = ScriptedCurve(CURVE)
    trainer = quiet_trainer(tmp_path, max_epochs=len(CURVE), callbacks=[resumed_es], enable_checkpointing=True)
    trainer.fit(second, ckpt_path=ckpt.last_model_path)
    assert resumed_es.stopped_epoch == 7
    assert second.validated_epochs == [7]


def test_restore_best_weights_brings_back_the_best_epochs_weights(tmp_path):
    module = ScriptedCurve(CURVE)
    at_validation = {}

    class Snapshot(PerplexityEarlyStopping):
        def on_validation_end(self, trainer, pl_module):
            at_validation[trainer.current_epoch] = pl_module.weight.detach().clone()
            super().on_validation_end(trainer, pl_module)

    es = Snapshot(patience=3, restore_best_weights=True)
    quiet_trainer(tmp_path, max_epochs=len(CURVE), callbacks=[es]).fit(module)
    assert es.stopped_epoch == 7
    assert not torch.equal(at_validation[7], at_validation[4])
    assert torch.equal(module.weight.detach(), at_validation[4])  # epoch 4 had the best val/ppl, 7.0


class PhasedCurve(ScriptedCurve):
    """The phase protocol on a scripted curve: two phases, each with its own patience and epoch limit."""

    def __init__(self, curve, patience=(1, 2), max_epochs=(10, 10)):
        super().__init__(curve)
        self.phase, self.phase_start_epoch, self.advanced_at = 1, 0, []
        self.patiences, self.max_epochs = patience, max_epochs

    @property
    def phase_patience(self):
        return self.patiences[self.phase - 1]

    @property
    def phase_max_epochs(self):
        return self.max_epochs[self.phase - 1]

    def has_next_phase(self):
        return self.phase == 1

    def advance_phase(self, trainer, best_weights=None, why=""):
        self.advanced_at.append(trainer.current_epoch)
        self.phase, self.phase_start_epoch = 2, trainer.current_epoch + 1


def test_phase_ends_instead_of_the_run_and_the_next_phase_starts_fresh(tmp_path):
    #       phase 1: improves, then 1 bad epoch ends it | phase 2 (fresh best): 9.5 is its best, then 2 bad epochs
    curve = [5.0, 4.0, 4.5, 9.5, 9.6, 9.7, 1.0]
    module = PhasedCurve(curve, patience=(1, 2))
    es = PerplexityEarlyStopping(patience=0)  # overridden by the module's phase_patience
    quiet_trainer(tmp_path, max_epochs=len(curve), callbacks=[es]).fit(module)
    assert module.advanced_at == [2]
    assert es.stopped_epoch == 5 and module.validated_epochs == [0, 1, 2, 3, 4, 5]


def test_phase_epoch_limit_ends_a_phase_that_keeps_improving(tmp_path):
    curve = [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    module = PhasedCurve(curve, patience=(5, 5), max_epochs=(3, 2))
    quiet_trainer(tmp_path, max_epochs=len(curve), callbacks=[PerplexityEarlyStopping()]).fit(module)
    assert module.advanced_at == [2]
    assert module.validated_epochs == [0, 1, 2, 3, 4]


def test_a_run_that_ends_mid_epoch_before_validating_does_not_fail(tmp_path):
    es = PerplexityEarlyStopping(patience=1)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[es])
    trainer.fit(ScriptedCurve(CURVE))
    assert trainer.global_step == 1 and es.stopped_epoch == 0


class TrainingCurve(ScriptedCurve):
    """No validation: the scripted value is a training metric, logged at each epoch's end."""

    def on_train_epoch_end(self):
        self.log("train/metric", self.curve[self.current_epoch])


NAN = float("nan")

# (curve, callback arguments, Trainer arguments): the cases Lightning's EarlyStopping documents and tests.
PARITY_CASES = {
    "patience 0": (CURVE, {"patience": 0}, {}),
    "patience 1": (CURVE, {"patience": 1}, {}),
    "patience 3": (CURVE, {"patience": 3}, {}),
    "patience outlasting the run": (CURVE, {"patience": 4}, {}),
    "min_delta": ([9.0, 8.5, 8.0, 7.0, 6.0], {"patience": 1, "min_delta": 0.6}, {}),
    "mode max": ([0.1, 0.3, 0.2, 0.25, 0.5, 0.4], {"patience": 1, "mode": "max"}, {}),
    "stopping_threshold": (CURVE, {"patience": 5, "stopping_threshold": 7.5}, {}),
    "divergence_threshold": ([8.0, 7.0, 9.0, 6.0], {"patience": 5, "divergence_threshold": 8.5}, {}),
    "check_finite": ([9.0, 8.0, 7.0, NAN, 6.0], {"patience": 5}, {}),
    "check_finite off": ([9.0, 8.0, 7.0, NAN, 6.0, 7.0], {"patience": 1, "check_finite": False}, {}),
    "min_epochs": (CURVE, {"patience": 0}, {"min_epochs": 6}),
    "min_steps": (CURVE, {"patience": 0}, {"min_steps": 13}),  # 2 steps per epoch
}


def stopping(callback, module, tmp_path, **trainer_kwargs):
    trainer = quiet_trainer(tmp_path, max_epochs=len(module.curve), callbacks=[callback], **trainer_kwargs)
    trainer.fit(module)
    return {
        "stopped_epoch": callback.stopped_epoch,
        "wait_count": callback.wait_count,
        "stopping_reason": callback.stopping_reason,
        "epochs_run": trainer.current_epoch,
        "steps": trainer.global_step,
        "validated": module.validated_epochs,
    }


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_stops_where_lightnings_early_stopping_stops(tmp_path, case):
    curve, kwargs, trainer_kwargs = PARITY_CASES[case]
    ours = stopping(PerplexityEarlyStopping(**kwargs), ScriptedCurve(curve), tmp_path / "ours", **trainer_kwargs)
    lightning = stopping(EarlyStopping("val/ppl", **kwargs), ScriptedCurve(curve), tmp_path / "l", **trainer_kwargs)
    assert ours == lightning


def test_monitors_a_training_metric_when_there_is_no_validation_as_lightning_does(tmp_path):
    curve = [5.0, 4.0, 4.5, 4.6, 3.0]
    run = {"limit_val_batches": 0}
    ours = stopping(PerplexityEarlyStopping("train/metric", patience=1), TrainingCurve(curve), tmp_path / "o", **run)
    lightning = stopping(EarlyStopping("train/metric", patience=1), TrainingCurve(curve), tmp_path / "l", **run)
    assert ours == lightning and ours["stopped_epoch"] == 2


def test_a_missing_metric_fails_as_in_lightning_unless_not_strict(tmp_path):
    for callback in (PerplexityEarlyStopping("val/missing"), EarlyStopping("val/missing")):
        with pytest.raises(RuntimeError, match=r"Early stopping conditioned on metric `val/missing`"):
            quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(ScriptedCurve(CURVE))
    lenient = PerplexityEarlyStopping("val/missing", strict=False)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[lenient]).fit(ScriptedCurve(CURVE))
    assert lenient.stopped_epoch == 0


def test_a_bad_mode_raises_what_lightning_raises_and_a_value_error():
    with pytest.raises(MisconfigurationException) as theirs:
        EarlyStopping("val/ppl", mode="lower")
    with pytest.raises(MisconfigurationException) as ours:
        PerplexityEarlyStopping(mode="lower")
    with pytest.raises(ValueError):
        PerplexityEarlyStopping(mode="lower")
    assert str(ours.value) == str(theirs.value)  # Lightning's words, which code matching on them expects


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"patience": -1}, r"patience must be an integer >= 0, got -1"),
        ({"patience": 1.5}, r"patience must be an integer >= 0, got 1.5"),
        ({"min_delta": -0.1}, r"min_delta must be a finite number >= 0, got -0.1"),
        ({"mode": "lower"}, r"`mode` can be min, max, got lower"),
        ({"stopping_threshold": NAN}, r"stopping_threshold must be a finite number or None, got nan"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerplexityEarlyStopping(**kwargs)


class MockedPhases(ScriptedCurve):
    """A test double whose phase protocol is mocks, as a unit test's module would have: it has no real phases."""

    def __init__(self, curve):
        super().__init__(curve)
        self.phase, self.has_next_phase, self.advance_phase = Mock(), Mock(return_value=True), Mock()
        self.phase_patience, self.phase_max_epochs, self.phase_start_epoch = Mock(), Mock(), Mock()


@pytest.mark.parametrize("case", ["patience 1", "min_delta", "mode max"])
def test_a_test_double_of_a_module_stops_where_lightning_stops(tmp_path, case):
    curve, kwargs, trainer_kwargs = PARITY_CASES[case]
    module = MockedPhases(curve)
    ours = stopping(PerplexityEarlyStopping(**kwargs), module, tmp_path / "ours", **trainer_kwargs)
    lightning = stopping(EarlyStopping("val/ppl", **kwargs), MockedPhases(curve), tmp_path / "l", **trainer_kwargs)
    assert ours == lightning
    module.advance_phase.assert_not_called()


def test_a_fresh_instance_saves_and_loads_state_as_lightnings_does(tmp_path):
    fresh, theirs = PerplexityEarlyStopping(patience=2), EarlyStopping("val/ppl", patience=2)
    assert {k: v for k, v in fresh.state_dict().items() if k in theirs.state_dict()} == theirs.state_dict()
    trained = PerplexityEarlyStopping(patience=3)
    quiet_trainer(tmp_path, max_epochs=7, callbacks=[trained]).fit(ScriptedCurve(CURVE))
    state = trained.state_dict()
    ours, lightning = PerplexityEarlyStopping(patience=3), EarlyStopping("val/ppl", patience=3)
    ours.load_state_dict(state)  # before any setup, as a user restoring a callback by hand does
    lightning.load_state_dict(state)
    for name in ("wait_count", "stopped_epoch", "best_score", "patience"):
        assert getattr(ours, name) == getattr(lightning, name) == getattr(trained, name), name
    assert ours.state_dict() == state
