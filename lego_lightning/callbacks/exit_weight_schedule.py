"""Exit loss weights that change over training: the research's "dynamic alpha", LayerSkip's curricula."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

from lego_lightning.model.exits import WEIGHT_SCALES, exit_weights

Curriculum = Literal["gradual", "rotational"]
CURRICULA = ("gradual", "rotational")


class ExitWeightSchedule(Callback):
    """Per-exit loss weights as a function of training progress (epochs or optimizer steps).

    Two curricula:

    * ``gradual`` (default): the weights move linearly from ``start`` to ``end`` over
      ``duration`` epochs or steps, then stay at ``end``.
    * ``rotational`` (LayerSkip's): every ``period`` epochs or steps a different exit before the
      last trains, in turn from the shallowest, beside the last exit, which always trains. The
      two get their ``end`` weights, rescaled so the weights still sum to ``end``'s sum; every
      other exit gets 0 and runs no head, so a step costs two heads, not one per exit.

    ``start`` and ``end`` are one weight per exit (shallowest first), or a rule resolved against
    the module's exits when training starts, so one config fits a model of any depth: ``final``
    (the last exit alone), ``uniform``, or LayerSkip's scales over the exits' depth ``l``,
    ``sqrt_l``, ``inv_l``, ``inv_sqrt_l``, ``sum_l``, each normalised to sum 1
    (:data:`~lego_lightning.model.exits.WEIGHT_SCALES`).

    The weights are a function of the trainer's progress (``current_epoch`` or
    ``global_step``), so a resumed run sets exactly the weights the uninterrupted run had.

    Contract: the LightningModule has ``num_exits`` (int) and
    ``set_exit_loss_weights(weights: Sequence[float])``, shallowest exit first, as
    :class:`~lego_lightning.SupervisedExitLM` does; a rule reads the exits' layers from
    ``config.exit_layers`` (1, 2, ... for a module without it).

    Logged: ``train/exit_weight/{k}`` for the exit after layer ``k`` (the 1-based position for a module
    without ``config.exit_layers``).
    """

    def __init__(
        self,
        start: Sequence[float] | str | None = None,
        end: Sequence[float] | str = "uniform",
        duration: int | None = None,
        unit: Literal["epochs", "steps"] = "epochs",
        curriculum: Curriculum = "gradual",
        period: int = 1,
    ) -> None:
        name = type(self).__name__
        if curriculum not in CURRICULA:
            raise ValueError(f"{name}.curriculum={curriculum!r} is not one of {CURRICULA}")
        if curriculum == "gradual":
            if start is None or duration is None:
                raise ValueError(f"{name}: the gradual curriculum needs start, end and duration")
            if not isinstance(duration, int) or duration < 1:
                raise ValueError(f"{name}.duration must be a positive integer, got {duration!r}")
        elif start is not None or duration is not None:
            raise ValueError(
                f"{name}: start and duration are the gradual curriculum's; rotational takes end and period"
            )
        if not isinstance(period, int) or isinstance(period, bool) or period < 1:
            raise ValueError(f"{name}.period must be a positive integer, got {period!r}")
        if unit not in ("epochs", "steps"):
            raise ValueError(f"{name}.unit must be 'epochs' or 'steps', got {unit!r}")
        given = {"start": start, "end": end} if curriculum == "gradual" else {"end": end}
        for field, weights in given.items():
            if isinstance(weights, str):
                if weights not in WEIGHT_SCALES:
                    raise ValueError(f"{name}.{field}={weights!r} is not a rule: allowed {tuple(WEIGHT_SCALES)}")
            elif any(not math.isfinite(w) or w < 0 for w in weights) or not any(w > 0 for w in weights):
                raise ValueError(f"{name}.{field} must be finite weights >= 0, not all 0, got {list(weights)}")
        if (
            curriculum == "gradual"
            and not isinstance(start, str)
            and not isinstance(end, str)
            and len(start) != len(end)
        ):
            raise ValueError(f"{name}.start and .end need the same non-zero length, got {list(start)} and {list(end)}")
        self.start = start if start is None or isinstance(start, str) else [float(w) for w in start]
        self.end = end if isinstance(end, str) else [float(w) for w in end]
        self.duration, self.unit, self.curriculum, self.period = duration, unit, curriculum, period
        self._layers: list[int] = []  # the module's exit layers, known at setup

    @property
    def state_key(self) -> str:
        rotational = {"curriculum": self.curriculum, "period": self.period} if self.curriculum == "rotational" else {}
        return self._generate_state_key(
            start=self.start, end=self.end, duration=self.duration, unit=self.unit, **rotational
        )

    def _resolve(self, weights: Sequence[float] | str | None, field: str) -> list[float]:
        """``weights`` for the module's exits: a rule resolved against their layers, or the list, checked."""
        if isinstance(weights, str):
            return exit_weights(weights, self._layers, f"{type(self).__name__}.{field}")
        assert weights is not None
        if len(weights) != len(self._layers):
            raise ValueError(
                f"{type(self).__name__} has {len(weights)} weights but the module has {len(self._layers)} exits"
            )
        return list(weights)

    def weights_at(self, progress: int) -> list[float]:
        """Weights after ``progress`` epochs or steps (the module's exits must be known: after ``setup``)."""
        end = self._resolve(self.end, "end")
        if self.curriculum == "gradual":
            assert self.duration is not None
            start = self._resolve(self.start, "start")
            t = min(1.0, max(0.0, progress / self.duration))
            return [a + t * (b - a) for a, b in zip(start, end)]
        turns = [i for i, w in enumerate(end[:-1]) if w > 0]  # the exits before the last that take turns
        if not turns:
            return end
        on = {turns[(progress // self.period) % len(turns)], len(end) - 1}
        weights = [w if i in on else 0.0 for i, w in enumerate(end)]
        rescale = sum(end) / sum(weights)
        return [w * rescale for w in weights]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "set_exit_loss_weights", None)) or not hasattr(pl_module, "num_exits"):
            raise TypeError(
                f"ExitWeightSchedule needs a LightningModule with num_exits and set_exit_loss_weights(weights); "
                f"{type(pl_module).__name__} has not"
            )
        # An exit is named by the layer it follows; a module without config.exit_layers, by position.
        layers = getattr(getattr(pl_module, "config", None), "exit_layers", None)
        n = pl_module.num_exits
        self._layers = list(layers) if layers is not None and len(layers) == n else list(range(1, n + 1))
        for field in ("start", "end"):
            if getattr(self, field) is not None:
                self._resolve(getattr(self, field), field)  # a list of the wrong length fails here, before training

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule, progress: int) -> None:
        weights = self.weights_at(progress)
        pl_module.set_exit_loss_weights(weights)
        per_epoch = self.unit == "epochs"
        for k, w in zip(self._layers, weights):
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
