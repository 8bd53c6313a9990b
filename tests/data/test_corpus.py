"""Any corpus: text, JSON lines, Parquet and CSV files, several per split by glob; read in pieces."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from lego_lightning.data import TextDataModule
from lego_lightning.data import corpus as corpus_module
from tests.conftest import write_corpus


def lines_of(folder: Path, name: str) -> list[str]:
    return (folder / name).read_text(encoding="utf-8").split("\n")[:-1]


def write_records(folder: Path, stem: str, lines: list[str], fmt: str, field: str = "body") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": list(range(len(lines))), field: lines})
    if fmt == "jsonl":
        with open(folder / f"{stem}.jsonl", "w", encoding="utf-8") as f:
            for i, line in enumerate(lines):
                f.write(json.dumps({"id": i, field: line}) + "\n")
    elif fmt == "parquet":
        pq.write_table(table, folder / f"{stem}.parquet", row_group_size=7)
    else:
        pacsv.write_csv(table, folder / f"{stem}.csv")


def stream(dm: TextDataModule) -> list[int]:
    dm.setup("fit")
    return dm.splits["train"].input_ids.flatten().tolist()


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("text"))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_records_give_the_stream_of_the_same_lines_as_text(text_corpus, tmp_path, fmt):
    for stem, name in (("train", "train.txt"), ("valid", "valid.txt")):
        write_records(tmp_path / "records", stem, lines_of(text_corpus, name), fmt)
    from_text = TextDataModule(path=str(text_corpus), seq_len=8, cache_dir=str(tmp_path))
    from_records = TextDataModule(path=str(tmp_path / "records"), text_field="body", seq_len=8, cache_dir=str(tmp_path))
    assert from_records.vocab.tokens == from_text.vocab.tokens
    assert stream(from_records) == stream(from_text)


def test_shards_by_glob_read_in_name_order_equal_one_file(text_corpus, tmp_path):
    lines = lines_of(text_corpus, "train.txt")
    shards = tmp_path / "shards"
    for i, start in enumerate(range(0, len(lines), 25)):
        write_records(shards, f"train-{i:03d}", lines[start : start + 25], "parquet", field="text")
    files = {"train": "shards/train-*.parquet", "validation": str(text_corpus / "valid.txt")}
    sharded = TextDataModule(path=str(tmp_path), files=files, seq_len=8, cache_dir=str(tmp_path))
    assert len(sharded.corpus.files["train"]) == 5
    whole = TextDataModule(path=str(text_corpus), seq_len=8, cache_dir=str(tmp_path))
    assert stream(sharded) == stream(whole)


def test_utf8_is_checked_in_pieces_with_the_byte_offset_of_the_fault(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_module, "READ_CHUNK", 5)  # characters cut across pieces, the fault in a late one
    folder = write_corpus(tmp_path / "c")
    good = "ééé aaa\nb ".encode()
    (folder / "train.txt").write_bytes(good + b"\xff tail\n")
    with pytest.raises(ValueError, match=rf"train.txt is not UTF-8 text: byte {len(good)} is b'\\xff'"):
        TextDataModule(path=str(folder))
    (folder / "train.txt").write_bytes("ééé aaa\nb é\n".encode())
    TextDataModule(path=str(folder), cache_dir=str(tmp_path))  # multi-byte characters cut by a piece are fine


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_a_record_file_without_the_text_field_is_named(text_corpus, tmp_path, fmt):
    write_records(tmp_path, "train", lines_of(text_corpus, "train.txt"), fmt, field="content")
    write_records(tmp_path, "valid", lines_of(text_corpus, "valid.txt"), fmt, field="content")
    with pytest.raises(
        ValueError, match=rf"text_field='text' is not a field of .*train.{fmt}: it has \['id', 'content'\]"
    ):
        TextDataModule(path=str(tmp_path))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (
            {"train": "nothing-*.txt", "validation": "valid.txt"},
            r"TextDataModule.files.train='nothing-\*.txt' matches no",
        ),
        ({"train": "train.txt", "valid": "valid.txt"}, r"TextDataModule.files has a split 'valid': allowed \['train'"),
        ({"train": "train.txt"}, r"has no validation split"),
    ],
)
def test_bad_globs_fail_at_construction(text_corpus, files, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(path=str(text_corpus), files=files)


def test_a_file_of_another_format_is_refused(tmp_path):
    (tmp_path / "train.xml").write_text("<a/>")
    (tmp_path / "valid.txt").write_text("a b\n")
    with pytest.raises(ValueError, match=r"train.xml has the suffix '.xml': allowed \['.txt'"):
        TextDataModule(path=str(tmp_path), files={"train": "train.xml", "validation": "valid.txt"})


def test_a_json_file_that_is_not_json_lines_is_named(text_corpus, tmp_path):
    (tmp_path / "train.json").write_text('[{"text": "a b"},\n {"text": "c"}]\n')
    (tmp_path / "valid.txt").write_text("a b\n")
    with pytest.raises(ValueError, match=r"train.json, line 1 is not a JSON object: allowed JSON lines"):
        TextDataModule(path=str(tmp_path))
