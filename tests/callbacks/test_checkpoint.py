from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lego_lightning.callbacks import BestAndLastCheckpoint
from tests.callbacks.test_perplexity_early_stopping import ScriptedCurve
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


def top_k(callback_class, tmp_path, curve, **kwargs):
    callback = callback_class(dirpath=tmp_path, monitor="val/ppl", filename="{epoch}", **kwargs)
    quiet_trainer(tmp_path, max_epochs=len(curve), callbacks=[callback], enable_checkpointing=True).fit(
        ScriptedCurve(curve)
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
