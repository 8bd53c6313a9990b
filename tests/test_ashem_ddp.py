"""ASHEM through both phases on two CPU processes under DDP, launched through the real `lego` CLI."""

import torch
from torch.testing import assert_close

from lego_lightning import ASHEM
from lego_lightning.data import TextDataModule
from tests.helpers import two_rank_fit


def test_both_ranks_agree_on_weights_threshold_and_hard_set_and_one_process_mines_the_same(corpus, tmp_path):
    phases = ["--data.calibration_samples", "8", "--model.phase1_max_epochs", "1", "--model.phase2_max_epochs", "1"]
    ranks = two_rank_fit("ashem.yaml", corpus, tmp_path, "ddp_find_unused_parameters_true", *phases)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    assert ranks[0]["routing_threshold"] == ranks[1]["routing_threshold"] is not None
    assert torch.equal(ranks[0]["hard_mask"], ranks[1]["hard_mask"]) and ranks[0]["hard_mask"].any()
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1] and "val/routed/ppl" in val[0]

    # One process, the same shallow model (frozen since mining) and threshold, finds the same hard set.
    data = TextDataModule(path=str(corpus), batch_size=4, calibration_samples=8)
    data.setup("fit")
    module = ASHEM(vocab_size=data.vocab_size, d_model=64, n_heads=4, max_seq_len=32)
    module.load_state_dict(ranks[0]["weights"])
    module.eval()
    conf = module.token_confidence(data.splits["train"].input_ids, exit_layer=2)
    assert torch.equal(conf < ranks[0]["routing_threshold"], ranks[0]["hard_mask"])
