"""Tokenizers of the text data: ours for words and characters, Hugging Face ``tokenizers`` for the rest.

Every tokenizer turns a batch of lines into token ids and, for each token, the number of UTF-8
bytes of text it stands for, so that the bytes of a line's tokens add up to the line's bytes
plus its line break. That is what bits per byte divides by.

* ``word`` and ``char``: :class:`~lego_lightning.data.vocab.Vocabulary`, built from the
  training split as before (the same ids, so committed results stay reproducible); every line
  ends in ``<eos>``, which stands for the line's trailing whitespace and its line break.
* ``byte``, ``bpe`` and ``unigram``: a Hugging Face ``tokenizers.Tokenizer`` (``byte`` is the
  256 byte values, ``bpe`` a byte-level BPE, so no text is ever ``<unk>``, ``unigram`` a
  SentencePiece-style unigram model), trained on the training split for ``bpe`` and
  ``unigram``. A line is encoded with its line break, so the tokens cover the text exactly.
* a path to a ``tokenizer.json`` or to a folder holding one: a ready tokenizer, e.g. the one a
  pretrained model ships.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lego_lightning.data.vocab import LEVELS, UNK, Vocabulary, split_line

TRAINED_KINDS = ("bpe", "unigram")
KINDS = (*LEVELS, "byte", *TRAINED_KINDS)
# The special tokens of the tokenizers we build: a document separator, and unigram's unknown piece.
END_OF_TEXT = "<|endoftext|>"
UNKNOWN = "<unk>"
SPECIAL_TOKENS = (END_OF_TEXT, UNKNOWN)


def tokenizer_file(path: str | Path) -> Path:
    """The ``tokenizer.json`` that ``path`` names (the file, or a folder holding one)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(
            f"TextDataModule.tokenizer={str(path)!r} is neither one of {KINDS} nor a tokenizer.json or a folder "
            f"holding one ({p} does not exist)"
        )
    return p


class TextTokenizer:
    """What the data module needs of a tokenizer; see the module docstring for the kinds."""

    kind: str

    def __len__(self) -> int:
        raise NotImplementedError

    def encode_lines(self, lines: Sequence[str]) -> tuple[list[int], list[int]]:
        """Token ids of ``lines`` (without their line breaks) in order, and the bytes each token stands for."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (``weights_only=True`` checkpoints); :func:`tokenizer_from_state` rebuilds it."""
        raise NotImplementedError

    def save(self, folder: Path) -> Path:
        """Write the tokenizer into ``folder`` (beside the logs); returns the file."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Text that changes whenever the ids change: a key of the tokenized data's cache."""
        return json.dumps(self.state_dict(), sort_keys=True)

    def check_matches(self, other: TextTokenizer, where: str) -> None:
        """Raise a clear error when ``other`` (e.g. a checkpoint's tokenizer) gives other ids than this one."""
        if other.fingerprint() != self.fingerprint():
            raise ValueError(
                f"{where}: its tokenizer ({other.kind}, {len(other)} tokens) differs from the data's ({self.kind}, "
                f"{len(self)} tokens). Use the data and tokenizer the checkpoint was trained on."
            )


class VocabularyTokenizer(TextTokenizer):
    """Whitespace words or characters, with ``<eos>`` ending every line."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.kind = vocab.level

    def __len__(self) -> int:
        return len(self.vocab)

    def encode_lines(self, lines: Sequence[str]) -> tuple[list[int], list[int]]:
        index, unk = self.vocab.index, self.vocab.index[UNK]
        ids: list[int] = []
        nbytes: list[int] = []
        for line in lines:
            tokens = split_line(line, self.vocab.level)  # the last is <eos>
            ids.extend(index.get(tok, unk) for tok in tokens)
            sizes = [len(tok.encode("utf-8")) for tok in tokens[:-1]]
            nbytes.extend(sizes)
            # <eos> stands for what the tokens leave out: whitespace between words, the line break.
            nbytes.append(len(line.rstrip("\n").encode("utf-8")) + 1 - sum(sizes))
        return ids, nbytes

    def decode(self, ids: Iterable[int]) -> str:
        return self.vocab.decode(ids)

    def state_dict(self) -> dict[str, Any]:
        return self.vocab.state_dict()

    def save(self, folder: Path) -> Path:
        file = Path(folder) / "vocab.json"
        file.write_text(json.dumps(self.state_dict(), ensure_ascii=False), encoding="utf-8")
        return file

    def check_matches(self, other: TextTokenizer, where: str) -> None:
        if isinstance(other, VocabularyTokenizer):
            self.vocab.check_matches(other.vocab, where)  # names the first token that differs
        else:
            super().check_matches(other, where)


class HFTokenizer(TextTokenizer):
    """A Hugging Face ``tokenizers.Tokenizer``; each line is encoded with its line break."""

    def __init__(self, tokenizer: Any, kind: str) -> None:
        self.tokenizer = tokenizer
        self.kind = kind

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_lines(self, lines: Sequence[str]) -> tuple[list[int], list[int]]:
        texts = [with_line_break(line) for line in lines]
        ids: list[int] = []
        nbytes: list[int] = []
        # encode_batch runs over every core; add_special_tokens=False: no BOS/EOS inside the stream.
        for text, encoding in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids.extend(encoding.ids)
            nbytes.extend(_bytes_per_token(text, encoding.offsets))
        return ids, nbytes

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_json": self.tokenizer.to_str()}

    def save(self, folder: Path) -> Path:
        file = Path(folder) / "tokenizer.json"
        self.tokenizer.save(str(file))
        return file


def with_line_break(line: str) -> str:
    """The line as the Hugging Face tokenizers see it, in training and in encoding: with its line break."""
    return line.rstrip("\n") + "\n"


def _bytes_per_token(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes of ``text`` each token stands for; they add up to the bytes of ``text``.

    A token counts the characters of its offsets not counted before (byte-level tokens of one
    multi-byte character share its offsets: the first counts it); what no token covers (e.g.
    whitespace a pre-tokenizer drops) goes to the line's last token.
    """
    sizes, counted = [], 0
    for start, end in offsets:
        start = max(start, counted)
        sizes.append(len(text[start:end].encode("utf-8")) if end > start else 0)
        counted = max(counted, end)
    if sizes:
        sizes[-1] += len(text.encode("utf-8")) - sum(sizes)
    return sizes


def _gpt2_byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the symbol that stands for each byte (printable bytes for themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, unprintable = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + unprintable)] = b
            unprintable += 1
    return symbols


_BYTE_OF_SYMBOL = _gpt2_byte_symbols()


def build_tokenizer(kind: str, vocab_size: int | None, train_lines: Iterable[str]) -> TextTokenizer:
    """A tokenizer of ``kind`` (one of :data:`KINDS`), trained on ``train_lines`` where it needs training."""
    if kind in LEVELS:
        return VocabularyTokenizer(Vocabulary.build(train_lines, kind, vocab_size))  # type: ignore[arg-type]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token=UNKNOWN, show_progress=False
        )
    else:
        # byte: the 256 byte values (id = the byte's value), nothing merged; bpe: merges trained on them.
        model = models.BPE(vocab=_BYTE_OF_SYMBOL, merges=[]) if kind == "byte" else models.BPE()
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        if kind == "byte":
            tokenizer.add_special_tokens([END_OF_TEXT])
            return HFTokenizer(tokenizer, kind)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=sorted(_BYTE_OF_SYMBOL),
            show_progress=False,
        )
    try:
        tokenizer.train_from_iterator((with_line_break(line) for line in train_lines), trainer)
    except Exception as err:  # tokenizers raises a bare Exception, e.g. for a size below the corpus's characters
        raise ValueError(
            f"TextDataModule.max_vocab_size={vocab_size}: training the {kind} tokenizer failed: {err}"
        ) from None
    # Its text form, read back: a trained model's scores print with more digits than a reloaded
    # one's, and the fingerprint (cache keys, checkpoint checks) must not change on reload.
    return HFTokenizer(Tokenizer.from_str(tokenizer.to_str()), kind)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """A ready tokenizer from a ``tokenizer.json`` or a folder holding one."""
    from tokenizers import Tokenizer

    file = tokenizer_file(path)
    try:
        return HFTokenizer(Tokenizer.from_file(str(file)), "file")
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot read
        raise ValueError(f"TextDataModule.tokenizer={str(path)!r}: {file} is not a tokenizer.json ({err})") from None


def tokenizer_from_state(state: dict[str, Any]) -> TextTokenizer:
    """The tokenizer a checkpoint saved (:meth:`TextTokenizer.state_dict`)."""
    if "tokenizer_json" in state:
        from tokenizers import Tokenizer

        return HFTokenizer(Tokenizer.from_str(state["tokenizer_json"]), state["kind"])
    return VocabularyTokenizer(Vocabulary.from_state_dict(state))


__all__ = [
    "KINDS",
    "HFTokenizer",
    "TextTokenizer",
    "VocabularyTokenizer",
    "build_tokenizer",
    "load_tokenizer",
    "tokenizer_from_state",
]
