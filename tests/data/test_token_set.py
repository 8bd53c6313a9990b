"""The hard-token set: one bit per training token, read a batch of rows at a time, saved and reloaded."""

import numpy as np
import pytest
import torch

from lego_lightning.callbacks.hard_example_mining import mark_tokens
from lego_lightning.data.blocks import TokenBlocks
from lego_lightning.data.token_set import TokenSet, pack, unpack


def test_packing_round_trips_and_rows_read_their_own_marks():
    generator = torch.Generator().manual_seed(0)
    for seq_len in (1, 7, 8, 13, 32):
        mask = torch.rand(20, seq_len, generator=generator) < 0.4
        assert torch.equal(unpack(pack(mask), seq_len), mask)
        tokens = TokenSet.from_mask(mask)
        index = torch.tensor([3, 0, 19, 3])
        assert torch.equal(tokens.rows(index), mask[index])
        assert tokens.count() == int(mask.sum()) and tokens.fraction() == pytest.approx(float(mask.float().mean()))


def test_an_earlier_checkpoints_bool_mask_loads_as_the_same_set():
    mask = torch.rand(5, 11) < 0.5
    assert TokenSet.from_state(mask) == TokenSet.from_state(TokenSet.from_mask(mask).state_dict())
    assert TokenSet.from_state(None) is None


def test_mining_over_2_to_the_25_positions_takes_one_bit_each_and_reloads(tmp_path):
    blocks, seq_len = (1 << 15) + 1, 1024  # 33,555,456 positions > 2**25
    stream = (np.arange(blocks * seq_len + 1) % 50_021).astype(np.uint16)
    dataset = TokenBlocks(stream, seq_len)
    hard = mark_tokens(dataset, lambda ids: (ids % 10).float() / 10, threshold=0.3, batch_size=512)
    assert len(hard) * hard.seq_len == blocks * seq_len > 1 << 25
    assert hard.bits.dtype == torch.uint8 and hard.bits.numel() == blocks * seq_len // 8  # one bit per token
    assert hard.count() == int(((stream[:-1] % 10) < 3).sum())  # the inputs' marks, counted apart
    torch.save(hard.state_dict(), tmp_path / "hard.pt")
    assert (tmp_path / "hard.pt").stat().st_size < blocks * seq_len // 8 + 4096
    assert TokenSet.from_state(torch.load(tmp_path / "hard.pt", weights_only=True)) == hard
    assert torch.equal(hard.rows(torch.tensor([blocks - 1]))[0], torch.from_numpy((stream[-seq_len - 1 : -1] % 10) < 3))
