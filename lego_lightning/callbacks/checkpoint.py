"""``ModelCheckpoint`` whose ``last.ckpt`` is really the last one, written whole, and resumed from exactly."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lego_lightning.checkpoint_io import AtomicCheckpointIO


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` after every validation.

    Since Lightning 2.6, ``save_last=True`` writes ``last.ckpt`` only when a top-k checkpoint
    was saved at the same step: after an epoch that does not improve the monitored metric,
    ``last.ckpt`` still holds an older epoch, and resuming from it silently repeats training.
    Everything else (top-k by ``monitor``, file names, state) is ``ModelCheckpoint``'s, with
    two differences that make every checkpoint one a run can resume from:

    * On a Trainer with Lightning's default checkpoint writer it installs
      :class:`~lego_lightning.checkpoint_io.AtomicCheckpointIO` at ``setup``: a checkpoint is
      written whole or not at all, so a full disk never leaves a truncated ``.ckpt``.
    * With ``every_n_train_steps`` and ``save_last``, a step whose batch a validation (or the
      epoch's end) follows is saved there, at the same step, instead of before it. A
      checkpoint taken before that validation would resume past it: Lightning does not rerun
      a validation a checkpoint was taken before, so early stopping and phase changes would
      miss it.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # The checkpoint a run resumes from is this step's checkpoint: nothing to write again at
        # this step (a run resumed after its last checkpoint would otherwise rewrite it at the end).
        self._last_global_step_saved = checkpoint["global_step"]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_global_step_saved:
            super().on_train_end(trainer, pl_module)

    def _save_last_if_missed(self, trainer: L.Trainer) -> None:
        # After the parent's save, _should_skip_saving_checkpoint is true when it wrote anything this step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _saves_again_at_this_step(self, trainer: L.Trainer) -> bool:
        """Whether a validation or the epoch's end comes right after this batch, where this callback saves too."""
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            return True
        return epoch_loop.batch_progress.is_last_batch and self._should_save_on_train_epoch_end(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.save_last and self._saves_again_at_this_step(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_missed(trainer)
