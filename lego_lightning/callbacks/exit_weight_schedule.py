"""Move exit loss weights from start to end values over training (the research's "dynamic alpha")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback


class ExitWeightSchedule(Callback):
    """Linear interpolation of per-exit loss weights from ``start`` to ``end`` over ``duration`` epochs or steps.

    The weights are a function of the trainer's progress (``current_epoch`` or
    ``global_step``), so a resumed run sets exactly the weights the uninterrupted run had.

    Contract: the LightningModule has ``num_exits`` (int) and
    ``set_exit_loss_weights(weights: Sequence[float])``, shallowest exit first, as
    :class:`~lego_lightning.SupervisedExitLM` does.

    Logged: ``train/exit_weight/{k}`` for the exit after layer ``k`` (the 1-based position for a module
    without ``config.exit_layers``).
    """

    def __init__(
        self,
        start: Sequence[float],
        end: Sequence[float],
        duration: int,
        unit: Literal["epochs", "steps"] = "epochs",
    ) -> None:
        start, end = [float(w) for w in start], [float(w) for w in end]
        if len(start) != len(end) or not start:
            raise ValueError(f"ExitWeightSchedule.start and .end need the same non-zero length, got {start} and {end}")
        for name, weights in (("start", start), ("end", end)):
            if any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
                raise ValueError(f"ExitWeightSchedule.{name} must be finite weights >= 0, not all 0, got {weights}")
        if not isinstance(duration, int) or duration < 1:
            raise ValueError(f"ExitWeightSchedule.duration must be a positive integer, got {duration!r}")
        if unit not in ("epochs", "steps"):
            raise ValueError(f"ExitWeightSchedule.unit must be 'epochs' or 'steps', got {unit!r}")
        self.start, self.end, self.duration, self.unit = start, end, duration, unit

    @property
    def state_key(self) -> str:
        return self._generate_state_key(start=self.start, end=self.end, duration=self.duration, unit=self.unit)

    def weights_at(self, progress: int) -> list[float]:
        """Weights after ``progress`` epochs or steps."""
        t = min(1.0, max(0.0, progress / self.duration))
        return [a + t * (b - a) for a, b in zip(self.start, self.end)]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "set_exit_loss_weights", None)) or not hasattr(pl_module, "num_exits"):
            raise TypeError(
                f"ExitWeightSchedule needs a LightningModule with num_exits and set_exit_loss_weights(weights); "
                f"{type(pl_module).__name__} has not"
            )
        if pl_module.num_exits != len(self.start):
            raise ValueError(
                f"ExitWeightSchedule has {len(self.start)} weights but the module has {pl_module.num_exits} exits"
            )

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, progress: int) -> None:
        weights = self.weights_at(progress)
        pl_module.set_exit_loss_weights(weights)
        per_epoch = self.unit == "epochs"
        # An exit is named by the layer it follows; a module without config.exit_layers, by position.
        layers = getattr(getattr(pl_module, "config", None), "exit_layers", None) or range(1, len(weights) + 1)
        for k, w in zip(layers, weights):
            # sync_dist: equal on every rank, so the reduction changes nothing and Lightning does not warn under DDP.
            pl_module.log(f"train/exit_weight/{k}", w, on_step=not per_epoch, on_epoch=per_epoch, sync_dist=per_epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.unit == "epochs":
            self._apply(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.unit == "steps":
            self._apply(trainer, pl_module, trainer.global_step)
