import pytest
import torch

from lego_lightning.data import SyntheticDataModule
from lego_lightning.data.synthetic import EASY, HARD, RANDOM


def test_token_kinds_follow_the_stated_rules():
    dm = SyntheticDataModule(vocab_size=40, seq_len=24, n_train=64, n_triggers=4, lookback=3, seed=1)
    blocks, kinds = dm.splits["train"], dm.token_kinds("train")
    x, y = blocks.input_ids, blocks.targets
    assert torch.equal(x[:, 1:], y[:, :-1])
    easy = kinds == EASY
    # Easy tokens: the same previous token always gives the same next token.
    successor = {}
    for prev, nxt in zip(x[easy].tolist(), y[easy].tolist()):
        assert successor.setdefault(prev, nxt) == nxt
    # Hard tokens follow a trigger and copy the token lookback positions before the trigger.
    n, t = torch.nonzero(kinds == HARD, as_tuple=True)
    assert len(n) > 0
    assert (x[n, t] < 4).all()
    assert torch.equal(y[n, t], x[n, t - 3])
    assert 0.05 < (kinds == HARD).float().mean() < 0.3
    assert (kinds == RANDOM).any() and easy.float().mean() > 0.5


def test_same_seed_same_data_and_splits_differ():
    a, b = SyntheticDataModule(seed=3), SyntheticDataModule(seed=3)
    assert torch.equal(a.splits["train"].input_ids, b.splits["train"].input_ids)
    assert not torch.equal(a.splits["train"].input_ids[:16], a.splits["validation"].input_ids[:16])


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"n_triggers=63 must leave ordinary tokens"):
        SyntheticDataModule(vocab_size=64, n_triggers=63)
    with pytest.raises(ValueError, match=r"trigger_prob must be in \[0, 1\), got 1.5"):
        SyntheticDataModule(trigger_prob=1.5)
