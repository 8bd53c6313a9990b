"""Find the training tokens the model is unsure of, and train only on them from then on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lego_lightning.callbacks.phase_trigger import PhaseTriggeredCallback, log_once
from lego_lightning.model.lean_loss import IGNORE_INDEX


def only_hard_targets(targets: Tensor, hard: Tensor) -> Tensor:
    """``targets`` with every token that is not ``hard`` set to -100 (no loss); sequences stay whole."""
    return targets.masked_fill(~hard, IGNORE_INDEX)


@torch.no_grad()
def mine_hard_tokens(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    confidence: Callable[[Tensor], Tensor],
    threshold: float,
    batch_size: int = 256,
) -> Tensor:
    """``(N, T)`` bool: training tokens whose ``confidence(input_ids)`` is below ``threshold``, equal on every rank.

    ``trainer.datamodule.train_dataset`` holds dicts with ``input_ids``, ``targets`` and
    ``index``. Each rank scores every ``world_size``-th block and the marks are summed across
    ranks, so every rank holds the set one process finds. A set without a hard token is an error.
    """
    dataset = trainer.datamodule.train_dataset
    n = len(dataset)
    shard = Subset(dataset, range(trainer.global_rank, n, trainer.world_size))
    marks: Tensor | None = None
    was_training = pl_module.training
    pl_module.eval()
    for batch in DataLoader(shard, batch_size=batch_size):
        input_ids = batch["input_ids"].to(pl_module.device)
        hard = (confidence(input_ids) < threshold) & (batch["targets"].to(pl_module.device) != IGNORE_INDEX)
        if marks is None:
            marks = torch.zeros(n, input_ids.shape[1], dtype=torch.int32, device=pl_module.device)
        marks[batch["index"].to(pl_module.device)] = hard.int()
    pl_module.train(was_training)
    if marks is None:  # a rank with no block of its own still joins the sum
        seq_len = dataset[0]["input_ids"].shape[0]
        marks = torch.zeros(n, seq_len, dtype=torch.int32, device=pl_module.device)
    mask = trainer.strategy.reduce(marks, reduce_op="sum").bool().cpu()
    if not mask.any():
        raise ValueError(
            f"mining found no hard tokens: every training token has confidence >= {threshold}; raise the threshold "
            "(or the calibration's hard_ratio)"
        )
    return mask


class HardExampleMining(PhaseTriggeredCallback):
    """When the module enters phase ``at_phase``, mark every training token whose confidence is below the threshold.

    That is at the end of the validation that changes the phase (or at the first training batch,
    for phase 1), see :class:`~lego_lightning.callbacks.phase_trigger.PhaseTriggeredCallback`.

    From then on each training batch's ``targets`` of the other (easy) tokens are set to -100,
    so the loss covers hard tokens only while every input sequence stays whole: a hard token
    keeps its context (the research fed hard tokens as isolated states; SEEDS.md mistake 3).

    Contract:
      * the LightningModule has ``token_confidence(input_ids, exit_layer) -> (B, T)`` and a
        ``routing_threshold`` (set by :class:`QuantileThresholdCalibration`, or given);
        its loss ignores targets equal to -100;
      * ``trainer.datamodule.train_dataset`` is a map-style dataset of dicts with
        ``input_ids``, ``targets`` and ``index`` (the item's position), and training batches
        are such dicts (as :class:`~lego_lightning.data.TextDataModule` gives).

    Each rank scores every ``world_size``-th block and the marks are summed across ranks, so
    every rank holds the same set, equal to what one process finds. The set is saved in
    checkpoints (``hard_mask``, ``(N, T)`` bool): a resumed run trains on the same tokens.

    Logged once: ``{log_prefix}/hard_frac``, the fraction of training tokens mined.
    """

    def __init__(
        self, exit_layer: int | None = None, at_phase: int = 2, batch_size: int = 256, log_prefix: str = "mining"
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"HardExampleMining.batch_size must be a positive integer, got {batch_size!r}")
        super().__init__(at_phase)
        self.exit_layer, self.batch_size, self.log_prefix = exit_layer, batch_size, log_prefix
        self.hard_mask: Tensor | None = None
        self._device_mask: Tensor | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(exit_layer=self.exit_layer, at_phase=self.at_phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in ("token_confidence", "routing_threshold"):
            if not hasattr(pl_module, name):
                raise TypeError(
                    f"HardExampleMining needs a LightningModule with {name}; {type(pl_module).__name__} has none"
                )
        if stage == "fit" and not hasattr(trainer.datamodule, "train_dataset"):
            raise TypeError(
                "HardExampleMining needs trainer.datamodule.train_dataset (a dataset of dicts with an index)"
            )

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        threshold = pl_module.routing_threshold
        if threshold is None:
            raise ValueError(
                "HardExampleMining needs pl_module.routing_threshold; add QuantileThresholdCalibration before it "
                "or set a threshold"
            )
        confidence = lambda input_ids: pl_module.token_confidence(input_ids, self.exit_layer)  # noqa: E731
        self.hard_mask = mine_hard_tokens(trainer, pl_module, confidence, threshold, self.batch_size)
        self._device_mask = None
        log_once(trainer, {f"{self.log_prefix}/hard_frac": float(self.hard_mask.float().mean())})

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.hard_mask is not None:
            if self._device_mask is None or self._device_mask.device != batch["targets"].device:
                self._device_mask = self.hard_mask.to(batch["targets"].device)  # once, not every step
            batch["targets"] = only_hard_targets(batch["targets"], self._device_mask[batch["index"]])

    @property
    def hard_frac(self) -> float | None:
        return None if self.hard_mask is None else float(self.hard_mask.float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "hard_mask": self.hard_mask}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.hard_mask = state_dict.get("hard_mask")
        self._device_mask = None
