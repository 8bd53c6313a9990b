"""Contiguous blocks of a token stream, the samples every data module here yields.

A batch is a dict: ``input_ids`` and ``targets`` of shape ``(B, T)`` (targets are the inputs
shifted by one), and ``index`` ``(B,)``, the sample's position in its split, so that a
callback can remember per-token facts about the training set (hard-example mining).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lego_lightning.data.token_cache import DiskArray


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``seq_len`` tokens cut from one stream, in order.

    The stream may be an array on disk (:class:`~lego_lightning.data.token_cache.DiskArray`): a
    block is read from it when asked for, so memory does not grow with the corpus. With
    ``nbytes`` (the UTF-8 bytes of text each token stands for) a sample also holds
    ``target_bytes``, the bytes its targets cover, for bits per byte.
    """

    def __init__(
        self,
        stream: Tensor | np.ndarray | DiskArray,
        seq_len: int,
        max_samples: int | None = None,
        nbytes: np.ndarray | DiskArray | None = None,
        first: int = 0,
    ) -> None:
        n = (len(stream) - 1) // seq_len - first
        if max_samples is not None:
            n = min(n, max_samples)
        if n < 1:
            raise ValueError(
                f"a stream of {len(stream)} tokens holds no block of seq_len={seq_len} (+1 target token)"
                + (f" after its first {first} blocks" if first else "")
            )
        self._stream, self._nbytes, self._seq_len, self._first, self._n = stream, nbytes, seq_len, first, n
        self._tensors: tuple[Tensor, Tensor] | None = None

    def subset(self, start: int, stop: int) -> TokenBlocks:
        """Blocks ``start..stop-1`` as their own set (no copy)."""
        if self._tensors is not None:
            return TokenBlocks.from_tensors(self._tensors[0][start:stop], self._tensors[1][start:stop])
        return TokenBlocks(self._stream, self._seq_len, stop - start, self._nbytes, self._first + start)

    @classmethod
    def from_tensors(cls, input_ids: Tensor, targets: Tensor) -> TokenBlocks:
        """Blocks given directly, ``(N, T)`` each (synthetic data, tests)."""
        if input_ids.shape != targets.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and targets {tuple(targets.shape)} must be equal (N, T)"
            )
        self = cls.__new__(cls)
        self._tensors = (input_ids.long(), targets.long())
        self._n, self._seq_len, self._nbytes = input_ids.shape[0], input_ids.shape[1], None
        return self

    def __len__(self) -> int:
        return self._n

    def _span(self, i: int) -> tuple[int, int]:
        start = (self._first + i) * self._seq_len
        return start, start + self._seq_len + 1

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if self._tensors is not None:
            return {"input_ids": self._tensors[0][i], "targets": self._tensors[1][i], "index": torch.tensor(i)}
        if not 0 <= i < self._n:
            raise IndexError(f"block {i} of {self._n}")
        start, stop = self._span(i)
        block = torch.as_tensor(np.asarray(self._stream[start:stop], dtype=np.int64))
        sample = {"input_ids": block[:-1], "targets": block[1:], "index": torch.tensor(i)}
        if self._nbytes is not None:
            sample["target_bytes"] = torch.tensor(int(self._nbytes[start + 1 : stop].sum(dtype=np.int64)))
        return sample

    def _all(self) -> tuple[Tensor, Tensor]:
        if self._tensors is not None:
            return self._tensors
        start, stop = self._first * self._seq_len, (self._first + self._n) * self._seq_len + 1
        used = torch.as_tensor(np.asarray(self._stream[start:stop], dtype=np.int64))
        return used[:-1].view(self._n, self._seq_len), used[1:].view(self._n, self._seq_len)

    @property
    def input_ids(self) -> Tensor:
        """Every block's inputs, ``(N, T)``, read into memory (for small sets: tests, mining on a slice)."""
        return self._all()[0]

    @property
    def targets(self) -> Tensor:
        """Every block's targets, ``(N, T)``, read into memory."""
        return self._all()[1]

    @property
    def seq_len(self) -> int:
        return self._seq_len


SHUFFLE_SLICE = 1 << 16  # block indices made Python ints at a time


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
        n = len(self.data_source)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # The order stays a tensor (4 bytes a block; int32 draws the same permutation as int64,
        # tested) and becomes Python ints a slice at a time: a list of all of them, as
        # RandomSampler makes, costs 36 bytes a block, more than a block of 32 ids on disk.
        dtype = torch.int32 if n < 2**31 else torch.int64
        for part in torch.randperm(n, generator=generator, dtype=dtype).split(SHUFFLE_SLICE):
            yield from part.tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that a run resumed mid-epoch continues with the next batch of the same order.

    Lightning saves the ``state_dict`` of such a loader in every checkpoint and loads it into
    the resumed run's loader before iterating. The state is the sampler's epoch and how many
    batches of it were given out; when the resumed run continues that epoch (the sampler,
    seeded by the epoch, gives the same order again) the iterator skips those batches, and
    when it starts the next one, it skips nothing. A plain ``DataLoader`` starts the epoch's
    order over and trains on the wrong batches. (A sampler without an ``epoch``, that Lightning
    cannot ``set_epoch``, is taken to continue the saved epoch.)

    Each iterator is created at its first batch, not when it is asked for: creating one
    draws a seed from torch's global generator, and this way that draw comes after
    :class:`~lego_lightning.callbacks.RandomStateCheckpoint` has restored the generators, at
    the same point of the random stream as in the uninterrupted run. The iterator that
    replaces one the saved run had already created draws nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given = 0  # batches of the current iterator given out
        self._resume: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        return _LazyCountingIterator(self)

    def _sampler_epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._sampler_epoch(), "batches_given": self._given}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._resume = dict(state_dict)

    def _start(self) -> Iterator[Any]:
        """The real iterator, positioned after the batches a loaded state says were already given out."""
        resume, self._resume = self._resume, None
        self._given = 0
        skip = 0
        if resume is not None and 0 < resume["batches_given"] < len(self):
            same_epoch = resume["epoch"] is None or resume["epoch"] == self._sampler_epoch()
            skip = resume["batches_given"] if same_epoch else 0
        if not skip:
            return super().__iter__()
        state = torch.get_rng_state()
        iterator = super().__iter__()
        torch.set_rng_state(state)  # the saved run drew this epoch's seed before its checkpoint
        for _ in range(skip):
            next(iterator)
        self._given = skip
        return iterator


class _LazyCountingIterator:
    """Creates the loader's iterator at the first ``next`` and counts the batches it gives out."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> _LazyCountingIterator:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = self.loader._start()
        batch = next(self.iterator)
        self.loader._given += 1
        return batch

    def __len__(self) -> int:
        return len(self.loader)


def unpack_batch(batch: Mapping[str, Tensor] | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``(input_ids, targets)`` from our dict batches or a user's ``(input_ids, targets)`` tuple."""
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch["targets"]
    input_ids, targets = batch[0], batch[1]
    return input_ids, targets
