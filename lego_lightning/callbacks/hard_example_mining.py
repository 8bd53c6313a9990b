"""Find the training tokens the model is unsure of, and train only on them from then on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from lego_lightning.callbacks.phase_trigger import PhaseTriggeredCallback, log_once
from lego_lightning.data.token_set import TokenSet
from lego_lightning.model.lean_loss import IGNORE_INDEX


def on_device(tokens: TokenSet, cached: TokenSet | None, device: torch.device) -> TokenSet:
    """``tokens`` on ``device``, copied once (``cached`` when it is there already), not every step."""
    return cached if cached is not None and cached.bits.device == device else tokens.to(device)


def only_hard_targets(targets: Tensor, hard: Tensor) -> Tensor:
    """``targets`` with every token that is not ``hard`` set to -100 (no loss); sequences stay whole."""
    return targets.masked_fill(~hard, IGNORE_INDEX)


@torch.no_grad()
def mark_tokens(
    dataset: Dataset,
    confidence: Callable[[Tensor], Tensor],
    threshold: float,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 256,
) -> TokenSet:
    """The tokens of ``dataset``'s blocks ``rank, rank + world_size, ...`` whose confidence is below ``threshold``.

    ``dataset`` holds dicts with ``input_ids``, ``targets`` and ``index``. The set takes one bit
    per training token, and a batch of blocks at a time is scored: memory grows with the set's
    bits, not with the logits or the number of tokens.
    """
    n = len(dataset)
    seq_len = dataset[0]["input_ids"].shape[0]
    marks = TokenSet.empty(n, seq_len, device)
    for batch in DataLoader(Subset(dataset, range(rank, n, world_size)), batch_size=batch_size):
        input_ids = batch["input_ids"].to(device)
        hard = (confidence(input_ids) < threshold) & (batch["targets"].to(device) != IGNORE_INDEX)
        marks.mark(batch["index"], hard)
    return marks


def mine_hard_tokens(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    confidence: Callable[[Tensor], Tensor],
    threshold: float,
    batch_size: int = 256,
) -> TokenSet:
    """Training tokens whose ``confidence(input_ids)`` is below ``threshold``, the same set on every rank.

    ``trainer.datamodule.train_dataset`` holds dicts with ``input_ids``, ``targets`` and
    ``index``. Each rank marks every ``world_size``-th block (:func:`mark_tokens`) and the ranks'
    bits are summed: the rows are disjoint, so the sum is their union, the set one process
    finds. A set without a hard token is an error.
    """
    was_training = pl_module.training
    pl_module.eval()
    marks = mark_tokens(
        trainer.datamodule.train_dataset,
        confidence,
        threshold,
        pl_module.device,
        trainer.global_rank,
        trainer.world_size,
        batch_size,
    )
    pl_module.train(was_training)
    hard = TokenSet(trainer.strategy.reduce(marks.bits, reduce_op="sum").cpu(), marks.seq_len)
    if not hard.count():
        raise ValueError(
            f"mining found no hard tokens: every training token has confidence >= {threshold}; raise the threshold "
            "(or the calibration's hard_ratio)"
        )
    return hard


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
    checkpoints (``hard_tokens``, one bit per training token): a resumed run trains on the same tokens.

    Logged once: ``{log_prefix}/hard_frac``, the fraction of training tokens mined.
    """

    def __init__(
        self, exit_layer: int | None = None, at_phase: int = 2, batch_size: int = 256, log_prefix: str = "mining"
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"HardExampleMining.batch_size must be a positive integer, got {batch_size!r}")
        super().__init__(at_phase)
        self.exit_layer, self.batch_size, self.log_prefix = exit_layer, batch_size, log_prefix
        self.hard_tokens: TokenSet | None = None
        self._device_tokens: TokenSet | None = None

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
        self.hard_tokens = mine_hard_tokens(trainer, pl_module, confidence, threshold, self.batch_size)
        self._device_tokens = None
        log_once(trainer, {f"{self.log_prefix}/hard_frac": self.hard_tokens.fraction()})

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.hard_tokens is not None:
            self._device_tokens = on_device(self.hard_tokens, self._device_tokens, batch["targets"].device)
            batch["targets"] = only_hard_targets(batch["targets"], self._device_tokens.rows(batch["index"]))

    @property
    def hard_mask(self) -> Tensor | None:
        """The hard set as ``(N, T)`` bool, read into memory (small sets: tests, reports)."""
        return None if self.hard_tokens is None else self.hard_tokens.to_mask()

    @property
    def hard_frac(self) -> float | None:
        return None if self.hard_tokens is None else self.hard_tokens.fraction()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "hard_tokens": None if self.hard_tokens is None else self.hard_tokens.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Earlier checkpoints kept the set as an (N, T) bool mask.
        self.hard_tokens = TokenSet.from_state(state_dict.get("hard_tokens", state_dict.get("hard_mask")))
        self._device_tokens = None
