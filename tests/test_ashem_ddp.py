"""ASHEM through both phases on two CPU processes under DDP, launched through the real `lego` CLI."""

import json
import os
import subprocess
import sys

import torch
from torch.testing import assert_close

from lego_lightning import ASHEM
from lego_lightning.data import TextDataModule
from tests.conftest import REPO

LAUNCHER_VARS = {"LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def test_both_ranks_agree_on_weights_threshold_and_hard_set_and_one_process_mines_the_same(corpus, tmp_path):
    out = tmp_path / "ranks"
    common = [
        "--config",
        str(REPO / "configs/ashem.yaml"),
        "--data.path",
        str(corpus),
        "--data.batch_size",
        "4",
        "--data.calibration_samples",
        "8",
        "--model.phase1_max_epochs",
        "1",
        "--model.phase2_max_epochs",
        "1",
    ]
    cmd = [
        sys.executable,
        "-m",
        "lego_lightning.cli",
        "fit",
        *common,
        "--trainer.accelerator",
        "cpu",
        "--trainer.strategy",
        "ddp_find_unused_parameters_true",
        "--trainer.devices",
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
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    weights = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert_close(weights[0], weights[1], rtol=0, atol=0)
    assert ranks[0]["routing_threshold"] == ranks[1]["routing_threshold"] is not None
    masks = [torch.load(out / f"rank{r}_hard_mask.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(masks[0], masks[1]) and masks[0].any()
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1] and "val/routed/ppl" in val[0]

    # One process, the same shallow model (frozen since mining) and threshold, finds the same hard set.
    data = TextDataModule(path=str(corpus), batch_size=4, calibration_samples=8)
    data.setup("fit")
    module = ASHEM(vocab_size=data.vocab_size, d_model=64, n_heads=4, max_seq_len=32)
    module.load_state_dict(weights[0])
    module.eval()
    conf = module.token_confidence(data.splits["train"].input_ids, exit_layer=2)
    assert torch.equal(conf < ranks[0]["routing_threshold"], masks[0])
