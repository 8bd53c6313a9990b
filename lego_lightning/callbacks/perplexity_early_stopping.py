"""Early stopping on validation perplexity that stops after exactly ``patience`` bad validations.

The research code stopped after 3 bad epochs with patience 1 (SEEDS.md section 3). This is
Lightning's ``EarlyStopping`` with the arguments checked up front and perplexity defaults:
its counter, state (saved in checkpoints, so a resumed run continues mid-patience) and
cross-rank decision are Lightning's own.

Three additions:

* **Phases.** With a module that has phases (``has_next_phase()``,
  ``advance_phase(trainer, best_weights, why)``, ``phase``, ``phase_start_epoch``,
  ``phase_max_epochs``, optionally ``phase_patience`` and ``phase_min_delta``), the end of a
  phase that has a next one (patience spent, or ``phase_max_epochs`` epochs done) advances the
  module instead of stopping the run, handing it the phase's best weights (with
  ``restore_best_weights``) and why the phase ended; the next phase starts with a fresh counter
  and its own patience. This callback only decides that a phase is over: what a phase change
  does is the module's (:meth:`~lego_lightning.modules.PhasedExitLM.enter_phase`).
* **restore_best_weights.** At the end of a phase (or of the run) the module gets back the
  weights of its best validation in that phase, as Keras does. They are kept in memory, not in
  checkpoints (a checkpoint would hold the weights twice); the checkpoint keeps the step of the
  best validation, ``best_step``, and a resumed run reads the weights back from the checkpoint
  a checkpoint callback wrote at that step (``BestAndLastCheckpoint`` keeps each phase's best),
  or takes the resumed weights when the best validation was the last one. Without either it
  stops with an error before training, not at the phase's end.
* **A stopped run stays stopped.** The decision is saved in checkpoints: a run resumed from a
  checkpoint written after it stopped (killed while it was finishing) ends at once, where
  Lightning's would train another epoch.

One default differs from Lightning (``check_on_train_epoch_end=None``): with validation, the
check runs right after each validation. Lightning checks at the end of the training epoch when
validation runs once per epoch, which fails on a missing metric when a run ends mid-epoch
(``max_steps``) before any validation. Without validation both check at the end of the
training epoch, on a training metric. Arguments, stopping rules (``min_delta``, ``patience``,
``stopping_threshold``, ``divergence_threshold``, ``check_finite``, ``strict``), ``min_epochs``
and ``min_steps`` of the Trainer, ``stopped_epoch`` and ``stopping_reason`` are Lightning's; a
bad argument raises :class:`~lego_lightning.errors.ConfigurationError`, which is both Lightning's
``MisconfigurationException`` and a ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lego_lightning.callbacks.phase_trigger import logging_step, phase_of
from lego_lightning.checkpoint_io import CheckpointError, read_checkpoint
from lego_lightning.errors import ConfigurationError


def _is_phased(pl_module: L.LightningModule) -> bool:
    return phase_of(pl_module) is not None and callable(getattr(pl_module, "advance_phase", None))


class PerplexityEarlyStopping(EarlyStopping):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` validations in a row.

    ``patience=0`` stops at the first validation without improvement (the research's
    character-level rule). Works with any LightningModule that logs ``monitor`` during
    validation; lower is better unless ``mode="max"``. See the module docstring for phases.

    Logged on a phase change: ``phase/ended_at_epoch``.
    """

    def __init__(
        self,
        monitor: str = "val/ppl",
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: Literal["min", "max"] = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        restore_best_weights: bool = False,
    ) -> None:
        name = type(self).__name__
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ConfigurationError(f"{name}.patience must be an integer >= 0, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ConfigurationError(f"{name}.min_delta must be a finite number >= 0, got {min_delta!r}")
        if not monitor:
            raise ConfigurationError(f"{name}.monitor must name a logged metric, got an empty string")
        thresholds = {"stopping_threshold": stopping_threshold, "divergence_threshold": divergence_threshold}
        for field, value in thresholds.items():
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ConfigurationError(f"{name}.{field} must be a finite number or None, got {value!r}")
        try:
            super().__init__(
                monitor=monitor,
                min_delta=min_delta,
                patience=patience,
                verbose=verbose,
                mode=mode,
                strict=strict,
                check_finite=check_finite,
                stopping_threshold=stopping_threshold,
                divergence_threshold=divergence_threshold,
                check_on_train_epoch_end=check_on_train_epoch_end,
                log_rank_zero_only=log_rank_zero_only,
            )
        except MisconfigurationException as err:  # Lightning's own checks (mode), in its words, also a ValueError
            raise ConfigurationError(str(err)) from None
        self.restore_best_weights = restore_best_weights
        self.best_weights: dict[str, torch.Tensor] | None = None  # in memory only, never in checkpoints
        self.best_step: int | None = None  # the global step of the best validation of the running phase
        self.stopped_run = False  # saved: a run resumed from its last checkpoint stays stopped

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._check_on_train_epoch_end is None:
            # Lightning checks at the end of the training epoch whenever validation runs once per
            # epoch; here only when there is no validation (so a training metric can be monitored).
            self._check_on_train_epoch_end = not trainer.enable_validation
        super().setup(trainer, pl_module, stage)

    def _fresh_best_score(self) -> torch.Tensor:
        inf = torch.tensor(torch.inf)
        return inf if self.monitor_op == torch.lt else -inf

    def _run_early_stopping_check(self, trainer: L.Trainer) -> None:
        module = trainer.lightning_module
        phased = _is_phased(module)
        if phased:
            self._follow_phase(module)
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._validate_condition_metric(logs):
            return
        current = logs[self.monitor].squeeze()
        previous_best = self.best_score.clone()
        should_stop, reason = self._evaluate_stopping_criteria(current)
        if not torch.equal(previous_best, self.best_score):
            self.best_step = trainer.global_step
            if self.restore_best_weights:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        why = reason
        if should_stop and self.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
            why = f"{self.monitor} did not improve for {self.patience} validation(s)"
        if phased:
            epochs_in_phase = trainer.current_epoch + 1 - module.phase_start_epoch
            if epochs_in_phase >= module.phase_max_epochs:
                should_stop = True
                reason = f"phase {module.phase} reached its {module.phase_max_epochs} epochs"
                why = f"it reached its {module.phase_max_epochs} epochs"
        # Every rank has the same synced metric; reduce anyway so one rank never stops alone.
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if not should_stop:
            if reason and self.verbose:
                self._log_info(trainer, reason, self.log_rank_zero_only)
            return
        best = self.best_weights if self.restore_best_weights else None
        if phased and module.has_next_phase():
            why = f"{why}; best {self.monitor} {float(self.best_score):.4g}"
            module.advance_phase(trainer, best_weights=best, why=why)
            self.wait_count = 0
            self.best_score = self._fresh_best_score()
            self.best_weights, self.best_step = None, None
            self.stopping_reason = EarlyStoppingReason.NOT_STOPPED  # the run goes on
            self._follow_phase(module)
            for logger in trainer.loggers if trainer.is_global_zero else []:
                logger.log_metrics({"phase/ended_at_epoch": float(trainer.current_epoch)}, step=logging_step(trainer))
            return
        if best is not None:
            module.load_state_dict(best)
        trainer.should_stop = True
        self.stopped_run = True
        self.stopped_epoch = trainer.current_epoch
        self.stopping_reason_message = reason
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _follow_phase(self, module: L.LightningModule) -> None:
        """The running phase's patience and min_delta, where the module has its own."""
        if getattr(module, "phase_patience", None) is not None:
            self.patience = module.phase_patience
        if getattr(module, "phase_min_delta", None) is not None:
            # Lightning keeps min_delta signed by the mode: an improvement is current - min_delta < best.
            self.min_delta = module.phase_min_delta * (1 if self.monitor_op == torch.gt else -1)

    def _recover_best_weights(self, trainer: L.Trainer) -> None:
        """After a resume, the best weights of the running phase: the resumed weights themselves when the best
        validation was the last one, else the checkpoint a checkpoint callback wrote at that step."""
        module = trainer.lightning_module
        if trainer.global_step == self.best_step:
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
            return
        paths: list[str] = []
        for callback in trainer.checkpoint_callbacks:
            paths += list(getattr(callback, "best_k_models", {}))
            paths += list(getattr(callback, "phase_best_model_paths", {}).values())
            paths += [getattr(callback, "best_model_path", ""), getattr(callback, "last_model_path", "")]
        for path in dict.fromkeys(p for p in paths if p):
            try:
                checkpoint = read_checkpoint(path, map_location="cpu", weights_only=True, mmap=True)
            except CheckpointError:
                continue
            if checkpoint.get("global_step") == self.best_step:
                self.best_weights = {k: v.clone() for k, v in checkpoint["state_dict"].items()}
                return
        raise ConfigurationError(
            f"{type(self).__name__}(restore_best_weights=True) resumed at step {trainer.global_step}, but the best "
            f"{self.monitor} of the running phase was at step {self.best_step} and no checkpoint of that step is "
            "left: keep the best checkpoint (ModelCheckpoint or BestAndLastCheckpoint with save_top_k >= 1 on the "
            "same monitor), or set restore_best_weights=False"
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed from a checkpoint written after this callback ended the run (a run killed while it
        # was finishing): the run stays finished instead of training another epoch.
        if self.stopped_run:
            trainer.should_stop = True
        elif self.restore_best_weights and self.best_weights is None and self.best_step is not None:
            self._recover_best_weights(trainer)

    def state_dict(self) -> dict[str, Any]:
        # No copy of the weights: a resumed run finds them again by best_step (see _recover_best_weights).
        return {**super().state_dict(), "best_step": self.best_step, "stopped_run": self.stopped_run}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best_step = state_dict.get("best_step")
        self.best_weights = state_dict.get("best_weights")  # checkpoints written before best_step held a copy
        self.stopped_run = bool(state_dict.get("stopped_run", False))
