"""A word- or character-level vocabulary built from the training split."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

UNK = "<unk>"
EOS = "<eos>"
SPECIALS = (UNK, EOS)

Level = Literal["word", "char"]
LEVELS = ("word", "char")


def split_line(line: str, level: Level) -> list[str]:
    """Tokens of one line, with ``<eos>`` at its end (the usual word-level recipe, also for empty lines)."""
    line = line.rstrip("\n")
    return [*(line.split() if level == "word" else line), EOS]


def encode_line(line: str, index: dict[str, int], level: Level) -> list[int]:
    """Ids of one line's tokens; tokens outside ``index`` become ``<unk>``."""
    unk = index[UNK]
    return [index.get(tok, unk) for tok in split_line(line, level)]


class Vocabulary:
    """Tokens sorted by training frequency (ties by text), after ``<unk>`` and ``<eos>``."""

    def __init__(self, tokens: Sequence[str], level: Level) -> None:
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {list(tokens[:2])}")
        if level not in LEVELS:
            raise ValueError(f"level={level!r} is not one of {LEVELS}")
        self.tokens = list(tokens)
        self.level = level
        self.index = {tok: i for i, tok in enumerate(self.tokens)}

    @classmethod
    def build(cls, lines: Iterable[str], level: Level, max_size: int | None = None) -> Vocabulary:
        counts: Counter[str] = Counter()
        for line in lines:
            counts.update(split_line(line, level))
        for special in SPECIALS:
            counts.pop(special, None)
        ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))
        if max_size is not None:
            ranked = ranked[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *ranked], level)

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, line: str) -> list[int]:
        return encode_line(line, self.index, self.level)

    def decode(self, ids: Iterable[int]) -> str:
        sep = " " if self.level == "word" else ""
        return sep.join(self.tokens[i] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        """Plain values only, so checkpoints load with ``weights_only=True``."""
        return {"tokens": list(self.tokens), "level": self.level}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Vocabulary:
        return cls(state["tokens"], state["level"])

    def check_matches(self, other: Vocabulary, where: str) -> None:
        """Raise a clear error when ``other`` (e.g. a checkpoint's vocabulary) differs from this one."""
        if other.level != self.level:
            raise ValueError(f"{where}: level={other.level!r} but the data asks for level={self.level!r}")
        if other.tokens == self.tokens:
            return
        first = next(
            (i for i, (a, b) in enumerate(zip(other.tokens, self.tokens)) if a != b),
            min(len(other), len(self)),
        )
        theirs = other.tokens[first] if first < len(other) else "<end>"
        ours = self.tokens[first] if first < len(self) else "<end>"
        raise ValueError(
            f"{where}: vocabulary has {len(other)} tokens but the data gives {len(self)}; first difference at "
            f"index {first}: {theirs!r} vs {ours!r}. Use the data (and max_vocab_size) the checkpoint was trained on."
        )
