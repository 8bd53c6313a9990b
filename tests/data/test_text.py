import os
from pathlib import Path

import pytest
import torch

from lego_lightning.data import TextDataModule, Vocabulary
from lego_lightning.data.vocab import EOS, UNK
from tests.conftest import write_corpus


def test_word_level_vocab_blocks_and_targets(corpus: Path):
    dm = TextDataModule(path=str(corpus), seq_len=8, batch_size=4, max_train_samples=10)
    lines = (corpus / "train.txt").read_text().splitlines()
    words = {w for line in lines for w in line.split()}
    assert dm.vocab.tokens[:2] == [UNK, EOS]
    assert set(dm.vocab.tokens[2:]) == words
    dm.setup("fit")
    train = dm.splits["train"]
    assert len(train) == 10 and train.input_ids.shape == (10, 8)
    # Targets are the inputs shifted by one, across block boundaries too (contiguous blocks).
    stream = torch.tensor([i for line in lines for i in dm.vocab.encode(line)])
    assert torch.equal(train.input_ids.flatten(), stream[:80])
    assert torch.equal(train.targets.flatten(), stream[1:81])
    assert dm.vocab.decode(train.input_ids[0].tolist()).split()[:3] == lines[0].split()[:3]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 8) and batch["index"].shape == (4,)


def test_char_level_uses_characters_and_eos_per_line(tmp_path: Path):
    (tmp_path / "train.txt").write_text("ab a\nba\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("ab\n", encoding="utf-8")
    dm = TextDataModule(path=str(tmp_path), level="char", seq_len=2, batch_size=1)
    assert dm.vocab.tokens == [UNK, EOS, "a", "b", " "]  # a: 3, b: 2, space: 1
    dm.setup("fit")
    assert dm.vocab.decode(dm.splits["train"].input_ids.flatten().tolist()) == "ab a<eos>b"


def test_max_vocab_size_maps_rare_tokens_to_unk(tmp_path: Path):
    (tmp_path / "train.txt").write_text("x x x y y z\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("z y x\n", encoding="utf-8")
    dm = TextDataModule(path=str(tmp_path), seq_len=2, max_vocab_size=4)
    assert dm.vocab.tokens == [UNK, EOS, "x", "y"]
    assert dm.vocab.encode("z y") == [0, 3, 1]


def test_wiki_tokens_file_names_and_optional_test_split(tmp_path: Path):
    write_corpus(tmp_path)
    for split in ("train", "valid"):
        (tmp_path / f"{split}.txt").rename(tmp_path / f"wiki.{split}.tokens")
    (tmp_path / "wiki.test.tokens").write_text("the river city\n" * 20, encoding="utf-8")
    dm = TextDataModule(path=str(tmp_path), seq_len=4)
    dm.setup("test")
    assert set(dm.splits) == {"train", "validation", "test"}
    assert len(next(iter(dm.test_dataloader()))["input_ids"]) > 0


def test_second_run_reads_the_tokenized_cache(corpus: Path, tmp_path: Path):
    first = TextDataModule(path=str(corpus), seq_len=8, cache_dir=str(tmp_path))
    first.prepare_data()
    files = sorted(tmp_path.glob("*.ids")) + sorted(tmp_path.glob("*.tokenizer.json"))
    assert len(files) == 3, "the tokenizer and both splits' token arrays were not written to the cache"
    stamps = {f: f.stat().st_mtime_ns for f in files}
    second = TextDataModule(path=str(corpus), seq_len=8, cache_dir=str(tmp_path))
    second.setup("fit")
    assert sorted(tmp_path.glob("*.ids")) + sorted(tmp_path.glob("*.tokenizer.json")) == files
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    first.setup("fit")
    assert torch.equal(first.splits["train"].input_ids, second.splits["train"].input_ids)


def test_hub_code_path_through_a_local_dataset_folder(tmp_path: Path):
    import datasets

    rows = {"train": ["the city river", " ", "a song of war"] * 10, "validation": ["the war song"] * 5}
    folder = tmp_path / "hub_like"
    folder.mkdir()
    for split, lines in rows.items():
        datasets.Dataset.from_dict({"text": lines}).to_parquet(str(folder / f"{split}.parquet"))
    dm = TextDataModule(path=None, dataset_name=str(folder), dataset_config=None, seq_len=4)
    assert "river" in dm.vocab.tokens
    dm.setup("fit")
    assert dm.vocab.decode(dm.splits["train"].input_ids[0].tolist()) == "the city river <eos>"


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, r"TextDataModule.path='.*missing' does not exist"),
        (
            lambda p: (p.mkdir(), (p / "train.txt").write_text("a b\n")),
            r"has no validation split: expected one of \['valid.txt'",
        ),
        (lambda p: (p.mkdir(), (p / "valid.txt").write_text("a b\n")), r"has no train split"),
    ],
)
def test_bad_paths_fail_at_construction(tmp_path: Path, setup, message):
    path = tmp_path / "missing"
    setup(path)
    with pytest.raises(ValueError, match=message):
        TextDataModule(path=str(path))


def test_empty_and_non_utf8_corpora_fail_at_construction(tmp_path: Path):
    empty = write_corpus(tmp_path / "empty")
    (empty / "train.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.txt is empty: the corpus must hold some text"):
        TextDataModule(path=str(empty))
    latin = write_corpus(tmp_path / "latin1")
    (latin / "valid.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"valid.txt is not UTF-8 text: byte 3 is b'\\xe9'"):
        TextDataModule(path=str(latin))


def test_corpus_shorter_than_one_block_is_a_clear_error(tmp_path: Path):
    (tmp_path / "train.txt").write_text("a b\n", encoding="utf-8")
    (tmp_path / "valid.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"holds no block of seq_len=32"):
        TextDataModule(path=str(tmp_path)).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": "byte"}, r"TextDataModule.level='byte' is not one of \('word', 'char'\)"),
        ({"seq_len": 0}, r"TextDataModule.seq_len must be a positive integer, got 0"),
        ({"max_train_samples": 0}, r"max_train_samples must be a positive integer or None, got 0"),
        ({"tokenize_processes": 0}, r"tokenize_processes must be a positive integer or None, got 0"),
        ({"max_vocab_size": 2}, r"max_vocab_size=2 is too small for tokenizer .word.: allowed an integer >= 3"),
    ],
)
def test_bad_arguments(corpus: Path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(path=str(corpus), **kwargs)


def test_checkpoint_with_another_vocabulary_is_rejected(corpus: Path):
    dm = TextDataModule(path=str(corpus))
    state = dm.state_dict()
    dm.load_state_dict(state)  # the same vocabulary loads
    other = Vocabulary([UNK, EOS, "zebra", *dm.vocab.tokens[2:]], "word")
    with pytest.raises(
        ValueError,
        match=r"vocabulary has \d+ tokens but the data gives \d+; first difference at index 2: 'zebra'",
    ):
        dm.load_state_dict({"vocab": other.state_dict()})


def test_state_dict_is_plain_python(corpus: Path, tmp_path: Path):
    state = TextDataModule(path=str(corpus)).state_dict()
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == state


def test_offline_environment_is_set():
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_calibration_blocks_are_held_out_of_training(corpus: Path):
    dm = TextDataModule(path=str(corpus), seq_len=8, max_train_samples=20, calibration_samples=6)
    dm.setup("fit")
    train, held = dm.splits["train"], dm.splits["calibration"]
    assert (len(train), len(held)) == (20, 6)
    full = TextDataModule(path=str(corpus), seq_len=8)
    full.setup("fit")
    assert torch.equal(held.input_ids, full.splits["train"].input_ids[20:26])  # right after the training blocks
    assert torch.equal(next(iter(dm.calibration_dataloader()))["input_ids"], held.input_ids[: dm.batch_size])
    with pytest.raises(ValueError, match=r"calibration_samples=1000 leaves no training block"):
        TextDataModule(path=str(corpus), seq_len=8, calibration_samples=1000).setup("fit")


def test_shuffle_depends_only_on_seed_and_epoch(corpus: Path):
    dm = TextDataModule(path=str(corpus), seq_len=8, batch_size=4, seed=3)
    dm.setup("fit")

    def order(epoch):
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["index"].tolist()]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(len(dm.splits["train"])))
