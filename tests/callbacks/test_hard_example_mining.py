import pytest
import torch

from lego_lightning.callbacks import HardExampleMining
from lego_lightning.data.synthetic import EASY, HARD
from tests.helpers import quiet_trainer, synthetic, tiny_lm


def trained_lm(tmp_path):
    torch.manual_seed(0)
    lm = tiny_lm(n_layers=2, lr=3e-3)
    dm = synthetic(n_train=256)
    quiet_trainer(tmp_path, max_steps=120, limit_val_batches=0).fit(lm, dm)
    return lm, dm


def test_mined_set_is_every_token_below_the_threshold_and_rich_in_hard_ones(tmp_path):
    lm, dm = trained_lm(tmp_path)
    train = dm.splits["train"]
    lm.eval()
    conf = lm.token_confidence(train.input_ids)
    lm.routing_threshold = conf.median().item()
    expected = conf < lm.routing_threshold  # mining runs at the first batch, before any step changes a weight
    mining = HardExampleMining(at_phase=1, batch_size=7)  # batches that do not divide the set
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[mining]).fit(lm, dm)
    assert torch.equal(mining.hard_mask, expected)
    assert 0.45 < mining.hard_frac < 0.55
    # The synthetic corpus says which tokens need context: the mined set must be rich in them.
    kinds = dm.token_kinds("train")
    assert mining.hard_mask[kinds == HARD].float().mean() > 2 * mining.hard_mask[kinds == EASY].float().mean()


def test_no_hard_token_is_a_clear_error(tmp_path):
    lm, dm = trained_lm(tmp_path)
    lm.routing_threshold = 0.0  # no confidence is below 0
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining(at_phase=1)])
    with pytest.raises(ValueError, match=r"found no hard tokens: every training token has confidence >= 0.0"):
        trainer.fit(lm, dm)
    assert trainer.global_step == 0


def test_mining_needs_a_threshold(tmp_path):
    lm, dm = trained_lm(tmp_path)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[HardExampleMining(at_phase=1)])
    with pytest.raises(ValueError, match=r"needs pl_module.routing_threshold"):
        trainer.fit(lm, dm)
