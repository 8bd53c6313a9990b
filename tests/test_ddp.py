"""Two CPU processes under Lightning's DDP, launched through the real `lego` CLI."""

from torch.testing import assert_close

from tests.helpers import two_rank_fit


def test_two_ranks_end_with_equal_weights_and_metrics(corpus, tmp_path):
    ranks = two_rank_fit("deed.yaml", corpus, tmp_path, "ddp", "--trainer.max_epochs", "2")
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert_close(ranks[0]["weights"], ranks[1]["weights"], rtol=0, atol=0)
    # Validation metrics are reduced over both ranks' tokens; train/* is each rank's own batch.
    val = [{k: v for k, v in r["metrics"].items() if k.startswith("val/")} for r in ranks]
    assert val[0] == val[1]
    assert {"val/ppl", "val/exit1/ppl", "val/exit3/acc", "val/routed/ppl", "val/routed/flops_ratio"} <= set(val[0])
