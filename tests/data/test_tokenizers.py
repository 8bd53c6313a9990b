"""Tokenizers: byte, BPE and unigram trained locally, ready ones from a tokenizer.json, in checkpoints and caches."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from lego_lightning.data import TextDataModule, token_cache
from lego_lightning.data.token_cache import ids_dtype
from lego_lightning.data.tokenizer import load_tokenizer
from tests.conftest import write_corpus

TEXT = ["The café's naïve façade — 3.5 km², 東京 🙂", "", "  = Valkyria Chronicles III =  ", "a\tb"]


def stream_of(dm: TextDataModule, split: str = "train") -> np.ndarray:
    dm.setup("fit")
    blocks = dm.splits[split]
    return np.concatenate([blocks.input_ids.flatten().numpy(), blocks.targets[-1, -1:].numpy()])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = write_corpus(tmp_path_factory.mktemp("tok_corpus"))
    with open(folder / "train.txt", "a", encoding="utf-8") as f:
        f.write("\n".join(TEXT) + "\n")
    return folder


@pytest.mark.parametrize(("kind", "size"), [("byte", None), ("bpe", 300), ("unigram", 120)])
def test_each_kind_covers_every_byte_of_the_text_once(corpus, tmp_path, kind, size):
    dm = TextDataModule(path=str(corpus), tokenizer=kind, max_vocab_size=size, seq_len=8, cache_dir=str(tmp_path))
    tokenizer = dm.text_tokenizer
    # BPE reaches the size asked for; unigram stops short of it on a corpus this small.
    assert (
        len(tokenizer) == 257 if kind == "byte" else len(tokenizer) == size if kind == "bpe" else len(tokenizer) <= size
    )
    ids, nbytes = tokenizer.encode_lines(TEXT)
    assert sum(nbytes) == sum(len(line.encode("utf-8")) + 1 for line in TEXT)  # each line and its line break
    assert len(ids) == len(nbytes) and min(nbytes) >= 0
    if kind != "unigram":  # byte-level: the text comes back exactly, nothing is <unk>
        assert tokenizer.decode(ids) == "".join(line + "\n" for line in TEXT)


def bytes_from_offsets(tokenizer, lines):
    """Each token's bytes as its offsets in its line say (what every line was measured with before the table)."""
    ids, nbytes = [], []
    for line in lines:
        text = line + "\n"
        encoding = tokenizer.encode(text, add_special_tokens=False)
        ids += encoding.ids
        counted = 0
        for start, end in encoding.offsets:  # a character's bytes go to the first token that covers it
            start = max(start, counted)
            nbytes.append(len(text[start:end].encode("utf-8")) if end > start else 0)
            counted = max(counted, end)
        nbytes[-1] += len(text.encode("utf-8")) - sum(nbytes[len(nbytes) - len(encoding.ids) :])
    return ids, nbytes


@pytest.mark.parametrize(("kind", "size"), [("byte", None), ("bpe", 300), ("unigram", 120), ("gpt2_file", None)])
def test_bytes_read_from_the_token_table_equal_the_offsets(corpus, tmp_path, kind, size):
    if kind == "gpt2_file":  # a ready tokenizer.json as GPT-2's: byte-level, a ByteLevel post-processor
        trained = TextDataModule(path=str(corpus), tokenizer="bpe", max_vocab_size=290, cache_dir=str(tmp_path))
        spec = trained.text_tokenizer.tokenizer
        spec.post_processor = processors.ByteLevel(trim_offsets=False)
        spec.save(str(tmp_path / "tokenizer.json"))
        kind, size = str(tmp_path / "tokenizer.json"), None
    dm = TextDataModule(path=str(corpus), tokenizer=kind, max_vocab_size=size, cache_dir=str(tmp_path))
    tokenizer = dm.text_tokenizer
    assert tokenizer.byte_table is not None  # the fast way applies
    # Lines with characters of 2, 3 and 4 bytes, split across byte-level tokens, an empty line, a tab.
    lines = [*TEXT, *(corpus / "train.txt").read_text(encoding="utf-8").split("\n")[:40], "ünïcödé 🙂🙂 東京東京"]
    ids, nbytes = tokenizer.encode_lines(lines)
    expected_ids, expected_bytes = bytes_from_offsets(tokenizer.tokenizer, lines)
    assert list(ids) == expected_ids and list(nbytes) == expected_bytes


def test_a_tokenizer_whose_tokens_do_not_say_their_bytes_is_measured_by_offsets(tmp_path):
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(tmp_path / "tokenizer.json")
    assert hf.byte_table is None
    ids, nbytes = hf.encode_lines(["A b  c"])
    assert (
        (ids, nbytes) == bytes_from_offsets(tokenizer, ["A b  c"]) == ([1, 2, 0], [1, 1, 5])
    )  # uncovered spaces go to the last


def test_word_and_char_bytes_add_up_to_each_line_with_its_break(corpus, tmp_path):
    for level in ("word", "char"):
        dm = TextDataModule(path=str(corpus), level=level, seq_len=8, cache_dir=str(tmp_path))
        ids, nbytes = dm.text_tokenizer.encode_lines(TEXT)
        assert sum(nbytes) == sum(len(line.encode("utf-8")) + 1 for line in TEXT)
        assert ids == [i for line in TEXT for i in dm.vocab.encode(line)]


def test_the_stream_on_disk_is_what_the_tokenizer_gives_line_by_line(corpus, tmp_path):
    dm = TextDataModule(path=str(corpus), tokenizer="bpe", max_vocab_size=300, seq_len=8, cache_dir=str(tmp_path))
    lines = (corpus / "train.txt").read_text(encoding="utf-8").split("\n")[:-1]
    expected = dm.text_tokenizer.encode_lines(lines)[0]
    stream = stream_of(dm)
    assert stream.tolist() == list(expected[: len(stream)])
    batch = next(iter(dm.val_dataloader()))
    assert batch["target_bytes"].shape == (batch["input_ids"].shape[0],)
    assert (batch["target_bytes"] > 0).all()


def test_a_ready_tokenizer_json_gives_the_ids_transformers_users_get(corpus, tmp_path):
    trained = TextDataModule(path=str(corpus), tokenizer="bpe", max_vocab_size=280, cache_dir=str(tmp_path / "c"))
    folder = tmp_path / "pretrained"
    folder.mkdir()
    file = trained.text_tokenizer.save(folder)
    assert file.name == "tokenizer.json"
    reference = Tokenizer.from_file(str(file))
    for path in (file, folder):  # the file, or a folder holding one
        dm = TextDataModule(path=str(corpus), tokenizer=str(path), seq_len=8, cache_dir=str(tmp_path / "c"))
        assert dm.vocab_size == reference.get_vocab_size()
        first_lines = (corpus / "train.txt").read_text(encoding="utf-8").split("\n")[:3]
        expected = [i for line in first_lines for i in reference.encode(line + "\n", add_special_tokens=False).ids]
        assert stream_of(dm)[: len(expected)].tolist() == expected


def test_ids_past_65535_are_stored_as_uint32(corpus, tmp_path):
    words = {f"w{i}": i for i in range(70_000)}
    words["[UNK]"] = 70_000
    big = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    big.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "data").mkdir()
    line = " ".join(f"w{i}" for i in range(65_530, 65_546))
    for name in ("train.txt", "valid.txt"):
        (tmp_path / "data" / name).write_text((line + "\n") * 4, encoding="utf-8")
    dm = TextDataModule(path=str(tmp_path / "data"), tokenizer=str(tmp_path), seq_len=4, cache_dir=str(tmp_path))
    assert ids_dtype(dm.vocab_size) == np.uint32 and ids_dtype(65_536) == np.uint16
    assert stream_of(dm)[:16].tolist() == list(range(65_530, 65_546))


def test_the_checkpoint_carries_the_tokenizer_and_refuses_another(corpus, tmp_path):
    def bpe(size):
        return TextDataModule(path=str(corpus), tokenizer="bpe", max_vocab_size=size, cache_dir=str(tmp_path))

    torch.save(bpe(300).state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    bpe(300).load_state_dict(state)  # the same tokenizer loads
    with pytest.raises(ValueError, match=r"the checkpoint: its tokenizer \(bpe, 300 tokens\) differs from the data's"):
        bpe(290).load_state_dict(state)
    word = TextDataModule(path=str(corpus), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"its tokenizer \(bpe, 300 tokens\) differs from the data's \(word"):
        word.load_state_dict(state)


def test_a_trained_tokenizer_is_cached_and_not_trained_again(corpus, tmp_path):
    first = TextDataModule(path=str(corpus), tokenizer="unigram", max_vocab_size=100, cache_dir=str(tmp_path))
    first.prepare_data()
    (cached,) = tmp_path.glob("*.tokenizer.json")
    stamp = cached.stat().st_mtime_ns
    second = TextDataModule(path=str(corpus), tokenizer="unigram", max_vocab_size=100, cache_dir=str(tmp_path))
    assert second.text_tokenizer.fingerprint() == first.text_tokenizer.fingerprint()
    assert cached.stat().st_mtime_ns == stamp
    assert np.array_equal(stream_of(first), stream_of(second))
    other = TextDataModule(path=str(corpus), tokenizer="unigram", max_vocab_size=90, cache_dir=str(tmp_path))
    other.prepare_data()
    assert len(list(tmp_path.glob("*.tokenizer.json"))) == 2  # another size is another tokenizer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tokenizer": "missing/tokenizer.json"}, r"tokenizer='missing/tokenizer.json' is neither one of \('word'"),
        ({"tokenizer": "bpe", "max_vocab_size": 257}, r"max_vocab_size=257 is too small for tokenizer 'bpe'.*>= 258"),
        ({"tokenizer": "unigram", "max_vocab_size": 2}, r"max_vocab_size=2 is too small for tokenizer 'unigram'.*>= 3"),
        ({"tokenizer": "byte", "max_vocab_size": 300}, r"max_vocab_size=300 does not apply to tokenizer 'byte'"),
        ({"tokenizer": "bpe", "level": "char"}, r"tokenizer='bpe' and level='char' disagree"),
    ],
)
def test_bad_tokenizer_settings_fail_at_construction(corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(path=str(corpus), **kwargs)


def test_a_unigram_size_below_the_corpus_characters_is_named(corpus, tmp_path):
    dm = TextDataModule(path=str(corpus), tokenizer="unigram", max_vocab_size=20, cache_dir=str(tmp_path))
    with pytest.raises(
        ValueError, match=r"max_vocab_size=20: training the unigram tokenizer failed: .*not large enough"
    ):
        dm.prepare_data()


def test_a_file_that_is_not_a_tokenizer_is_named(corpus, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a tokenizer.json"):
        TextDataModule(path=str(corpus), tokenizer=str(tmp_path))


def test_worker_processes_read_the_same_blocks_from_disk(corpus, tmp_path):
    def first_batches(workers):
        dm = TextDataModule(
            path=str(corpus),
            tokenizer="byte",
            seq_len=8,
            batch_size=4,
            shuffle=False,
            num_workers=workers,
            cache_dir=str(tmp_path),
        )
        dm.setup("fit")
        return [b["input_ids"] for b, _ in zip(dm.train_dataloader(), range(3))]

    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), first_batches(2)))


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_a_large_split_is_tokenized_in_worker_processes_to_the_same_arrays(corpus, tmp_path, monkeypatch, caplog, kind):
    caplog.set_level("INFO")

    def stream_with(min_bytes, cache, **processes):
        monkeypatch.setattr(token_cache, "PARALLEL_MIN_BYTES", min_bytes)
        monkeypatch.setattr(token_cache, "LINES_PER_BATCH", 16)  # many batches, several in flight
        dm = TextDataModule(
            path=str(corpus),
            tokenizer=kind,
            max_vocab_size=300 if kind == "bpe" else None,
            seq_len=8,
            cache_dir=str(tmp_path / cache),
            **processes,
        )
        return stream_of(dm), np.concatenate([dm.splits["train"][i]["target_bytes"][None].numpy() for i in range(5)])

    serial = stream_with(1 << 40, "serial")
    assert "Tokenizing the train split" in caplog.text and "(1 process)" in caplog.text
    caplog.clear()
    parallel = stream_with(0, "parallel")
    # Words are tokenized in Python: a process per core. A Hugging Face tokenizer uses every core itself.
    default = f"({os.cpu_count()} processes)" if kind == "word" else "(1 process)"
    assert default in caplog.text
    assert np.array_equal(serial[0], parallel[0]) and np.array_equal(serial[1], parallel[1])
    chosen = stream_with(1 << 40, "chosen", tokenize_processes=3)  # asked for: whatever the split's size
    assert "(3 processes)" in caplog.text
    assert np.array_equal(serial[0], chosen[0]) and np.array_equal(serial[1], chosen[1])


def test_data_still_open_at_interpreter_exit_closes_quietly(corpus, tmp_path):
    # A DataLoader left mid-epoch keeps its arrays open until the interpreter tears modules down.
    code = (
        "from lego_lightning.data import TextDataModule\n"
        f"dm = TextDataModule(path={str(corpus)!r}, seq_len=8, batch_size=2, cache_dir={str(tmp_path)!r})\n"
        "dm.setup('fit')\n"
        "for i, batch in zip(range(2), dm.train_dataloader()): pass\n"
        "print(batch['input_ids'].shape[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "8"
    assert "Exception ignored" not in out.stderr, out.stderr


def test_training_from_plain_files_gives_the_tokenizer_training_from_lines_gives(corpus, tmp_path):
    from lego_lightning.data.tokenizer import build_tokenizer

    dm = TextDataModule(path=str(corpus), tokenizer="bpe", max_vocab_size=300, cache_dir=str(tmp_path / "lf"))
    assert dm.corpus.plain_files("train") == (corpus / "train.txt",)  # tokenizers reads the file itself
    from_lines = build_tokenizer("bpe", 300, dm.corpus.lines("train"))
    assert dm.text_tokenizer.fingerprint() == from_lines.fingerprint()
    # The same text with Windows line breaks, and without a last one: read line by line, the same tokenizer.
    for name, text in (("crlf", "\r\n"), ("no_final_break", None)):
        folder = tmp_path / name
        folder.mkdir()
        raw = (corpus / "train.txt").read_text(encoding="utf-8")
        (folder / "train.txt").write_bytes((raw.replace("\n", text) if text else raw.rstrip("\n")).encode("utf-8"))
        (folder / "valid.txt").write_bytes((corpus / "valid.txt").read_bytes())
        other = TextDataModule(path=str(folder), tokenizer="bpe", max_vocab_size=300, cache_dir=str(tmp_path / name))
        assert other.corpus.plain_files("train") is None
        assert other.text_tokenizer.fingerprint() == from_lines.fingerprint(), name
