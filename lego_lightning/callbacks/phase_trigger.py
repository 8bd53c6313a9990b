"""A callback that acts once, when its phase starts, and remembers that it did across resumes."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def current_phase(pl_module: L.LightningModule) -> int:
    """The module's ``phase`` attribute when it is an integer; 1 for a module without phases."""
    phase = getattr(pl_module, "phase", None)
    return phase if isinstance(phase, int) and not isinstance(phase, bool) else 1


def phase_of(pl_module: L.LightningModule) -> int | None:
    """The running phase of a module that has phases (an integer ``phase`` and ``has_next_phase()``), else ``None``.

    Any other module, one without phases or a test double whose every attribute is a mock, has no
    phases: the callbacks that keep state per phase then behave as their Lightning parents.
    """
    if not callable(getattr(pl_module, "has_next_phase", None)):
        return None
    phase = getattr(pl_module, "phase", None)
    return phase if isinstance(phase, int) and not isinstance(phase, bool) else None


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning's own ``self.log`` writes at now (it counts batches that stepped, not ``global_step``).

    Values written straight to a logger use it too, so they share one axis with Lightning's:
    the validation that ends a phase and the threshold calibrated right after it land on the
    same step, and a resumed run that hides what was logged after its checkpoint
    (TensorBoard's ``purge_step``) hides neither.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def log_once(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Write values straight to every logger at the current step.

    ``self.log`` at a batch hook is only written every ``log_every_n_steps``; a value computed
    once (a threshold, a mined fraction) must not depend on that.
    """
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logging_step(trainer))


class PhaseTriggeredCallback(Callback):
    """Runs :meth:`apply` once, as soon as the module is in phase ``at_phase``.

    It checks at the end of every validation (where ``PerplexityEarlyStopping`` changes the
    phase; placed after it in the callback list, it acts right away, so the checkpoint
    ``ModelCheckpoint`` writes next already holds the new phase's model) and at every training
    batch (phase 1 is the start of training, also for a module without phases). ``applied`` is
    saved in checkpoints, so a resumed run does not act twice; subclasses restore what they
    changed in :meth:`on_load_checkpoint`.
    """

    def __init__(self, at_phase: int = 2) -> None:
        if not isinstance(at_phase, int) or isinstance(at_phase, bool) or at_phase < 1:
            raise ValueError(f"{type(self).__name__}.at_phase must be a positive integer, got {at_phase!r}")
        self.at_phase = at_phase
        self.applied = False

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def maybe_apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.applied and current_phase(pl_module) >= self.at_phase:
            self.apply(trainer, pl_module)
            self.applied = True

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.maybe_apply(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self.maybe_apply(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict["applied"])

    def _own_state(self, checkpoint: dict[str, Any]) -> dict[str, Any] | None:
        return checkpoint.get("callbacks", {}).get(self.state_key)
