"""TensorBoard content beyond scalars: how the exits behave, and hparams with final metrics."""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lego_lightning.callbacks.phase_trigger import logging_step


class ExitDiagnostics(Callback):
    """After every ``every_n_epochs``-th validation, on rank 0, write to each TensorBoard logger:

    * ``exits/exit{k}_confidence``: a histogram of each non-final exit's token confidences;
    * ``exits/confidence`` (figure): the same with the routing threshold drawn in;
    * ``exits/sweep`` (figure): routed PPL against the FLOPs ratio over a sweep of thresholds,
      the current threshold marked;
    * ``exits/fractions`` (figure): the share of tokens leaving at each exit over training
      (from ``val/routed/exit{k}_frac``, when routing is on);

    and at the end of fit the module's hyperparameters with the final ``val/*`` metrics
    (``hp/...``), so runs of different strategies compare in the HParams tab.

    The figures cost one extra pass over ``max_batches`` validation batches (single process)
    and need matplotlib (``pip install 'lego-lightning[viz]'``); without it only the histograms
    and hparams are written. Contract: a :class:`~lego_lightning.SupervisedExitLM` (or a module
    with its ``model``, ``config``, ``confidence``, ``routing_threshold``, ``eval_exit_layers``,
    ``exit_confidence`` and ``model_inputs``).
    """

    def __init__(self, every_n_epochs: int = 1, max_batches: int = 8, log_hparams: bool = True) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"ExitDiagnostics.every_n_epochs must be a positive integer, got {every_n_epochs!r}")
        if not isinstance(max_batches, int) or max_batches < 1:
            raise ValueError(f"ExitDiagnostics.max_batches must be a positive integer, got {max_batches!r}")
        self.every_n_epochs, self.max_batches, self.log_hparams = every_n_epochs, max_batches, log_hparams
        self.fractions: dict[int, list[tuple[int, float]]] = {}
        self._warned = False

    @staticmethod
    def _tensorboards(trainer: L.Trainer) -> list[Any]:
        from lightning.pytorch.loggers import TensorBoardLogger

        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.state.fn != "fit":
            return
        metrics = trainer.callback_metrics
        for k in pl_module.config.exit_layers:
            if f"val/routed/exit{k}_frac" in metrics:
                self.fractions.setdefault(k, []).append(
                    (logging_step(trainer), float(metrics[f"val/routed/exit{k}_frac"]))
                )
        writers = self._tensorboards(trainer)
        if not writers or trainer.current_epoch % self.every_n_epochs:
            return
        with torch.inference_mode(False):
            self._write(trainer, pl_module, writers)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, writers: list[Any]) -> None:
        from lego_lightning import viz
        from lego_lightning.evaluation import collect_exit_outputs, routed_metrics, threshold_sweep

        batches = itertools.islice(trainer.datamodule.val_dataloader(), self.max_batches)
        outputs = collect_exit_outputs(pl_module, batches)
        step = logging_step(trainer)
        deciding = outputs.exit_layers[:-1]
        for writer in writers:
            for i, k in enumerate(deciding):
                writer.add_histogram(f"exits/exit{k}_confidence", outputs.confidence[i], step)
        if not deciding:
            return
        try:
            threshold = pl_module.routing_threshold
            confidences = {k: outputs.confidence[i] for i, k in enumerate(deciding)}
            thresholds = sorted({0.0, 1.0, *torch.quantile(outputs.confidence[0], torch.linspace(0, 1, 11)).tolist()})
            sweep = threshold_sweep(outputs, pl_module.config, thresholds, pl_module.confidence)
            points = {}
            if threshold is not None:
                now = routed_metrics(outputs, threshold, pl_module.config, pl_module.confidence)
                points[f"threshold {threshold:.3g}"] = (now["flops_ratio"], now["ppl"])
            figures = {
                "exits/confidence": viz.confidence_histogram(confidences, threshold),
                "exits/sweep": viz.sweep_curve({"this model": sweep}, points, title=f"step {step}"),
            }
            if self.fractions and len(next(iter(self.fractions.values()))) > 0:
                figures["exits/fractions"] = viz.exit_fractions(self.fractions)
        except ImportError as err:
            if not self._warned:
                warnings.warn(f"ExitDiagnostics writes no figures: {err}", stacklevel=2)
                self._warned = True
            return
        for writer in writers:
            for tag, fig in figures.items():
                writer.add_figure(tag, fig, step, close=False)
        for fig in figures.values():
            viz._pyplot().close(fig)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_hparams or not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        final = {f"hp/{k[4:]}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and final:
                logger.log_hyperparams(dict(pl_module.hparams), metrics=final)
