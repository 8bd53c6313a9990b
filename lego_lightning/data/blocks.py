"""Contiguous blocks of a token stream, the samples every data module here yields.

A batch is a dict: ``input_ids`` and ``targets`` of shape ``(B, T)`` (targets are the inputs
shifted by one), and ``index`` ``(B,)``, the sample's position in its split, so that a
callback can remember per-token facts about the training set (hard-example mining).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, RandomSampler


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``seq_len`` tokens cut from one stream, in order."""

    def __init__(self, stream: Tensor, seq_len: int, max_samples: int | None = None) -> None:
        n = (stream.numel() - 1) // seq_len
        if max_samples is not None:
            n = min(n, max_samples)
        if n < 1:
            raise ValueError(
                f"a stream of {stream.numel()} tokens holds no block of seq_len={seq_len} (+1 target token)"
            )
        used = stream[: n * seq_len + 1].long()
        self.input_ids = used[:-1].view(n, seq_len)
        self.targets = used[1:].view(n, seq_len)

    def subset(self, start: int, stop: int) -> TokenBlocks:
        """Blocks ``start..stop-1`` as their own set (views, no copy)."""
        return TokenBlocks.from_tensors(self.input_ids[start:stop], self.targets[start:stop])

    @classmethod
    def from_tensors(cls, input_ids: Tensor, targets: Tensor) -> TokenBlocks:
        """Blocks given directly, ``(N, T)`` each (synthetic data, tests)."""
        if input_ids.shape != targets.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} must be equal (N, T)"
            )
        self = cls.__new__(cls)
        self.input_ids, self.targets = input_ids.long(), targets.long()
        return self

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[i], "targets": self.targets[i], "index": torch.tensor(i)}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]


class EpochSeededRandomSampler(RandomSampler):
    """A shuffle that depends only on ``seed`` and the epoch, so a resumed run sees the batches the
    uninterrupted run saw. Lightning calls ``set_epoch``; under DDP it swaps this for its own
    ``DistributedSampler``, which is seeded the same way.
    """

    def __init__(self, data_source: Dataset, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


def unpack_batch(batch: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(input_ids, targets)`` from our dict batches or a user's ``(input_ids, targets)`` tuple."""
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch["targets"]
    input_ids, targets = batch[0], batch[1]
    return input_ids, targets
