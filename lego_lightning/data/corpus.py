"""Where the text comes from: a local folder, files by glob, or a Hugging Face hub dataset; read as a stream.

A corpus is its splits (``train`` and ``validation`` required, ``test`` optional), each a list
of files read in order, or a hub dataset's split. Every file is read a piece at a time, so no
split is ever held in memory whole. The unit of text is a *line*: a line of a text file (split
on ``\\n`` after universal-newline translation, as Hugging Face ``datasets`` reads text), or one
record's text field of a JSON-lines, Parquet or CSV file or a hub dataset.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLITS = ("train", "validation", "test")
# File names tried for each split of a local folder, in order: today's names, then any format.
SPLIT_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train", "wiki.train"),
    "validation": ("valid", "validation", "wiki.valid"),
    "test": ("test", "wiki.test"),
}
TEXT_SUFFIXES = (".txt", ".tokens")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SUFFIXES = (*TEXT_SUFFIXES, *RECORD_SUFFIXES)
READ_CHUNK = 1 << 20  # characters or records read at a time


@dataclass
class Corpus:
    """The files of each split (local), or a hub dataset's name and config; ``text_field`` of records.

    ``digests`` holds a hash of each local file's bytes, taken while :func:`check_file` read it,
    so a run reads its corpus once to check and fingerprint it; ``plain`` the text files whose lines
    a reader that splits after each ``\n`` gets as :meth:`lines` gives them (no carriage return, a
    line break at the end), which Hugging Face ``tokenizers`` can then train on by itself.
    """

    files: Mapping[str, tuple[Path, ...]] | None
    dataset_name: str | None = None
    dataset_config: str | None = None
    text_field: str = "text"
    cache_dir: str | None = None
    digests: Mapping[Path, str] = field(default_factory=dict)
    plain: frozenset[Path] = frozenset()
    _hub_splits: Any = field(default=None, repr=False)

    @property
    def splits(self) -> tuple[str, ...]:
        if self.files is not None:
            return tuple(s for s in SPLITS if s in self.files)
        return tuple(s for s in SPLITS if s in self._hub())

    def lines(self, split: str) -> Iterator[str]:
        """The split's lines in order, without line breaks, read a piece at a time."""
        if self.files is None:
            yield from _hub_lines(self._hub()[split], self.text_field)
            return
        for file in self.files[split]:
            yield from _file_lines(file, self.text_field)

    def plain_files(self, split: str) -> tuple[Path, ...] | None:
        """The split's files when every one is ``plain`` (see the class), so reading them raw gives :meth:`lines`
        with line breaks; ``None`` otherwise."""
        files = None if self.files is None else self.files[split]
        return files if files is not None and all(f in self.plain for f in files) else None

    def size(self, split: str) -> int:
        """Bytes of the split's files (of its Arrow data for a hub dataset)."""
        if self.files is None:
            return int(self._hub()[split].data.nbytes)
        return sum(file.stat().st_size for file in self.files[split])

    def fingerprint(self, split: str) -> str:
        """Changes whenever the split's text changes: from its files' names and bytes, or the hub's own."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(self.text_field.encode())
        if self.files is None:
            digest.update(f"{self.dataset_name}/{self.dataset_config}/{split}".encode())
            digest.update(str(self._hub()[split]._fingerprint).encode())
            return digest.hexdigest()
        for file in self.files[split]:
            digest.update(file.name.encode())
            digest.update((self.digests.get(file) or file_digest(file)).encode())
        return digest.hexdigest()

    def _hub(self) -> Any:
        import datasets

        if self._hub_splits is None:
            raw = datasets.load_dataset(self.dataset_name, self.dataset_config, cache_dir=self.cache_dir)
            for required in ("train", "validation"):
                if required not in raw:
                    raise ValueError(
                        f"dataset {self.dataset_name!r} ({self.dataset_config!r}) has no {required!r} split; "
                        f"it has {list(raw)}"
                    )
            if self.text_field not in raw["train"].column_names:
                raise ValueError(
                    f"TextDataModule.text_field={self.text_field!r} is not a column of {self.dataset_name!r}: "
                    f"it has {raw['train'].column_names}"
                )
            self._hub_splits = raw
        return self._hub_splits


def local_corpus(path: str | None, files: Mapping[str, str] | None, text_field: str) -> Corpus:
    """The files of each split: ``files`` globs (relative to ``path`` when given), else found in folder ``path``."""
    folder = Path(path).expanduser() if path is not None else None
    if folder is not None:
        if not folder.exists():
            raise ValueError(
                f"TextDataModule.path={str(path)!r} does not exist: point --data.path at a folder with train and "
                "valid files, or give --data.path null to load --data.dataset_name (default wikitext, "
                "wikitext-2-raw-v1) from the Hugging Face hub"
            )
        if not folder.is_dir():
            raise ValueError(f"TextDataModule.path={str(path)!r} is not a folder")
    found: dict[str, tuple[Path, ...]] = {}
    if files is not None:
        for split, pattern in files.items():
            if split not in SPLITS:
                raise ValueError(f"TextDataModule.files has a split {split!r}: allowed {list(SPLITS)}")
            full = str(folder / pattern) if folder is not None and not Path(pattern).is_absolute() else pattern
            matched = tuple(sorted(Path(p) for p in glob.glob(str(Path(full).expanduser()), recursive=True)))
            matched = tuple(p for p in matched if p.is_file())
            if not matched:
                raise ValueError(f"TextDataModule.files.{split}={pattern!r} matches no file")
            found[split] = matched
    else:
        assert folder is not None
        for split, stems in SPLIT_STEMS.items():
            for name in (stem + suffix for stem in stems for suffix in SUFFIXES):
                if (folder / name).is_file():
                    found[split] = (folder / name,)
                    break
    for required in ("train", "validation"):
        if required not in found:
            expected = [stem + suffix for stem in SPLIT_STEMS[required] for suffix in SUFFIXES]
            raise ValueError(
                f"TextDataModule.path={str(path)!r} has no {required} split: expected one of {expected} "
                "(or name the files with TextDataModule.files)"
            )
    checked = {file: check_file(file, text_field) for split_files in found.values() for file in split_files}
    digests = {file: digest for file, (digest, _) in checked.items()}
    plain = frozenset(file for file, (_, is_plain) in checked.items() if is_plain)
    return Corpus(files=found, text_field=text_field, digests=digests, plain=plain)


def check_file(file: Path, text_field: str) -> tuple[str, bool]:
    """Refuse a file that is not UTF-8 text, holds no text, or (records) lacks ``text_field``; reads in pieces.

    Returns the hash of its bytes (:func:`file_digest`), taken on the same read for text files, and
    whether the file is a plain text file (:class:`Corpus`).
    """
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{file} has the suffix {file.suffix!r}: allowed {list(SUFFIXES)}")
    if suffix in TEXT_SUFFIXES:
        return _check_utf8_text(file)
    fields = _record_fields(file)
    if text_field not in fields:
        raise ValueError(f"TextDataModule.text_field={text_field!r} is not a field of {file}: it has {fields}")
    if not any(line.strip() for line in _file_lines(file, text_field)):
        raise ValueError(f"{file} is empty: the corpus must hold some text")
    return file_digest(file), False


def file_digest(file: Path) -> str:
    """A hash of the file's bytes, read in pieces."""
    digest = hashlib.blake2b(digest_size=16)
    with open(file, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_utf8_text(file: Path) -> tuple[str, bool]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    digest = hashlib.blake2b(digest_size=16)  # the same as file_digest's
    offset, has_text = 0, False  # offset: bytes read before this chunk
    carriage_return, last = False, b""
    with open(file, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            digest.update(chunk)
            carriage_return = carriage_return or b"\r" in chunk
            last = chunk[-1:] or last
            pending = len(decoder.getstate()[0])  # the start of a character cut by the last chunk
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                bad = err.object[err.start : err.start + 1]
                at = offset - pending + err.start
                raise ValueError(
                    f"{file} is not UTF-8 text: byte {at} is {bad!r}; allowed: UTF-8 encoded text"
                ) from None
            has_text = has_text or bool(text.strip())
            offset += len(chunk)
            if not chunk:
                break
    if not has_text:
        raise ValueError(f"{file} is empty: the corpus must hold some text")
    return digest.hexdigest(), not carriage_return and last == b"\n"


def _record_fields(file: Path) -> list[str]:
    suffix = file.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(file).names)
    if suffix == ".csv":
        import pyarrow.csv as pacsv

        return list(pacsv.open_csv(file).schema.names)
    with open(file, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                return list(_json_record(line, file, number))
    return []


def _json_record(line: str, file: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise ValueError(f"{file}, line {number} is not a JSON object: allowed JSON lines, one object per line")
    return record


def _file_lines(file: Path, text_field: str) -> Iterator[str]:
    suffix = file.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        with open(file, encoding="utf-8") as f:  # universal newlines, split on "\n": as datasets' text loader
            for line in f:
                yield line.rstrip("\n")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(file).iter_batches(batch_size=READ_CHUNK // 64, columns=[text_field]):
            yield from (t or "" for t in batch.column(0).to_pylist())
    elif suffix == ".csv":
        import pyarrow.csv as pacsv

        reader = pacsv.open_csv(file, convert_options=pacsv.ConvertOptions(column_types={text_field: "string"}))
        index = reader.schema.get_field_index(text_field)
        for batch in reader:
            yield from (t or "" for t in batch.column(index).to_pylist())
    else:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    record = _json_record(line, file, number)
                    if text_field not in record:
                        raise ValueError(
                            f"{file}, line {number}: TextDataModule.text_field={text_field!r} is not a field; "
                            f"it has {list(record)}"
                        )
                    yield record[text_field] or ""


def _hub_lines(split: Any, text_field: str) -> Iterator[str]:
    for batch in split.select_columns([text_field]).iter(batch_size=READ_CHUNK // 64):
        yield from (t or "" for t in batch[text_field])
