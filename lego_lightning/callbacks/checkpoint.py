"""``ModelCheckpoint`` whose ``last.ckpt`` is really the last one, written whole, and resumed from exactly."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lego_lightning.callbacks.phase_trigger import phase_of
from lego_lightning.checkpoint_io import AtomicCheckpointIO

# The names the ``lego`` CLI gives best checkpoints; a phased module's say the phase. A name the user
# chose is kept as it is (``{phase}`` works in it).
DEFAULT_FILENAME = "best-{epoch}-{step}"
PHASED_FILENAME = "best-{phase}-{epoch}-{step}"


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

    With a module that has phases (a ``phase`` attribute and ``has_next_phase()``, as
    :class:`~lego_lightning.modules.PhasedExitLM`), the top-k checkpoints are kept per phase: a
    phase's metric describes a different model than the next phase's (ASHEM's ``val/ppl`` is the
    shallow exit in phase 1 and the routed model in phase 2), so they never compete. File names
    say the phase (``best-phase=2-epoch=7-step=80.ckpt``); when a phase ends its best
    checkpoints stay on disk, listed in ``phase_best_model_paths`` (phase -> path), and
    ``best_model_path`` (``ckpt_path="best"``) is the running phase's best, at the end the final
    phase's (until a phase has ranked a checkpoint, the previous phase's). The validation at
    which a phase ends measured the old phase's model: it is ranked among that phase's
    checkpoints before the module changes phase (:meth:`rank_before_phase_change`, which
    ``PhasedExitLM.enter_phase`` calls first), and ``last.ckpt`` written after it holds the next
    phase's model. A name chosen with ``filename`` is kept; ``{phase}`` may be used in it.
    Top-k checkpoints of a phased module are ranked at validations only, also with
    ``every_n_train_steps`` (where Lightning would rank the last validation's metric at a later
    step, with later weights): a phase's best checkpoint holds the weights that scored it.
    """

    # Per-phase state, here so that a fresh instance saves and loads its state before any setup.
    _phase: int | None = None

    @property
    def phase_best_model_paths(self) -> dict[int, str]:
        """Each ended phase's best checkpoint (phase -> path); empty for a module without phases."""
        return self.__dict__.setdefault("_phase_best_model_paths", {})

    @phase_best_model_paths.setter
    def phase_best_model_paths(self, paths: dict[int, str]) -> None:
        self.__dict__["_phase_best_model_paths"] = paths

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self._phase = phase_of(pl_module)  # a resumed run's comes from the checkpoint's state
        if phase_of(pl_module) is not None and self.filename in (None, DEFAULT_FILENAME):
            self.filename = PHASED_FILENAME if self.filename else "{phase}-{epoch}-{step}"

    def _monitor_candidates(self, trainer: L.Trainer) -> dict[str, Any]:
        candidates = super()._monitor_candidates(trainer)
        phase = phase_of(trainer.lightning_module)
        if phase is not None:
            candidates["phase"] = torch.tensor(phase)
        return candidates

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        phase = phase_of(trainer.lightning_module)
        if phase is not None and not getattr(self, "_at_validation", False):
            # A step checkpoint would rank the last validation's metric with later weights: a phase's best
            # checkpoint must hold the weights that scored it (what restore_best_weights reads after a resume).
            return
        if phase is not None and self._phase is not None and phase != self._phase:
            # The phase changed at this validation: its metric is the old phase's; the new phase starts afresh.
            if self.best_model_path:
                self.phase_best_model_paths[self._phase] = self.best_model_path
            self.best_k_models = {}
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(torch.inf if self.mode == "min" else -torch.inf)
            self._phase = phase  # best_model_path stays the last phase's until this one ranks a checkpoint
            return
        self._phase = phase
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def state_dict(self) -> dict[str, Any]:
        phased = {"phase": self._phase, "phase_best_model_paths": dict(self.phase_best_model_paths)}
        return {**super().state_dict(), **phased}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._phase = state_dict.get("phase", self._phase)
        self.phase_best_model_paths = {int(k): v for k, v in state_dict.get("phase_best_model_paths", {}).items()}

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
        if not trainer.sanity_checking:
            self._validated_step = trainer.global_step
        if self._should_save_on_train_epoch_end(trainer):
            super().on_validation_end(trainer, pl_module)
            return
        self._save_with_phase_ranking(
            trainer, lambda: super(BestAndLastCheckpoint, self).on_validation_end(trainer, pl_module)
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._should_save_on_train_epoch_end(trainer):
            super().on_train_epoch_end(trainer, pl_module)
            return
        self._save_with_phase_ranking(
            trainer, lambda: super(BestAndLastCheckpoint, self).on_train_epoch_end(trainer, pl_module)
        )

    def rank_before_phase_change(self, trainer: L.Trainer) -> None:
        """Rank the validation that ends a phase among that phase's checkpoints, before the module changes phase.

        :meth:`~lego_lightning.modules.PhasedExitLM.enter_phase` calls it first: after the change the
        module is the next phase's, and the checkpoint written at this validation holds that one.
        """
        if self.save_top_k == 0 or self.monitor not in trainer.callback_metrics or trainer.sanity_checking:
            return
        self._at_validation = True
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        self._at_validation = False
        self._phase_change_step = trainer.global_step

    def _save_with_phase_ranking(self, trainer: L.Trainer, save: Any) -> None:
        """``save`` (the parent's hook), then ``last.ckpt`` if it missed it; a phased module's top-k is ranked here,
        right after a validation, also where the parent ranks only at step checkpoints (``every_n_train_steps``)."""
        if getattr(self, "_phase_change_step", None) == trainer.global_step:
            # Ranked before the phase changed; now the new phase starts afresh and last.ckpt holds its model.
            candidates = self._monitor_candidates(trainer)
            self._at_validation = True
            self._save_topk_checkpoint(trainer, candidates)
            self._at_validation = False
            self._last_checkpoint_saved = ""  # save_last="link" must not point at the old phase's file
            self._save_last_checkpoint(trainer, candidates)
            return
        validated = getattr(self, "_validated_step", None) == trainer.global_step
        rank = (
            validated
            and phase_of(trainer.lightning_module) is not None
            and not self._should_skip_saving_checkpoint(trainer)
            and not (self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0)
        )
        self._at_validation = validated
        if rank:  # what the parent's hook does where it ranks: top-k first, so last.ckpt's state lists it
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        else:
            save()
            self._save_last_if_missed(trainer)
        self._at_validation = False
