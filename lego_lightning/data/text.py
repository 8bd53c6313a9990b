"""Word- or character-level text data from a local folder or the Hugging Face hub.

Loading, tokenization and caching go through Hugging Face ``datasets``: the tokenized splits
are cached as Arrow files keyed by their inputs, so a second run does not re-tokenize.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lego_lightning.data.blocks import EpochSeededRandomSampler, ResumableDataLoader, TokenBlocks
from lego_lightning.data.vocab import LEVELS, Level, Vocabulary, encode_line

# File names tried for each split of a local folder, in order.
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.txt", "wiki.train.tokens"),
    "validation": ("valid.txt", "validation.txt", "wiki.valid.tokens"),
    "test": ("test.txt", "wiki.test.tokens"),
}


def _positive_or_none(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"TextDataModule.{name} must be a positive integer or None, got {value!r}")


def find_split_files(path: str | Path) -> dict[str, Path]:
    """The split files of a local corpus folder; train and validation are required."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ValueError(f"TextDataModule.path={str(path)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"TextDataModule.path={str(path)!r} is not a folder")
    found = {}
    for split, names in SPLIT_FILES.items():
        for name in names:
            if (folder / name).is_file():
                found[split] = folder / name
                break
    for required in ("train", "validation"):
        if required not in found:
            raise ValueError(
                f"TextDataModule.path={str(path)!r} has no {required} split: expected one of "
                f"{list(SPLIT_FILES[required])}"
            )
    return found


def check_utf8_text(file: Path) -> None:
    """Raise a clear error for a corpus file that is not UTF-8 or holds no text at all."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{file} is not UTF-8 text: byte {err.start} is {data[err.start : err.start + 1]!r}; "
            "allowed: UTF-8 encoded text"
        ) from None
    if not text.strip():
        raise ValueError(f"{file} is empty: the corpus must hold some text")


class TextDataModule(L.LightningDataModule):
    """Blocks of ``seq_len`` tokens from a text corpus.

    Args:
        path: a local folder with ``train.txt``/``valid.txt`` (``test.txt`` optional) or
            ``wiki.{train,valid,test}.tokens``. When ``None``, ``dataset_name`` and
            ``dataset_config`` are loaded from the Hugging Face hub (needs internet once).
        level: ``"word"`` (whitespace tokens) or ``"char"``; every line ends in ``<eos>``.
        seq_len: tokens per block.
        max_train_samples / max_val_samples: keep the first N blocks (the research used 10K
            blocks of 32 words, and 100K/10K characters).
        calibration_samples: blocks held out of the training split, right after the training
            blocks (or at its end when all of it is used), for calibrating an early-exit
            threshold on tokens the model never trained on (``calibration_dataloader``).
        seed: of the per-epoch shuffle; defaults to the seed given to ``seed_everything``.
        max_vocab_size: keep the most frequent tokens, the rest become ``<unk>``.
        cache_dir: where ``datasets`` caches; its default (``~/.cache/huggingface``) otherwise.

    The vocabulary is built from the training split and saved in checkpoints; loading a
    checkpoint whose vocabulary differs raises an error that names the first difference.
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
    ) -> None:
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"TextDataModule.level={level!r} is not one of {LEVELS}")
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TextDataModule.{name} must be a positive integer, got {value!r}")
        _positive_or_none("max_train_samples", max_train_samples)
        _positive_or_none("max_val_samples", max_val_samples)
        if not isinstance(calibration_samples, int) or calibration_samples < 0:
            raise ValueError(f"TextDataModule.calibration_samples must be an integer >= 0, got {calibration_samples!r}")
        if max_vocab_size is not None and (not isinstance(max_vocab_size, int) or max_vocab_size < 3):
            raise ValueError(f"TextDataModule.max_vocab_size must be an integer >= 3 or None, got {max_vocab_size!r}")
        if num_workers < 0:
            raise ValueError(f"TextDataModule.num_workers must be >= 0, got {num_workers}")
        self.files = find_split_files(path) if path is not None else None
        for file in (self.files or {}).values():
            check_utf8_text(file)
        self.save_hyperparameters()
        self.path, self.dataset_name, self.dataset_config = path, dataset_name, dataset_config
        self.level, self.seq_len, self.batch_size = level, seq_len, batch_size
        self.max_train_samples, self.max_val_samples = max_train_samples, max_val_samples
        self.max_vocab_size, self.shuffle, self.num_workers = max_vocab_size, shuffle, num_workers
        self.calibration_samples, self.seed = calibration_samples, seed
        self.cache_dir = cache_dir
        self._vocab: Vocabulary | None = None
        self._raw_splits: Any = None
        self.splits: dict[str, TokenBlocks] = {}

    # ------------------------------------------------------------------------------- loading
    def _raw(self) -> Any:
        """The text splits as a ``datasets.DatasetDict`` with a ``text`` column (loaded once)."""
        if self._raw_splits is None:
            self._raw_splits = self._load_raw()
        return self._raw_splits

    def _load_raw(self) -> Any:
        import datasets

        if self.files is not None:
            files = {split: str(file) for split, file in self.files.items()}
            return datasets.load_dataset("text", data_files=files, cache_dir=self.cache_dir)
        raw = datasets.load_dataset(self.dataset_name, self.dataset_config, cache_dir=self.cache_dir)
        for required in ("train", "validation"):
            if required not in raw:
                raise ValueError(
                    f"dataset {self.dataset_name!r} ({self.dataset_config!r}) has no {required!r} split; "
                    f"it has {list(raw)}"
                )
        return raw

    @property
    def vocab(self) -> Vocabulary:
        """Built from the training split on first use (the CLI links ``vocab_size`` to the model)."""
        if self._vocab is None:
            self._vocab = Vocabulary.build(self._raw()["train"]["text"], self.level, self.max_vocab_size)
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _tokenized(self) -> Any:
        from datasets import Features, Sequence, Value

        vocab = self.vocab
        raw = self._raw()
        for split in ("train", "validation"):
            if not any(line.strip() for line in raw[split]["text"]):
                raise ValueError(f"the {split} split of {self.path or self.dataset_name} holds no text")
        return raw.map(
            _encode_batch,
            batched=True,
            remove_columns=raw["train"].column_names,
            features=Features({"ids": Sequence(Value("int32"))}),
            fn_kwargs={"index": vocab.index, "level": vocab.level},
            desc="tokenizing",
        )

    def prepare_data(self) -> None:
        # Rank 0 tokenizes and fills the cache; the other ranks read it in setup.
        self._tokenized()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        tokenized = self._tokenized()
        for split, ds in tokenized.items():
            limit = None if split == "train" else self.max_val_samples
            self.splits[split] = TokenBlocks(_flat_ids(ds), self.seq_len, limit)
        full, n_held = self.splits["train"], self.calibration_samples
        n_train = min(self.max_train_samples or len(full), len(full) - n_held)
        if n_train < 1:
            raise ValueError(
                f"TextDataModule.calibration_samples={n_held} leaves no training block: the train split has {len(full)}"
            )
        self.splits["train"] = full.subset(0, n_train)
        if n_held:
            self.splits["calibration"] = full.subset(n_train, n_train + n_held)

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
        return {"vocab": self.vocab.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = Vocabulary.from_state_dict(state_dict["vocab"])
        self.vocab.check_matches(saved, "the checkpoint")


def _encode_batch(batch: dict[str, list[str]], index: dict[str, int], level: Level) -> dict[str, list[list[int]]]:
    return {"ids": [encode_line(line, index, level) for line in batch["text"]]}


def _flat_ids(ds: Any) -> torch.Tensor:
    """All token ids of a tokenized split, in order, as one int32 tensor."""
    import pyarrow.compute as pc

    column = ds.data.column("ids")
    return torch.from_numpy(pc.list_flatten(column).to_numpy().copy())  # arrow memory is read-only
