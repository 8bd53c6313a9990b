"""A request in a slot: what the engine keeps of it while it decodes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lego_lightning.decoding.auto import AutoDraft
from lego_lightning.decoding.request import AUTO, Completion, Request
from lego_lightning.decoding.sampling import Sampling, generator_for


@dataclass
class Decoding:
    """A request in a slot: where it stands, its random stream and what it has made so far."""

    id: int
    request: Request
    slot: int
    generator: torch.Generator | None
    # Columns of the slot whose keys and values are valid; the request's last token sits at this column,
    # not yet through any layer.
    length: int = 0
    tokens: list[int] = field(default_factory=list)
    exit_positions: list[int] = field(default_factory=list)
    drafts: int = 0
    accepted: int = 0
    refusals: int = 0
    verifications: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # This round's draft exit (None: no drafts) and K: the request's own, or what ``auto`` chose.
    draft_exit: int | None = None
    num_speculations: int = 0
    auto: AutoDraft | None = None

    @classmethod
    def start(cls, id: int, request: Request, slot: int, device: torch.device) -> Decoding:
        """A request entering ``slot``; an ``auto`` one gets its :class:`AutoDraft` from the engine."""
        sampled = not request.sampling.greedy
        row = cls(id, request, slot, generator_for(request.seed, device) if sampled else None)
        if request.draft_exit != AUTO and request.num_speculations != AUTO and request.draft_exit is not None:
            row.draft_exit, row.num_speculations = request.draft_exit, request.num_speculations
        return row

    @property
    def sampling(self) -> Sampling:
        return self.request.sampling

    @property
    def remaining(self) -> int:
        return self.request.max_new_tokens - len(self.tokens)

    def draft_cap(self) -> int:
        """Drafts this round may make: at most K, and fewer than the tokens left (the round adds one of its own)."""
        if self.draft_exit is None:
            return 0
        return max(0, min(self.num_speculations, self.remaining - 1))

    def take(self, tokens: list[int], exit_position: int) -> list[int]:
        """Keep ``tokens`` up to the end token or the token limit; the tokens kept."""
        eos = self.request.eos_token_id
        kept = []
        for token in tokens[: self.remaining]:
            kept.append(token)
            if token == eos:
                self.finish_reason = "eos"
                break
        self.tokens += kept
        self.exit_positions += [exit_position] * len(kept)
        if self.finish_reason is None and self.remaining == 0:
            self.finish_reason = "length"
        return kept

    def completion(self) -> Completion:
        return Completion(
            self.id, len(self.request.prompt), self.tokens, self.exit_positions, self.finish_reason or "cancelled",
            self.drafts, self.accepted, self.refusals, self.verifications, time.perf_counter() - self.started,
            list(self.auto.choices) if self.auto is not None else [],
        )  # fmt: skip
