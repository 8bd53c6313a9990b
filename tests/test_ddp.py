"""Two CPU processes under Lightning's DDP, through the real `lego` CLI: launched as a user's command launches them,
and forked by Lightning from the test's process (the same strategy, without importing everything twice)."""

import torch
from torch.testing import assert_close

from tests.helpers import two_rank_fit


def test_two_ranks_end_with_equal_weights_and_metrics(corpus, tmp_path):
    ranks = two_rank_fit("deed.yaml", corpus, tmp_path, "ddp", "--trainer.max_epochs", "2", launch="process")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    # Validation metrics are reduced over both ranks' tokens; train/* is each rank's own batch.
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1]
    assert {"val/ppl", "val/exit1/ppl", "val/exit3/acc", "val/routed/ppl", "val/routed/flops_ratio"} <= set(val[0])


def test_under_ddp_ranks_drop_layers_independently_and_end_with_equal_weights(corpus, tmp_path):
    # configs/bpe/layerskip.yaml made small, dropping every layer at 0.5 so that two ranks' masks can be compared.
    small = ("--model.n_layers", "4", "--model.d_model", "32", "--model.max_seq_len", "16", "--data.seq_len", "16")
    extra = ("--data.max_vocab_size", "300", "--model.warmup_steps", "0", "--trainer.max_epochs", "1")
    dropout = ("--model.layer_dropout", "{p_max: 0.5, scale: uniform}")
    ranks = two_rank_fit("bpe/layerskip.yaml", corpus, tmp_path, "ddp", *small, *extra, *dropout)
    assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    masks = [r["layer_masks"] for r in ranks]
    assert masks[0].shape == masks[1].shape == (3, 4, 4)  # 3 steps, batches of 4, 4 layers
    assert not torch.equal(masks[0], masks[1])  # each rank draws its own samples' masks
    assert 0.3 < 1 - masks[0].float().mean() < 0.7  # and drops at the rate asked
