"""LossScaledLR on a plain module under 2-process CPU DDP; each rank writes what it saw to argv[1].

Run by tests/callbacks/test_loss_scaled_lr_ddp.py; Lightning starts rank 1 by running this file again.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lego_lightning.callbacks import LossScaledLR
from tests.helpers import Regression


class Dump(Callback):
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


if __name__ == "__main__":
    torch.manual_seed(0)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[LossScaledLR(), Dump(sys.argv[1])],
    )  # fmt: skip
    try:
        trainer.fit(Regression())
    finally:
        # As lego_lightning.cli.main does: Lightning leaves the process group up, and gloo's threads
        # can then abort the process at exit ("terminate called without an active exception").
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
