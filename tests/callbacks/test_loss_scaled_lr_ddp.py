import json
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

from tests.helpers import REPO, subprocess_env


def test_both_ranks_apply_the_scale_of_the_mean_loss_and_keep_equal_weights(tmp_path):
    env = subprocess_env()
    script = REPO / "tests/scripts/loss_scaled_lr_ddp.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
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
