"""A generated corpus with a known mix of easy and hard tokens, for tests and fast demos.

Rules, applied left to right in each sequence:

* after an ordinary token ``t`` comes ``successor[t]`` (a fixed random map): **easy**, the
  previous token decides it;
* with probability ``trigger_prob`` a random *trigger* token is emitted instead: **random**,
  nothing predicts it beyond its rate;
* after a trigger comes a copy of the token ``lookback`` positions before the trigger:
  **hard**, only a model that attends ``lookback + 1`` tokens back can predict it.

``token_kinds(split)`` says which kind every target token is, so tests can check that a
method finds the hard tokens.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lego_lightning.data.blocks import EpochSeededRandomSampler, ResumableDataLoader, TokenBlocks

EASY, HARD, RANDOM = 0, 1, 2


def generate_sequences(
    n: int, length: int, vocab_size: int, n_triggers: int, lookback: int, trigger_prob: float, seed: int
) -> tuple[Tensor, Tensor]:
    """``n`` token sequences of ``length`` and the kind of each token (the first ``lookback`` are random)."""
    g = torch.Generator().manual_seed(seed)
    ordinary = torch.arange(n_triggers, vocab_size)
    successor = ordinary[torch.randint(len(ordinary), (vocab_size,), generator=g)]
    tokens = torch.empty(n, length, dtype=torch.long)
    kinds = torch.full((n, length), RANDOM, dtype=torch.long)
    tokens[:, :lookback] = ordinary[torch.randint(len(ordinary), (n, lookback), generator=g)]
    trigger_draw = torch.rand(n, length, generator=g) < trigger_prob
    trigger_pick = torch.randint(n_triggers, (n, length), generator=g)
    for t in range(lookback, length):
        prev = tokens[:, t - 1]
        after_trigger = prev < n_triggers
        copy = tokens[:, t - 1 - lookback]
        new_trigger = trigger_draw[:, t] & ~after_trigger
        tokens[:, t] = torch.where(after_trigger, copy, torch.where(new_trigger, trigger_pick[:, t], successor[prev]))
        kinds[:, t] = torch.where(after_trigger, HARD, torch.where(new_trigger, RANDOM, EASY))
    return tokens, kinds


class SyntheticDataModule(L.LightningDataModule):
    """Synthetic blocks with known easy (bigram), hard (long-context) and random tokens.

    Batches have the same form as :class:`~lego_lightning.data.TextDataModule`'s.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        seq_len: int = 32,
        batch_size: int = 32,
        n_train: int = 512,
        n_val: int = 128,
        n_calibration: int = 0,
        n_triggers: int = 4,
        lookback: int = 3,
        trigger_prob: float = 0.15,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("n_train", n_train),
            ("n_val", n_val),
            ("n_triggers", n_triggers),
            ("lookback", lookback),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticDataModule.{name} must be a positive integer, got {value!r}")
        if not isinstance(n_calibration, int) or n_calibration < 0:
            raise ValueError(f"SyntheticDataModule.n_calibration must be an integer >= 0, got {n_calibration!r}")
        if n_triggers >= vocab_size - 1:
            raise ValueError(
                f"SyntheticDataModule.n_triggers={n_triggers} must leave ordinary tokens: allowed < vocab_size - 1"
            )
        if not 0.0 <= trigger_prob < 1.0:
            raise ValueError(f"SyntheticDataModule.trigger_prob must be in [0, 1), got {trigger_prob}")
        self.save_hyperparameters()
        self.vocab_size, self.seq_len, self.batch_size, self.seed = vocab_size, seq_len, batch_size, seed
        self.splits: dict[str, TokenBlocks] = {}
        self.kinds: dict[str, Tensor] = {}
        for split, n, offset in (("train", n_train, 0), ("validation", n_val, 1), ("calibration", n_calibration, 2)):
            if n == 0:
                continue
            seqs, kinds = generate_sequences(
                n,
                lookback + seq_len + 1,
                vocab_size,
                n_triggers,
                lookback,
                trigger_prob,
                seed * 1000 + offset,
            )
            # A copy whose source falls before the block's first input token cannot be predicted.
            kinds[:, : 2 * lookback + 1][kinds[:, : 2 * lookback + 1] == HARD] = RANDOM
            seqs, kinds = seqs[:, lookback:], kinds[:, lookback:]
            self.splits[split] = TokenBlocks.from_tensors(seqs[:, :-1], seqs[:, 1:])
            self.kinds[split] = kinds[:, 1:]

    def token_kinds(self, split: str) -> Tensor:
        """``(N, T)`` kind of every target token: ``EASY`` 0, ``HARD`` 1, ``RANDOM`` 2."""
        return self.kinds[split]

    @property
    def train_dataset(self) -> TokenBlocks:
        return self.splits["train"]

    def train_dataloader(self) -> DataLoader:
        train = self.splits["train"]
        return ResumableDataLoader(
            train, batch_size=self.batch_size, sampler=EpochSeededRandomSampler(train, self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["validation"], batch_size=self.batch_size)

    def calibration_dataloader(self) -> DataLoader:
        """Held-out blocks (``n_calibration``); the validation set when there are none."""
        return DataLoader(self.splits.get("calibration", self.splits["validation"]), batch_size=self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["vocab_size"] != self.vocab_size:
            raise ValueError(
                f"the checkpoint: vocab_size={state_dict['vocab_size']} but the data gives vocab_size={self.vocab_size}"
            )
