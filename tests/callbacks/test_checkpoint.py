from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lego_lightning.callbacks import BestAndLastCheckpoint
from tests.callbacks.test_perplexity_early_stopping import MockedPhases, ScriptedCurve
from tests.helpers import quiet_trainer


def test_last_checkpoint_follows_every_epoch_and_best_the_best(tmp_path):
    # val/ppl improves at epochs 0, 1 and 4 only (see CURVE); last.ckpt must still follow epochs 2, 3 and 5.
    seen = []

    class Recorder(BestAndLastCheckpoint):
        def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
            super().on_train_epoch_end(trainer, pl_module)
            seen.append(torch.load(self.last_model_path, weights_only=True)["epoch"])

    ckpt = Recorder(dirpath=tmp_path, monitor="val/ppl", mode="min", save_last=True)
    quiet_trainer(tmp_path, max_epochs=6, callbacks=[ckpt], enable_checkpointing=True).fit(
        ScriptedCurve([9.0, 8.0, 8.5, 8.1, 7.0, 7.5])
    )
    assert seen == [0, 1, 2, 3, 4, 5]
    assert torch.load(ckpt.best_model_path, weights_only=True)["epoch"] == 4


def top_k(callback_class, tmp_path, curve, module_class=ScriptedCurve, **kwargs):
    callback = callback_class(dirpath=tmp_path, monitor="val/ppl", filename="{epoch}", **kwargs)
    quiet_trainer(tmp_path, max_epochs=len(curve), callbacks=[callback], enable_checkpointing=True).fit(
        module_class(curve)
    )
    named = {Path(path).name: float(score) for path, score in callback.best_k_models.items()}
    files = sorted(p.name for p in tmp_path.glob("*.ckpt") if p.name != "last.ckpt")
    return named, Path(callback.best_model_path).name, float(callback.best_model_score), files


@pytest.mark.parametrize(
    "kwargs",
    [{"save_top_k": 1}, {"save_top_k": 2}, {"save_top_k": -1}, {"save_top_k": 2, "mode": "max"}, {"save_last": True}],
)
def test_top_k_checkpoints_are_model_checkpoints(tmp_path, kwargs):
    curve = [9.0, 8.0, 8.5, 8.1, 7.0, 7.5]
    ours = top_k(BestAndLastCheckpoint, tmp_path / "ours", curve, **kwargs)
    lightning = top_k(ModelCheckpoint, tmp_path / "lightning", curve, **kwargs)
    assert ours == lightning


@pytest.mark.parametrize("kwargs", [{"save_top_k": 2}, {"save_last": True}])
def test_a_test_double_of_a_module_gets_model_checkpoints_checkpoints(tmp_path, kwargs):
    curve = [9.0, 8.0, 8.5, 8.1, 7.0, 7.5]
    ours = top_k(BestAndLastCheckpoint, tmp_path / "ours", curve, MockedPhases, **kwargs)
    lightning = top_k(ModelCheckpoint, tmp_path / "lightning", curve, MockedPhases, **kwargs)
    assert ours == lightning


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items()
    )


def test_a_fresh_instance_saves_and_loads_state_as_model_checkpoint_does(tmp_path):
    fresh = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_top_k=2)
    theirs = ModelCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_top_k=2)
    ours_state = fresh.state_dict()  # before any setup
    assert same_state({k: v for k, v in ours_state.items() if k in theirs.state_dict()}, theirs.state_dict())
    assert ours_state["phase"] is None and ours_state["phase_best_model_paths"] == {}
    trained = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_top_k=2)
    quiet_trainer(tmp_path, max_epochs=5, callbacks=[trained], enable_checkpointing=True).fit(
        ScriptedCurve([9.0, 8.0, 8.5, 8.1, 7.0])
    )
    state = trained.state_dict()
    ours = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_top_k=2)
    lightning = ModelCheckpoint(dirpath=tmp_path, monitor="val/ppl", save_top_k=2)
    ours.load_state_dict(state)
    lightning.load_state_dict(state)
    for name in ("best_model_path", "best_k_models", "kth_best_model_path", "last_model_path"):
        assert getattr(ours, name) == getattr(lightning, name) == getattr(trained, name), name
    reloaded, theirs_reloaded = ours.state_dict(), lightning.state_dict()
    assert same_state({k: v for k, v in reloaded.items() if k in theirs_reloaded}, theirs_reloaded)
    assert reloaded["phase"] == state["phase"] and reloaded["phase_best_model_paths"] == state["phase_best_model_paths"]
