"""``ModelCheckpoint`` whose ``last.ckpt`` is really the last one."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` after every validation.

    Since Lightning 2.6, ``save_last=True`` writes ``last.ckpt`` only when a top-k checkpoint
    was saved at the same step: after an epoch that does not improve the monitored metric,
    ``last.ckpt`` still holds an older epoch, and resuming from it silently repeats training.
    Everything else (top-k by ``monitor``, file names, state) is ``ModelCheckpoint``'s.
    """

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # After the parent's save, _should_skip_saving_checkpoint is true when it wrote anything this step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
