"""Text data from a local corpus or the Hugging Face hub, tokenized once into arrays on disk.

The corpus (:mod:`~lego_lightning.data.corpus`) is read as a stream; the tokenizer
(:mod:`~lego_lightning.data.tokenizer`) is built or trained on the training split and cached;
each split is tokenized once into an array on disk (:mod:`~lego_lightning.data.token_cache`)
keyed by a fingerprint of its text and of the tokenizer, so a second run reuses both and memory
does not grow with the corpus.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lego_lightning.data import token_cache
from lego_lightning.data.blocks import EpochSeededRandomSampler, ResumableDataLoader, TokenBlocks
from lego_lightning.data.corpus import Corpus, local_corpus
from lego_lightning.data.tokenizer import (
    KINDS,
    TRAINED_KINDS,
    TextTokenizer,
    VocabularyTokenizer,
    build_tokenizer,
    load_tokenizer,
    tokenizer_from_state,
)
from lego_lightning.data.vocab import LEVELS, Level, Vocabulary

DEFAULT_TRAINED_VOCAB = 8192
# The smallest vocabulary each trained kind can have: its special tokens plus one (BPE also
# keeps all 256 bytes, so that no text is ever <unk>).
MIN_VOCAB = {"word": 3, "char": 3, "bpe": 256 + 1 + 1, "unigram": 2 + 1}


def _positive_or_none(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"TextDataModule.{name} must be a positive integer or None, got {value!r}")


class TextDataModule(L.LightningDataModule):
    """Blocks of ``seq_len`` tokens from a text corpus.

    Args:
        path: a local folder whose splits are ``train``, ``valid`` (or ``validation``) and
            optionally ``test``, each ``.txt``, ``.jsonl``/``.json``, ``.parquet`` or ``.csv``
            (or ``wiki.{train,valid,test}.tokens``). When ``None`` and ``files`` is not given,
            ``dataset_name`` and ``dataset_config`` are loaded from the Hugging Face hub (needs
            internet once).
        level: the older name for ``tokenizer: word`` or ``char``.
        seq_len: tokens per block.
        max_train_samples / max_val_samples: keep the first N blocks (the research used 10K
            blocks of 32 words, and 100K/10K characters).
        max_vocab_size: ``word``/``char``: keep the most frequent tokens, the rest become
            ``<unk>``; ``bpe``/``unigram``: the size trained (default 8,192).
        calibration_samples: blocks held out of the training split, right after the training
            blocks (or at its end when all of it is used), for calibrating an early-exit
            threshold on tokens the model never trained on (``calibration_dataloader``).
        seed: of the per-epoch shuffle; defaults to the seed given to ``seed_everything``.
        cache_dir: where the tokenizer and the token arrays are cached (and ``datasets``
            caches hub data); default ``$LEGO_CACHE`` or ``~/.cache/lego_lightning`` (and
            ``datasets``' own).
        tokenizer: ``word`` (whitespace words, ``<eos>`` ending each line), ``char``, ``byte``,
            ``bpe`` (byte-level BPE) or ``unigram`` trained on the training split, or the path
            of a ``tokenizer.json`` or of a folder holding one (a pretrained model's). Default:
            ``level``.
        files: the files of each split by glob, relative to ``path`` when it is given, e.g.
            ``{"train": "shards/train-*.parquet", "validation": "valid.jsonl"}``.
        text_field: the field holding the text in JSON-lines, Parquet, CSV and hub records.
        tokenize_processes: processes that tokenize a split (the arrays are the same for any
            number); default one per core for a word or character split of 32 MB or more, else
            one (a Hugging Face tokenizer encodes on every core by itself).

    The tokenizer is saved beside the logs (``tokenizer.json``, or ``vocab.json`` for words
    and characters) and in every checkpoint; loading a checkpoint whose tokenizer differs
    raises an error that says so (for words and characters, the first token that differs).
    Validation batches hold ``target_bytes``, the UTF-8 bytes of text their targets cover,
    from which the modules report bits per byte.
    """

    def __init__(
        self,
        path: str | None = None,
        dataset_name: str = "wikitext",
        dataset_config: str | None = "wikitext-2-raw-v1",
        level: Level = "word",
        seq_len: int = 32,
        batch_size: int = 64,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        max_vocab_size: int | None = None,
        calibration_samples: int = 0,
        shuffle: bool = True,
        seed: int | None = None,
        num_workers: int = 0,
        cache_dir: str | None = None,
        tokenizer: str | None = None,
        files: dict[str, str] | None = None,
        text_field: str = "text",
        tokenize_processes: int | None = None,
    ) -> None:
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"TextDataModule.level={level!r} is not one of {LEVELS}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TextDataModule.{name} must be a positive integer, got {value!r}")
        _positive_or_none("max_train_samples", max_train_samples)
        _positive_or_none("max_val_samples", max_val_samples)
        _positive_or_none("tokenize_processes", tokenize_processes)
        if not isinstance(calibration_samples, int) or calibration_samples < 0:
            raise ValueError(f"TextDataModule.calibration_samples must be an integer >= 0, got {calibration_samples!r}")
        if num_workers < 0:
            raise ValueError(f"TextDataModule.num_workers must be >= 0, got {num_workers}")
        if tokenizer is not None and level != "word" and tokenizer != level:
            raise ValueError(
                f"TextDataModule.tokenizer={tokenizer!r} and level={level!r} disagree: give tokenizer alone"
            )
        kind = tokenizer if tokenizer in KINDS else level if tokenizer is None else "file"
        # A ready tokenizer is read now: a path that is not one is refused before anything runs.
        ready = load_tokenizer(tokenizer) if kind == "file" else None  # type: ignore[arg-type]
        self._check_vocab_size(kind, max_vocab_size)
        if path is not None or files is not None:
            self.corpus = local_corpus(path, files, text_field)
        else:
            self.corpus = Corpus(None, dataset_name, dataset_config, text_field, cache_dir)
        self.save_hyperparameters()
        self.path, self.dataset_name, self.dataset_config = path, dataset_name, dataset_config
        self.kind = kind
        self.level, self.seq_len, self.batch_size = level, seq_len, batch_size
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.max_vocab_size, self.shuffle, self.num_workers = max_vocab_size, shuffle, num_workers
        self.calibration_samples, self.seed = calibration_samples, seed
        self.tokenize_processes = tokenize_processes
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else token_cache.default_cache_dir()
        self._tokenizer: TextTokenizer | None = ready
        self._fingerprints: dict[str, str] = {}
        self.splits: dict[str, TokenBlocks] = {}

    @staticmethod
    def _check_vocab_size(kind: str, size: int | None) -> None:
        if size is None:
            return
        if kind not in MIN_VOCAB:
            raise ValueError(
                f"TextDataModule.max_vocab_size={size!r} does not apply to tokenizer {kind!r}: it applies to "
                f"{sorted(MIN_VOCAB)} (the byte tokenizer has 257 tokens, a ready one its own)"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < MIN_VOCAB[kind]:
            why = "its special tokens, the 256 bytes and one merge" if kind == "bpe" else "its special tokens plus one"
            raise ValueError(
                f"TextDataModule.max_vocab_size={size!r} is too small for tokenizer {kind!r}: allowed an integer "
                f">= {MIN_VOCAB[kind]} ({why})"
            )

    # ---------------------------------------------------------------------------- tokenizer
    def _fingerprint(self, split: str) -> str:
        if split not in self._fingerprints:
            self._fingerprints[split] = self.corpus.fingerprint(split)
        return self._fingerprints[split]

    @property
    def text_tokenizer(self) -> TextTokenizer:
        """The tokenizer: loaded, or built from the training split on first use and cached on disk."""
        if self._tokenizer is None:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer

    def _build_tokenizer(self) -> TextTokenizer:
        size = self.max_vocab_size
        if size is None and self.kind in TRAINED_KINDS:
            size = DEFAULT_TRAINED_VOCAB
        key = token_cache.cache_key("tokenizer", self.kind, str(size), self._fingerprint("train"))
        cached = self.cache_dir / f"{key}.tokenizer.json"
        if cached.is_file():
            return tokenizer_from_state(json.loads(cached.read_text(encoding="utf-8")))
        if self.kind in TRAINED_KINDS:
            rank_zero_info(f"Training a {self.kind} tokenizer of {size} tokens on the training split ...")
        built = build_tokenizer(self.kind, size, self.corpus.lines("train"), self.corpus.plain_files("train"))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # ranks building at once never share one
        tmp.write_text(json.dumps(built.state_dict(), ensure_ascii=False), encoding="utf-8")
        tmp.replace(cached)
        return built

    @property
    def vocab(self) -> Vocabulary:
        """The word or character vocabulary (``tokenizer`` ``word`` or ``char``)."""
        if not isinstance(self.text_tokenizer, VocabularyTokenizer):
            raise AttributeError(f"the {self.kind} tokenizer has no word vocabulary: use text_tokenizer")
        return self.text_tokenizer.vocab

    @property
    def vocab_size(self) -> int:
        return len(self.text_tokenizer)

    # ------------------------------------------------------------------------------- tokens
    def _arrays(self, split: str) -> token_cache.TokenArrays:
        tokenizer = self.text_tokenizer
        key = token_cache.cache_key("tokens", tokenizer.fingerprint(), self._fingerprint(split))
        arrays = token_cache.load_arrays(self.cache_dir, key)
        if arrays is None:
            processes = token_cache.tokenize_processes(self.corpus.size(split), self.kind, self.tokenize_processes)
            workers = "1 process" if processes == 1 else f"{processes} processes"
            rank_zero_info(f"Tokenizing the {split} split into {self.cache_dir} ({workers}) ...")
            arrays = token_cache.write_arrays(self.cache_dir, key, self.corpus.lines(split), tokenizer, processes)
        return arrays

    def prepare_data(self) -> None:
        # Rank 0 tokenizes and fills the cache; the other ranks read it in setup.
        for split in self.corpus.splits:
            self._arrays(split)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split in self.corpus.splits:
            arrays = self._arrays(split)
            limit = None if split == "train" else self.max_val_samples
            if split in ("train", "validation") and not len(arrays):
                raise ValueError(f"the {split} split of {self.path or self.dataset_name} holds no text")
            self.splits[split] = TokenBlocks(arrays.ids, self.seq_len, limit, arrays.nbytes)
        full, n_held = self.splits["train"], self.calibration_samples
        n_train = min(self.max_train_samples or len(full), len(full) - n_held)
        if n_train < 1:
            raise ValueError(
                f"TextDataModule.calibration_samples={n_held} leaves no training block: the train split has {len(full)}"
            )
        self.splits["train"] = full.subset(0, n_train)
        if n_held:
            self.splits["calibration"] = full.subset(n_train, n_train + n_held)
        trainer = getattr(self, "trainer", None)
        if stage == "fit" and trainer is not None and trainer.loggers:  # beside the logs, when there are logs
            log_dir = trainer.log_dir  # on every rank: under DDP it is a broadcast
            if trainer.is_global_zero and log_dir:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                self.text_tokenizer.save(Path(log_dir))

    # ----------------------------------------------------------------------------- loaders
    @property
    def train_dataset(self) -> TokenBlocks:
        """The training blocks (hard-example mining reads them by index)."""
        self.setup("fit")
        return self.splits["train"]

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            raise ValueError(f"this corpus has no {split!r} split (found {sorted(self.splits)})")
        dataset = self.splits[split]
        # Training resumes mid-epoch where it stopped; evaluation always runs whole.
        loader_class = ResumableDataLoader if split == "train" else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededRandomSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def calibration_dataloader(self) -> DataLoader:
        """Held-out training blocks (``calibration_samples``); the validation set when there are none."""
        return self._loader("calibration" if "calibration" in self.splits else "validation", False)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

    # -------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state = self.text_tokenizer.state_dict()
        # Words and characters keep today's key, so earlier checkpoints load.
        return {"vocab": state} if isinstance(self.text_tokenizer, VocabularyTokenizer) else {"tokenizer": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = tokenizer_from_state(state_dict["vocab"] if "vocab" in state_dict else state_dict["tokenizer"])
        self.text_tokenizer.check_matches(saved, "the checkpoint")
