"""Tokenized splits on disk: flat arrays of token ids, written once, read a slice at a time by every run.

Each split becomes two files in the cache folder, named by a fingerprint of the split's text
and of the tokenizer: ``{key}.ids`` (``uint16`` when the vocabulary fits, else ``uint32``) and
``{key}.bytes`` (``uint16``: the UTF-8 bytes of text each token stands for, what bits per byte
divides by), plus ``{key}.json`` (their dtype and length), written last, so a run killed
mid-way leaves no array that looks finished. Lines are tokenized a batch at a time and written
as they come, and blocks are read with ``pread`` (:class:`DiskArray`), not a memory map, whose
pages would stay in the process's resident memory once read: memory does not grow with the
corpus.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lego_lightning.data.tokenizer import TextTokenizer, batches
from lego_lightning.data.vocab import LEVELS

FORMAT = 1  # bump when the files' layout or the tokenization of lines changes
LINES_PER_BATCH = 8192
# A split this large is tokenized in a process per core; below it, starting them costs more than it saves.
PARALLEL_MIN_BYTES = 32 << 20


def tokenize_processes(split_bytes: int, kind: str, requested: int | None = None) -> int:
    """``requested``; by default a process per core for a split of ``PARALLEL_MIN_BYTES`` or more of a ``kind``
    tokenized in Python (words, characters), else one: a Hugging Face tokenizer already encodes on every core,
    and forked workers around it cost hundreds of MiB for a few percent (benchmarks/results/data_scale.md)."""
    if requested is not None:
        return requested
    return (os.cpu_count() or 1) if kind in LEVELS and split_bytes >= PARALLEL_MIN_BYTES else 1


def default_cache_dir() -> Path:
    """``$LEGO_CACHE``, else ``~/.cache/lego_lightning``."""
    return Path(os.environ.get("LEGO_CACHE", "~/.cache/lego_lightning")).expanduser()


def cache_key(*parts: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for part in (str(FORMAT), *parts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class DiskArray:
    """A flat array in a file; ``array[a:b]`` reads those elements into a new numpy array.

    The file is opened once per process (a DataLoader worker reopens it), and read with
    ``os.pread``, which keeps no file position, so processes sharing it never interfere.
    """

    def __init__(self, file: Path, dtype: str | np.dtype, length: int) -> None:
        self.file, self.dtype, self.length = Path(file), np.dtype(dtype), length
        self._fd: int | None = None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError(f"a DiskArray is read by slices, got {key!r}")
        start, stop, step = key.indices(self.length)
        if step != 1:
            raise ValueError("a DiskArray is read by contiguous slices")
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        if self._fd is None:
            self._fd = os.open(self.file, os.O_RDONLY)
        size = self.dtype.itemsize
        return np.frombuffer(os.pread(self._fd, (stop - start) * size, start * size), dtype=self.dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}  # a worker process opens its own

    def __del__(self, close: Callable[[int], None] = os.close) -> None:
        # ``close`` is bound at definition: at interpreter exit this module's ``os`` may already be None.
        if getattr(self, "_fd", None) is not None:
            close(self._fd)


@dataclass(frozen=True)
class TokenArrays:
    """A split's token ids and bytes per token, on disk."""

    ids: DiskArray
    nbytes: DiskArray

    def __len__(self) -> int:
        return len(self.ids)


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def load_arrays(folder: Path, key: str) -> TokenArrays | None:
    """The arrays of ``key`` when a finished run wrote them, else ``None``."""
    meta = folder / f"{key}.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    return TokenArrays(
        ids=DiskArray(folder / f"{key}.ids", info["ids_dtype"], info["tokens"]),
        nbytes=DiskArray(folder / f"{key}.bytes", "uint16", info["tokens"]),
    )


def write_arrays(
    folder: Path, key: str, lines: Iterable[str], tokenizer: TextTokenizer, processes: int = 1
) -> TokenArrays:
    """Tokenize ``lines`` into the arrays of ``key``, a batch of lines at a time; returns them.

    With ``processes > 1`` the batches are tokenized in that many worker processes, in order,
    with at most two batches per worker in flight, so memory stays bounded.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dtype = ids_dtype(len(tokenizer))
    tmp = f".{os.getpid()}.tmp"
    ids_file, bytes_file = folder / f"{key}.ids{tmp}", folder / f"{key}.bytes{tmp}"
    tokens = 0
    with open(ids_file, "wb") as ids_out, open(bytes_file, "wb") as bytes_out:
        for ids, nbytes in _encoded(batches(lines, LINES_PER_BATCH), tokenizer, processes):
            ids_out.write(np.asarray(ids, dtype=dtype).tobytes())
            bytes_out.write(np.minimum(np.asarray(nbytes, dtype=np.int64), 0xFFFF).astype(np.uint16).tobytes())
            tokens += len(ids)
    os.replace(ids_file, folder / f"{key}.ids")
    os.replace(bytes_file, folder / f"{key}.bytes")
    meta_tmp = folder / f"{key}.json{tmp}"
    meta_tmp.write_text(json.dumps({"ids_dtype": dtype.name, "tokens": tokens, "format": FORMAT}))
    os.replace(meta_tmp, folder / f"{key}.json")
    arrays = load_arrays(folder, key)
    assert arrays is not None
    return arrays


_WORKER_TOKENIZER: TextTokenizer | None = None


def _start_worker(tokenizer: TextTokenizer) -> None:
    global _WORKER_TOKENIZER
    # Hugging Face tokenizers would warn that the process was forked after its threads ran, and
    # each worker is one of the parallel parts already.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = tokenizer


def _encode_in_worker(batch: list[str]) -> tuple[list[int], list[int]]:
    assert _WORKER_TOKENIZER is not None
    return _WORKER_TOKENIZER.encode_lines(batch)


def _encoded(
    batches: Iterator[list[str]], tokenizer: TextTokenizer, processes: int
) -> Iterator[tuple[list[int], list[int]]]:
    """Each batch's ids and bytes per token, in order; in ``processes`` forked workers when more than one."""
    if processes <= 1:
        yield from (tokenizer.encode_lines(batch) for batch in batches)
        return
    context = multiprocessing.get_context("fork")  # the workers inherit the tokenizer, nothing is pickled
    with context.Pool(processes, initializer=_start_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
