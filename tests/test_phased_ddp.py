"""A 4-phase plan with a hard-token phase on two CPU processes under DDP, through the real `lego` CLI."""

import yaml
from torch.testing import assert_close

from tests.conftest import REPO
from tests.helpers import two_rank_fit

PLAN = {
    "seed_everything": 0,
    "trainer": {"max_epochs": -1, "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger"}},
    "model": {
        "class_path": "lego_lightning.PhasedExitLM",
        "init_args": {
            "d_model": 32,
            "n_heads": 2,
            "max_seq_len": 32,
            "dropout": 0.1,
            "head_sharing": "separate",
            "phases": [
                {"layers": 2, "max_epochs": 1},
                {"layers": 3, "max_epochs": 1, "grow_init": "copy"},
                # Layer 2, frozen in phase 2, trains again: DDP must still reduce its gradients.
                {"train": ["layers 2-3", "exit 3"], "lr_scale": {"layers 2-3": 0.1}, "max_epochs": 1},
                {"layers": 4, "max_epochs": 1, "tokens": "hard", "hard_ratio": 0.5},
            ],
        },
    },
    "data": str(REPO / "configs" / "data" / "wikitext2_word_calibration.yaml"),
}


def test_both_ranks_end_every_phase_with_equal_weights_thresholds_and_hard_sets(corpus, tmp_path):
    config = tmp_path / "four_phases.yaml"
    config.write_text(yaml.safe_dump(PLAN))
    ranks = two_rank_fit(
        str(config), corpus, tmp_path, "ddp_find_unused_parameters_true", "--data.calibration_samples", "8"
    )
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    assert ranks[0]["routing_threshold"] == ranks[1]["routing_threshold"] is not None
    assert ranks[0]["hard_mask"].equal(ranks[1]["hard_mask"]) and ranks[0]["hard_mask"].any()
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1] and "val/exit4/ppl" in val[0]
    assert ranks[0]["metrics"]["phases/phase"] == ranks[1]["metrics"]["phases/phase"] == 4.0
