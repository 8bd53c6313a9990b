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
from collections.abc import Iterable, Iterator, Sequence
from functools import cached_property
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

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

    def encode_lines(self, lines: Sequence[str]) -> tuple[Sequence[int], Sequence[int]]:
        """Token ids of ``lines`` (without their line breaks) in order, and the bytes each token stands for
        (lists or integer arrays)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of ``text`` to continue: as in a line of the corpus, without what ends the line."""
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

    def encode_prompt(self, text: str) -> list[int]:
        index, unk = self.vocab.index, self.vocab.index[UNK]
        return [index.get(tok, unk) for tok in split_line(text, self.vocab.level)[:-1]]  # no <eos>: the line goes on

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
    """A Hugging Face ``tokenizers.Tokenizer``; each line is encoded with its line break.

    The bytes each token stands for come from its offsets in the line (:func:`_bytes_per_token`).
    A byte-level BPE's or a unigram's tokens say their bytes themselves, so for those (ours, and
    ready ones built the same way) lines are encoded without offsets, which is what makes
    ``tokenizers`` fast, and the bytes are read from a table of every token's
    (:func:`token_byte_table`); a line where the table cannot be trusted (an unknown piece, a
    space the pre-tokenizer added, a character split over three tokens) is encoded again with
    offsets. Both ways give the same numbers.
    """

    def __init__(self, tokenizer: Any, kind: str) -> None:
        self.tokenizer = tokenizer
        self.kind = kind

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_lines(self, lines: Sequence[str]) -> tuple[Sequence[int], Sequence[int]]:
        texts = [with_line_break(line) for line in lines]
        table = self.byte_table
        if table is None:
            return self._encode_with_offsets(texts)
        # encode_batch_fast runs over every core and tracks no offsets; add_special_tokens=False: no BOS/EOS.
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encodings), np.int64, len(texts))
        ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), np.int64, int(counts.sum()))
        length, carry = table[0, ids], table[1, ids]
        # A token that finishes a character another token started hands its bytes back to that token (as the
        # offsets do: the first token covering a character counts it). A line ends in a line break, which
        # finishes every character, so nothing is handed across lines.
        nbytes = length - carry
        nbytes[:-1] += carry[1:]
        passed_on = np.zeros(len(ids), dtype=bool)  # a token of continuation bytes alone, then one more: redo
        passed_on[:-1] = (carry[:-1] == length[:-1]) & (carry[1:] > 0)
        line = np.repeat(np.arange(len(texts)), counts)
        unsure = np.bincount(line, weights=(length < 0) | passed_on, minlength=len(texts))
        line_bytes = np.fromiter((len(t.encode("utf-8")) for t in texts), np.int64, len(texts))
        redo = np.flatnonzero((unsure > 0) | (np.bincount(line, weights=nbytes, minlength=len(texts)) != line_bytes))
        if redo.size == 0:
            return ids, nbytes
        # The lines between two redone ones stay as they are: one slice each, not one array per line.
        ends = np.cumsum(counts)
        ids_parts, bytes_parts, done = [], [], 0
        exact = self.tokenizer.encode_batch([texts[i] for i in redo], add_special_tokens=False)
        for i, encoding in zip(redo, exact):
            start = ends[i] - counts[i]
            ids_parts += [ids[done:start], np.asarray(encoding.ids, np.int64)]
            bytes_parts += [nbytes[done:start], np.asarray(_bytes_per_token(texts[i], encoding.offsets), np.int64)]
            done = ends[i]
        return np.concatenate([*ids_parts, ids[done:]]), np.concatenate([*bytes_parts, nbytes[done:]])

    def _encode_with_offsets(self, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """Every token's bytes from its offsets in its line: right for any tokenizer, and slower."""
        ids: list[int] = []
        nbytes: list[int] = []
        for text, encoding in zip(texts, self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            ids.extend(encoding.ids)
            nbytes.extend(_bytes_per_token(text, encoding.offsets))
        return ids, nbytes

    @cached_property
    def byte_table(self) -> np.ndarray | None:
        """:func:`token_byte_table` of this tokenizer (``None``: every line is encoded with offsets)."""
        return token_byte_table(self.tokenizer)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # no line break: the line goes on

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_json": self.tokenizer.to_str()}

    def save(self, folder: Path) -> Path:
        file = Path(folder) / "tokenizer.json"
        self.tokenizer.save(str(file))
        return file


def batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    """``lines`` in lists of ``size`` (the last one shorter)."""
    iterator = iter(lines)
    while batch := list(islice(iterator, size)):
        yield batch


def with_line_break(line: str) -> str:
    """The line as the Hugging Face tokenizers see it, in training and in encoding: with its line break."""
    return line.rstrip("\n") + "\n"


def token_byte_table(tokenizer: Any) -> np.ndarray | None:
    """``(2, vocabulary)``: each token id's bytes of text, and how many of them at its start are UTF-8
    continuation bytes (a byte-level token that starts inside a character), for a byte-level BPE or a
    Metaspace unigram without a normaliser; ``None`` for any other tokenizer. -1 bytes: an unknown piece."""
    spec = json.loads(tokenizer.to_str())
    pre, post = spec.get("pre_tokenizer") or {}, spec.get("post_processor") or {}
    if spec.get("normalizer") is not None or post.get("type") not in (None, "ByteLevel") or post.get("trim_offsets"):
        return None
    byte_level = pre.get("type") == "ByteLevel" and spec["model"]["type"] == "BPE"
    metaspace = pre.get("type") == "Metaspace" and spec["model"]["type"] == "Unigram"
    if not (byte_level or metaspace):
        return None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    table = np.stack([np.full(size, -1, np.int64), np.zeros(size, np.int64)])
    added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    unknown = spec["model"].get("unk_id") if metaspace else None
    for token, i in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in added:
            table[0, i] = len(token.encode("utf-8"))  # matched in the text as it is
        elif metaspace:
            table[0, i] = -1 if i == unknown else len(token.replace(pre["replacement"], " ").encode("utf-8"))
        elif all(c in _BYTE_OF_SYMBOL for c in token):
            table[0, i] = len(token)  # one symbol a byte
            values = [_BYTE_OF_SYMBOL[c] for c in token]
            table[1, i] = next((n for n, b in enumerate(values) if not 0x80 <= b < 0xC0), len(values))
    return table


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


def untrained_tokenizer(kind: str, vocab_size: int | None) -> tuple[Any, Any]:
    """A Hugging Face tokenizer of ``kind`` (``byte``, ``bpe``, ``unigram``) and the trainer that trains it
    (``None`` for ``byte``, which needs no training): the one place their settings are written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "unigram":
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token=UNKNOWN, show_progress=False
        )
        return tokenizer, trainer
    # byte: the 256 byte values (id = the byte's value), nothing merged; bpe: merges trained on them.
    model = models.BPE(vocab=_BYTE_OF_SYMBOL, merges=[]) if kind == "byte" else models.BPE()
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if kind == "byte":
        tokenizer.add_special_tokens([END_OF_TEXT])
        return tokenizer, None
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=sorted(_BYTE_OF_SYMBOL),
        show_progress=False,
    )
    return tokenizer, trainer


def build_tokenizer(
    kind: str, vocab_size: int | None, train_lines: Iterable[str], train_files: Sequence[Path] | None = None
) -> TextTokenizer:
    """A tokenizer of ``kind`` (one of :data:`KINDS`), trained on ``train_lines`` where it needs training.

    ``train_files``, when given, hold exactly those lines, each with its line break (plain text files,
    :meth:`~lego_lightning.data.corpus.Corpus.plain_files`): ``tokenizers`` then reads them itself, the
    same training without passing every line through Python.
    """
    if kind in LEVELS:
        return VocabularyTokenizer(Vocabulary.build(train_lines, kind, vocab_size))  # type: ignore[arg-type]
    from tokenizers import Tokenizer

    tokenizer, trainer = untrained_tokenizer(kind, vocab_size)
    if trainer is None:
        return HFTokenizer(tokenizer, kind)
    try:
        if train_files:
            tokenizer.train([str(f) for f in train_files], trainer)
        else:  # lists of lines cross into Rust a thousand at a time (the same BPE as one at a time, and faster)
            tokenizer.train_from_iterator(batches((with_line_break(line) for line in train_lines), 1000), trainer)
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
