"""Small things several tests use: a quiet real Trainer, a tiny model, a callback that dumps rank state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lego_lightning import ASHEM, SupervisedExitLM
from lego_lightning.data import SyntheticDataModule


def quiet_trainer(root: Path | str, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(root),
    )
    return L.Trainer(**{**defaults, **kwargs})


def tiny_lm(vocab_size: int = 64, **kwargs: Any) -> SupervisedExitLM:
    defaults: dict[str, Any] = dict(vocab_size=vocab_size, n_layers=3, d_model=16, n_heads=2, max_seq_len=32)
    return SupervisedExitLM(**{**defaults, **kwargs})


# A phased module small enough for a test: two epochs per phase, phases ended by their limit.
TINY_PHASED: dict[str, Any] = dict(
    vocab_size=64,
    d_model=32,
    n_heads=2,
    max_seq_len=16,
    lr=3e-3,
    phase1_max_epochs=2,
    phase2_max_epochs=2,
    phase1_patience=5,
    phase2_patience=5,
)


def tiny_ashem(**kwargs: Any) -> ASHEM:
    return ASHEM(**{**TINY_PHASED, **kwargs})


def synthetic(**kwargs: Any) -> SyntheticDataModule:
    defaults: dict[str, Any] = dict(vocab_size=64, seq_len=16, batch_size=16, n_train=64, n_val=32, n_calibration=32)
    return SyntheticDataModule(**{**defaults, **kwargs})


REPO = Path(__file__).resolve().parent.parent
# Every run config: configs/*.yaml and the subfolders' (bpe/), not the data-module parts in data/.
# Configs that train from scratch; those of configs/pretrained/ need a checkpoint (tests/test_pretrained_cli.py).
CONFIGS = sorted(
    str(p.relative_to(REPO / "configs"))
    for p in (REPO / "configs").rglob("*.yaml")
    if p.parent.name not in ("data", "pretrained")
)
PRETRAINED_CONFIGS = sorted(
    str(p.relative_to(REPO / "configs")) for p in (REPO / "configs" / "pretrained").glob("*.yaml")
)
LAUNCHER_VARS = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def subprocess_env() -> dict[str, str]:
    """This environment, the repo importable, without Lightning's launcher variables.

    An in-process DDP run leaves LOCAL_RANK and friends behind; a child that inherits
    LOCAL_RANK waits for an external launcher instead of starting rank 1.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def cli_args(subcommand: str, config: str, corpus: Path, logs: Path, *extra: str) -> list[str]:
    """``lego <subcommand>`` of a committed config on a test corpus: batches of 4, two validation batches, every
    step logged under ``logs``, quiet; ``extra`` comes last, so it wins."""
    return [
        subcommand,
        "--config",
        str(REPO / "configs" / config),
        "--data.path",
        str(corpus),
        "--data.batch_size",
        "4",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.limit_val_batches",
        "2",
        "--trainer.log_every_n_steps",
        "1",
        *extra,
    ]


# Lightning's strategies that fork their ranks from this process: nothing is imported twice, where a launched
# process imports torch and Lightning again (seconds per rank). ``two_rank_fit(..., launch="process")`` keeps
# the real launcher that users run.
FORKED = {"ddp": "ddp_fork", "ddp_find_unused_parameters_true": "ddp_fork_find_unused_parameters_true"}


def two_rank_fit(
    config: str, corpus: Path, tmp_path: Path, strategy: str, *extra: str, launch: str = "fork"
) -> list[dict[str, Any]]:
    """``lego fit`` on 2 CPU processes with :class:`RankStateDump`; every rank's state, weights and hard set.

    ``launch="fork"``: the CLI runs here and Lightning forks both ranks from this process (the same
    DDP strategy, with its fork launcher); ``"process"``: ``lego fit`` in a new process, which
    launches its second rank as a user's command does.
    """
    out = tmp_path / "ranks"
    args = [
        "fit",
        "--config",
        str(REPO / "configs" / config),
        "--data.path",
        str(corpus),
        *[
            "--data.batch_size",
            "4",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "2",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "3",
            "--trainer.enable_progress_bar",
            "false",
        ],
        "--trainer.strategy",
        FORKED[strategy] if launch == "fork" else strategy,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.callbacks+=tests.helpers.RankStateDump",
        f"--trainer.callbacks.out_dir={out}",
        *extra,
    ]
    if launch == "fork":
        from lego_lightning.cli import main

        main(args)
    else:
        cmd = [sys.executable, "-m", "lego_lightning.cli", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = []
    for r in (0, 1):
        state = json.loads((out / f"rank{r}.json").read_text())
        assert state["pid"] != os.getpid()  # a rank of its own, not this process
        state["weights"] = torch.load(out / f"rank{r}.pt", weights_only=True)
        mask = out / f"rank{r}_hard_mask.pt"
        state["hard_mask"] = torch.load(mask, weights_only=True) if mask.exists() else None
        layers = out / f"rank{r}_layer_masks.pt"
        state["layer_masks"] = torch.load(layers, weights_only=True) if layers.exists() else None
        ranks.append(state)
    assert ranks[0]["pid"] != ranks[1]["pid"]
    return ranks


class RankStateDump(Callback):
    """At the end of fit, each rank writes weights, metrics, threshold and hard set to ``out_dir/rank{r}*``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.layer_masks: list[torch.Tensor] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The mask the module's training step is about to draw (its own method, the same key).
        if getattr(pl_module, "layer_dropout", None) is not None:
            self.layer_masks.append(pl_module.layer_keep(batch["input_ids"].shape[0], batch_idx).cpu())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, self.out_dir / f"rank{rank}.pt")
        state = {
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
            "world_size": trainer.world_size,
            "routing_threshold": getattr(pl_module, "routing_threshold", None),
            "pid": os.getpid(),
        }
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(state))
        holders = [pl_module, *trainer.callbacks]  # a phased module holds its own set; HardExampleMining its
        masks = [h.hard_mask for h in holders if getattr(h, "hard_mask", None) is not None]
        if masks:
            torch.save(masks[0], self.out_dir / f"rank{rank}_hard_mask.pt")
        if self.layer_masks:
            torch.save(torch.stack(self.layer_masks), self.out_dir / f"rank{rank}_layer_masks.pt")


class Regression(L.LightningModule):
    """A plain LightningModule that is not ours: linear regression, SGD, a torch scheduler.

    ``schedule`` is ``constant``, ``linear`` (LinearLR) or ``cosine`` (CosineAnnealingLR, which
    computes each lr from the group's current one); ``loss_factor`` multiplies the loss value
    without changing its gradient's direction; ``nan_at_step`` adds a NaN to the loss *value*
    at that step (a detached constant: the gradient stays finite).
    """

    def __init__(
        self,
        schedule: str = "constant",
        lrs: tuple[float, ...] = (0.05,),
        total_steps: int = 8,
        loss_factor: float = 1.0,
        nan_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
        self.extra = torch.nn.Linear(4, 1)
        self.schedule, self.lrs, self.total_steps = schedule, lrs, total_steps
        self.loss_factor, self.nan_at_step = loss_factor, nan_at_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_factor * ((self.net(x) + self.extra(x) - y) ** 2).mean()
        if self.nan_at_step is not None and self.global_step == self.nan_at_step:
            loss = loss + torch.tensor(float("nan"))
        return loss

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.net.parameters(), "lr": self.lrs[0]}]
        groups.append({"params": self.extra.parameters(), "lr": self.lrs[-1]})
        optimizer = torch.optim.SGD(groups, lr=self.lrs[0])
        if self.schedule == "constant":
            return optimizer
        if self.schedule == "linear":
            scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=self.total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self) -> Any:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(64, 1, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
