"""LossScaledLR on a plain module under 2-process CPU DDP (ranks forked by Lightning from this process)."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.testing import assert_close

from lego_lightning.callbacks import LossScaledLR
from tests.helpers import Regression


class Dump(Callback):
    """Each rank writes the loss it saw and the lr it stepped with, then its weights."""

    def __init__(self, out: str) -> None:
        self.out, self.rows = Path(out), []

    def on_before_backward(self, trainer, pl_module, loss):
        self.local_loss = loss.item()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # runs after LossScaledLR scaled the lr
        self.rows.append({"local_loss": self.local_loss, "lr": optimizer.param_groups[0]["lr"]})

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        (self.out / f"rank{rank}.json").write_text(json.dumps({"steps": self.rows, "world_size": trainer.world_size}))
        torch.save({k: v.detach() for k, v in pl_module.state_dict().items()}, self.out / f"rank{rank}.pt")


def test_both_ranks_apply_the_scale_of_the_mean_loss_and_keep_equal_weights(tmp_path):
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp_fork", devices=2, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[LossScaledLR(), Dump(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(Regression())
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        assert step0["local_loss"] != step1["local_loss"]  # each rank saw its own half of the data
        assert (
            step0["lr"]
            == step1["lr"]
            == pytest.approx(0.05 * ((step0["local_loss"] + step1["local_loss"]) / 2) ** (1 / 3))
        )
    weights = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_close(weights[0], weights[1], rtol=0, atol=0)
