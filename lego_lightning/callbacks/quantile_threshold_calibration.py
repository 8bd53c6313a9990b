"""Calibrate an early-exit threshold so that a target fraction of held-out tokens falls below it.

``torch.quantile`` refuses inputs above 2^24 elements (SEEDS.md mistake 5), and a quantile of
confidences gathered on each rank would differ between ranks. Here every rank counts its
share of tokens into the same fixed bins (int64 counts, exact at any size), the counts are
summed across ranks, and the threshold is read off the summed histogram, so it is identical
everywhere and within one bin of the exact quantile.

The bins are spaced evenly in ``log(confidence)`` from ``floor`` to 1: the max-softmax of a
model with a large vocabulary lives between ``1/V`` and a few percent, where even bins over
``[0, 1]`` would put most tokens into a handful of bins. With the default 65,536 bins over six
decades, neighbouring edges differ by 0.02%.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lego_lightning.callbacks.phase_trigger import PhaseTriggeredCallback, log_once, logging_step
from lego_lightning.data.blocks import unpack_batch
from lego_lightning.model.lean_loss import IGNORE_INDEX

FLOOR = 1e-6


def upper_edge(index: int, bins: int, floor: float = FLOOR) -> float:
    """Upper edge of bin ``index``: ``floor ** (1 - (index + 1) / bins)``; the last bin ends at 1."""
    return float(floor ** (1.0 - (index + 1) / bins))


def confidence_histogram(confidences: Tensor, bins: int, floor: float = FLOOR) -> Tensor:
    """Counts ``(bins,)`` int64 of confidences in ``[0, 1]`` over log-spaced bins from ``floor`` to 1.

    Bin ``i`` holds ``[upper_edge(i - 1), upper_edge(i))``; confidences below ``floor`` go to bin
    0 and 1.0 to the last bin.
    """
    logc = confidences.detach().flatten().double().clamp(min=floor).log()
    index = ((logc - math.log(floor)) / -math.log(floor) * bins).floor().long().clamp_(0, bins - 1)
    return torch.bincount(index, minlength=bins)


def threshold_bin(counts: Tensor, ratio: float) -> int:
    """The first bin whose upper edge has at least ``ratio`` of the counted confidences below it."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    total = int(counts.sum())
    if total == 0:
        raise ValueError("cannot calibrate a threshold on zero tokens")
    below = torch.cumsum(counts, 0)  # below[i]: confidences under upper_edge(i)
    return int(torch.searchsorted(below, torch.tensor(math.ceil(ratio * total), dtype=below.dtype)))


def threshold_for_ratio(counts: Tensor, ratio: float, floor: float = FLOOR) -> float:
    """The smallest bin edge ``t`` with at least ``ratio`` of the counted confidences below it.

    The fraction below ``t`` lies in ``[ratio, ratio + share of one bin)``.
    """
    return upper_edge(threshold_bin(counts, ratio), len(counts), floor)


@torch.no_grad()
def confidence_counts(
    trainer: L.Trainer, pl_module: L.LightningModule, confidence: Callable[[Tensor], Tensor], bins: int
) -> tuple[Tensor, float, float]:
    """Histogram counts of held-out tokens' confidences, summed over all ranks, and their sum and sum of squares.

    The tokens come from ``trainer.datamodule.calibration_dataloader()``, or ``val_dataloader()``
    when the data module has no calibration split; each rank counts every ``world_size``-th
    batch, and targets equal to -100 are left out. ``confidence(input_ids) -> (B, T)``.
    """
    datamodule = trainer.datamodule
    loader_fn = getattr(datamodule, "calibration_dataloader", None) or datamodule.val_dataloader
    counts = torch.zeros(bins, dtype=torch.long, device=pl_module.device)
    moments = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
    was_training = pl_module.training
    pl_module.eval()
    for i, batch in enumerate(loader_fn()):
        if i % trainer.world_size != trainer.global_rank:
            continue
        input_ids, targets = (t.to(pl_module.device) for t in unpack_batch(batch))
        conf = confidence(input_ids)[targets != IGNORE_INDEX]
        counts += confidence_histogram(conf, bins)
        moments += torch.stack([conf.double().sum(), conf.double().pow(2).sum()])
    pl_module.train(was_training)
    counts = trainer.strategy.reduce(counts, reduce_op="sum")
    moments = trainer.strategy.reduce(moments, reduce_op="sum")
    return counts, float(moments[0]), float(moments[1])


def calibrate_threshold(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    confidence: Callable[[Tensor], Tensor],
    hard_ratio: float,
    bins: int = 65_536,
    log_prefix: str = "calibration",
) -> float:
    """The threshold with ``hard_ratio`` of held-out tokens below it, the same on every rank.

    Logged once: ``{log_prefix}/threshold``, ``{log_prefix}/calibration_hard_frac`` and, with
    TensorBoard, a histogram ``{log_prefix}/confidence``.
    """
    counts, total, squares = confidence_counts(trainer, pl_module, confidence, bins)
    counts = counts.cpu()
    index = threshold_bin(counts, hard_ratio)
    threshold = upper_edge(index, bins)
    n = int(counts.sum())
    below = int(counts[: index + 1].sum())
    log_once(trainer, {f"{log_prefix}/threshold": threshold, f"{log_prefix}/calibration_hard_frac": below / n})
    _log_histogram(trainer, f"{log_prefix}/confidence", counts, n, total, squares)
    return threshold


def _log_histogram(trainer: L.Trainer, tag: str, counts: Tensor, n: int, total: float, squares: float) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    bins = len(counts)
    nonzero = torch.nonzero(counts).flatten()
    if not trainer.is_global_zero or len(nonzero) == 0:
        return
    lo, hi = int(nonzero[0]), int(nonzero[-1])
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram_raw(
                tag,
                min=upper_edge(lo - 1, bins) if lo else 0.0,
                max=upper_edge(hi, bins),
                num=n,
                sum=total,
                sum_squares=squares,
                bucket_limits=[upper_edge(i, bins) for i in range(lo, hi + 1)],
                bucket_counts=counts[lo : hi + 1].tolist(),
                global_step=logging_step(trainer),
            )


class QuantileThresholdCalibration(PhaseTriggeredCallback):
    """Set ``pl_module.routing_threshold`` so that ``hard_ratio`` of held-out tokens fall below it.

    Confidences come from ``pl_module.token_confidence(input_ids, exit_layer) -> (B, T)``; the
    tokens from ``trainer.datamodule.calibration_dataloader()`` (held-out blocks the model did
    not train on), or ``val_dataloader()`` when the data module has no calibration split. Each
    rank counts every ``world_size``-th batch; targets equal to -100 are left out.

    Args:
        hard_ratio: target fraction of tokens below the threshold (the "hard" ones).
        exit_layer: the exit whose confidence is calibrated (default: the module's first exit).
        bins: histogram resolution (log-spaced from 1e-6 to 1); the threshold is a bin edge.
        at_phase: calibrate once, at the first batch of this phase; ``None`` recalibrates
            before every validation instead.
        log_prefix: logged once per calibration: ``{prefix}/threshold``,
            ``{prefix}/calibration_hard_frac``, and with TensorBoard a histogram
            ``{prefix}/confidence``.
    """

    def __init__(
        self,
        hard_ratio: float = 0.5,
        exit_layer: int | None = None,
        bins: int = 65_536,
        at_phase: int | None = 2,
        log_prefix: str = "calibration",
    ) -> None:
        if not isinstance(hard_ratio, (int, float)) or not 0.0 < hard_ratio < 1.0:
            raise ValueError(f"QuantileThresholdCalibration.hard_ratio must be in (0, 1), got {hard_ratio!r}")
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"QuantileThresholdCalibration.bins must be an integer >= 2, got {bins!r}")
        super().__init__(1 if at_phase is None else at_phase)
        self.every_validation = at_phase is None
        self.hard_ratio, self.exit_layer, self.bins, self.log_prefix = float(hard_ratio), exit_layer, bins, log_prefix
        self.threshold: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(hard_ratio=self.hard_ratio, exit_layer=self.exit_layer, at_phase=self.at_phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for name in ("token_confidence", "routing_threshold"):
            if not hasattr(pl_module, name):
                module = type(pl_module).__name__
                raise TypeError(f"QuantileThresholdCalibration needs a LightningModule with {name}; {module} has none")

    def maybe_apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.every_validation:
            super().maybe_apply(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_validation:
            self.apply(trainer, pl_module)

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.threshold = calibrate_threshold(
            trainer,
            pl_module,
            lambda input_ids: pl_module.token_confidence(input_ids, self.exit_layer),
            self.hard_ratio,
            self.bins,
            self.log_prefix,
        )
        pl_module.routing_threshold = self.threshold

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "threshold": self.threshold}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.threshold = state_dict.get("threshold")

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = self._own_state(checkpoint)
        if state and state.get("threshold") is not None:
            pl_module.routing_threshold = state["threshold"]
