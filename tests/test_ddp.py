"""Two CPU processes under Lightning's DDP, launched through the real `lego` CLI."""

import json
import os
import subprocess
import sys

import torch
from torch.testing import assert_close

from tests.conftest import REPO


def test_two_ranks_end_with_equal_weights_and_metrics(corpus, tmp_path):
    out = tmp_path / "ranks"
    cmd = [
        sys.executable,
        "-m",
        "lego_lightning.cli",
        "fit",
        "--config",
        str(REPO / "configs/deed.yaml"),
        "--data.path",
        str(corpus),
        "--data.batch_size",
        "4",
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_train_batches",
        "3",
        "--trainer.limit_val_batches",
        "3",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.callbacks+=tests.helpers.RankStateDump",
        f"--trainer.callbacks.out_dir={out}",
    ]
    # A launcher variable left by another in-process run (LOCAL_RANK, ...) would make Lightning
    # wait for an external launcher instead of starting rank 1.
    launcher_vars = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    weights = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_close(weights[0], weights[1], rtol=0, atol=0)
    # Validation metrics are reduced over both ranks' tokens; train/* is each rank's own batch.
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1]
    assert {"val/ppl", "val/exit1/ppl", "val/exit3/acc", "val/routed/ppl", "val/routed/flops_ratio"} <= set(val[0])
