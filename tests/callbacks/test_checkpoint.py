import torch

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
