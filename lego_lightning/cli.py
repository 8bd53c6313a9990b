"""The ``lego`` command: LightningCLI with TensorBoard, an LR monitor, exit diagnostics and checkpoints by default.

    lego fit --config configs/deep_supervision.yaml
    lego validate --config configs/deep_supervision.yaml --ckpt_path <checkpoint>

``vocab_size`` flows from the data module to the model, so nobody types it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lego_lightning.callbacks.checkpoint import BestAndLastCheckpoint
from lego_lightning.callbacks.exit_diagnostics import ExitDiagnostics
from lego_lightning.modules import SupervisedExitLM


class LearningRateMonitorIfLogging(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, idle when the trainer has no logger.

    The CLI always adds one; the stock callback raises when ``--trainer.logger false``.
    """

    def on_train_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)


class LegoCLI(LightningCLI):
    """LightningCLI for lego_lightning models and data modules (any subclass, chosen by ``class_path``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("model_class", SupervisedExitLM)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        raw = sys.argv[1:] if args is None else args
        if isinstance(raw, list):
            self._checkpoint_hparams_as_defaults(raw)
        super().parse_arguments(parser, args)

    def _checkpoint_hparams_as_defaults(self, raw: list[str]) -> None:
        """Make a checkpoint's model hyperparameters the defaults, below the config and the command line.

        Lightning's own ``_parse_ckpt_path`` lets them override both, which silently ignores
        ``--model.routing_threshold`` at validation and hides a config that does not fit the
        checkpoint. Here the config wins, and a config whose shapes differ from the
        checkpoint's fails with a clear error when the weights load; with no model config at
        all, the checkpoint's is used. Only ``--ckpt_path`` on the command line is read here.
        """
        subparsers = getattr(self, "_subcommand_parsers", {})  # none with run=False
        subcommand = next((a for a in raw if a in subparsers), None)
        ckpt_path = None
        for i, arg in enumerate(raw):
            if arg == "--ckpt_path" and i + 1 < len(raw):
                ckpt_path = raw[i + 1]
            elif arg.startswith("--ckpt_path="):
                ckpt_path = arg.split("=", 1)[1]
        if subcommand is None or not ckpt_path or not Path(ckpt_path).is_file():
            return
        hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu").get("hyper_parameters", {})
        class_path = hparams.get("_class_path")
        if class_path is None:
            return
        # vocab_size is linked from the data; the data module checks the saved vocabulary itself.
        init_args = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "vocab_size"}
        subparsers[subcommand].set_defaults({"model": {"class_path": class_path, "init_args": init_args}})

    def _parse_ckpt_path(self) -> None:
        """Replaced by :meth:`_checkpoint_hparams_as_defaults`, which runs before parsing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/ppl",
                "checkpoint.mode": "min",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{epoch}-{step}",
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "default_hp_metric": False},
                },
            }
        )
        parser.add_lightning_class_args(LearningRateMonitorIfLogging, "lr_monitor")
        parser.add_lightning_class_args(ExitDiagnostics, "exit_diagnostics")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def after_fit(self) -> None:
        trainer = self.trainer
        if callable(getattr(self.model, "summary_table", None)) and trainer.state.status.value == "finished":
            # A final evaluation of the fitted model (best weights restored), reported as a table.
            (metrics,) = trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            rank_zero_info("\n" + self.model.summary_table(metrics))
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") or "(none saved)"
        last = getattr(ckpt, "last_model_path", "") or "(none saved)"
        rank_zero_info(
            "\nTensorBoard logs: {logs}\n  view with: tensorboard --logdir {root}\nbest checkpoint: {best}\n"
            "last checkpoint: {last}".format(
                logs=trainer.log_dir,
                root=getattr(trainer.logger, "save_dir", trainer.log_dir),
                best=best,
                last=last,
            )
        )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lego`` console script; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    try:
        LegoCLI(args=args)
    finally:
        # Lightning leaves the process group up; gloo's threads then abort the process at exit.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
