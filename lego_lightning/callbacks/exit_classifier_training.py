"""Train a module's learned exit classifier with the model frozen."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lego_lightning.callbacks.phase_trigger import PhaseTriggeredCallback, log_once
from lego_lightning.model.exit_classifier import TARGETS, Target, train_exit_classifier


def fit_exit_classifier(
    trainer: L.Trainer, pl_module: L.LightningModule, target: Target, lr: float = 1e-3, epochs: int = 1
) -> dict[int, dict[str, float]]:
    """``epochs`` passes over the training batches that fit ``pl_module.exit_classifier`` with the model frozen.

    Under DDP each rank takes every ``world_size``-th batch, the same number of steps, and
    gradients are averaged, so every rank ends with the same classifier. Logged once:
    ``exit_classifier/exit{k}_accuracy`` and ``exit_classifier/exit{k}_label_rate``.
    """
    loader = trainer.datamodule.train_dataloader()
    steps = len(loader) // trainer.world_size  # the same number of steps on every rank

    class Shard:  # iterable again for every epoch
        def __iter__(self) -> Any:
            shard = (b for i, b in enumerate(loader) if i % trainer.world_size == trainer.global_rank)
            for _, batch in zip(range(steps), shard):
                input_ids, targets = pl_module.model_inputs(batch)
                yield input_ids.to(pl_module.device), targets.to(pl_module.device)

    classifier = pl_module.exit_classifier
    classifier.requires_grad_(True)
    # A phase starts at a validation's end, which Lightning runs in inference mode.
    with torch.inference_mode(False), torch.enable_grad():
        stats = train_exit_classifier(
            pl_module.model,
            classifier,
            Shard(),
            target,
            lr,
            epochs=epochs,
            reduce_gradients=lambda g: trainer.strategy.reduce(g, reduce_op="mean"),
        )
    classifier.requires_grad_(False)
    metrics = {}
    for k, v in stats.items():
        metrics[f"exit_classifier/exit{k}_accuracy"] = v["accuracy"]
        metrics[f"exit_classifier/exit{k}_label_rate"] = v["label_rate"]
    log_once(trainer, metrics)
    return stats


class ExitClassifierTraining(PhaseTriggeredCallback):
    """``epochs`` passes over the training data that fit ``pl_module.exit_classifier``, the model frozen.

    When: at the start of phase ``at_phase`` (before calibration there, for ASHEM), or with
    ``at_phase=None`` at the end of training.

    Contract: the LightningModule has ``model`` (an ``ExitTransformer``), ``exit_classifier``
    (an ``ExitClassifier``) and ``model_inputs(batch) -> (input_ids, targets)``;
    ``trainer.datamodule.train_dataloader()`` gives its batches. Under DDP each rank takes every
    ``world_size``-th batch, the same number of steps, and gradients are averaged, so every
    rank ends with the same classifier.

    Logged once: ``exit_classifier/exit{k}_accuracy`` and ``exit_classifier/exit{k}_label_rate``.
    """

    def __init__(
        self, target: Target = "consistency", at_phase: int | None = None, lr: float = 1e-3, epochs: int = 1
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"ExitClassifierTraining.target={target!r} is not one of {TARGETS}")
        super().__init__(1 if at_phase is None else at_phase)
        self.at_train_end = at_phase is None
        self.target, self.lr, self.epochs = target, lr, epochs
        self.stats: dict[int, dict[str, float]] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target, at_phase=None if self.at_train_end else self.at_phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "exit_classifier", None) is None:
            raise ValueError(
                f"ExitClassifierTraining needs a module with an exit_classifier: build {type(pl_module).__name__} "
                "with confidence='learned'"
            )

    def maybe_apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.at_train_end:
            super().maybe_apply(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_train_end and not self.applied:
            self.apply(trainer, pl_module)
            self.applied = True

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stats = fit_exit_classifier(trainer, pl_module, self.target, self.lr, self.epochs)
