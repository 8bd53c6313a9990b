"""A request to the decoding engine (a prompt and its own settings) and what comes back: events and completion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lego_lightning.decoding.sampling import Sampling
from lego_lightning.model.routing import check_threshold
from lego_lightning.model.transformer import ExitTransformer

FINISH_REASONS = ("eos", "length", "cancelled")
AUTO = "auto"  # draft_exit or num_speculations chosen every round (lego_lightning.decoding.auto)


@dataclass(frozen=True)
class Request:
    """A prompt (token ids) and how to continue it.

    Args:
        prompt: the prompt's token ids, at least one.
        max_new_tokens: tokens to generate at most; the request ends there or at ``eos_token_id``.
        temperature: 0 decodes greedily; above, tokens are sampled (:class:`Sampling`).
        top_k: sample among the ``top_k`` most likely tokens.
        top_p: sample among the most likely tokens whose probability reaches ``top_p``.
        seed: the request's own random stream (``None``: drawn from torch's global generator).
        eos_token_id: the request ends at this token, which is kept.
        draft_exit: decode self-speculatively, drafting at this exit (``None``: full depth; ``"auto"``:
            the exit, or none, chosen every round, :mod:`~lego_lightning.decoding.auto`).
        num_speculations: the most tokens a round drafts (``"auto"``: chosen every round, up to the
            engine's ``max_speculations``).
        draft_threshold: stop a round's draft where the draft exit's confidence falls below it.
    """

    prompt: Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | None = None
    draft_exit: int | str | None = None
    num_speculations: int | str = 4
    draft_threshold: float | None = None

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)

    def check(self, model: ExitTransformer, routed: bool, max_speculations: int) -> None:
        """Errors that name the field, the value and what is allowed, before anything of it runs."""
        cfg = model.config
        if len(self.prompt) == 0:
            raise ValueError("prompt has no tokens: a request needs at least one")
        bad = [t for t in self.prompt if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt has token ids {bad[:5]} outside the vocabulary 0..{cfg.vocab_size - 1}")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: allowed a positive integer")
        if len(self.prompt) + self.max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompt ({len(self.prompt)}) + max_new_tokens ({self.max_new_tokens}) exceeds "
                f"max_seq_len={cfg.max_seq_len}"
            )
        self.sampling  # noqa: B018  (checks temperature, top_k and top_p)
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed={self.seed!r}: allowed an integer or None")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < cfg.vocab_size:
            raise ValueError(f"eos_token_id={self.eos_token_id}: allowed a token id 0..{cfg.vocab_size - 1} or None")
        if self.draft_exit is None and self.num_speculations == AUTO:
            raise ValueError(
                "num_speculations='auto' chooses how many tokens a draft exit drafts: it needs a draft_exit"
            )
        if self.draft_exit is not None:
            check_draft(model, self.draft_exit, self.num_speculations)
            if self.num_speculations == AUTO and max_speculations < 1:
                raise ValueError(
                    f"num_speculations='auto' chooses K up to this engine's max_speculations={max_speculations}: "
                    "allowed 1 or more"
                )
            if routed:
                raise ValueError(
                    f"draft_exit={self.draft_exit} on an engine that routes (threshold set): routing and "
                    "self-speculative decoding are two ways to decode; give one"
                )
            if self.num_speculations != AUTO and self.num_speculations > max_speculations:
                raise ValueError(
                    f"num_speculations={self.num_speculations}: this engine's cache leaves room for at most "
                    f"max_speculations={max_speculations}"
                )
        if self.draft_threshold is not None:
            if self.draft_exit is None:
                raise ValueError(
                    f"draft_threshold={self.draft_threshold} stops self-speculative drafts: it needs a draft_exit"
                )
            check_threshold(self.draft_threshold, "draft_threshold")


def check_draft(model: ExitTransformer, draft_exit: int | str, num_speculations: int | str) -> None:
    """Errors that name the setting, raised before any work (``"auto"`` is allowed for either)."""
    exits = model.exit_layers
    if draft_exit == AUTO:
        if len(exits) < 2:
            raise ValueError(
                f"draft_exit='auto' chooses among the exits before the last, and this model has one exit "
                f"(after layer {exits[0]}): nothing to draft from"
            )
    elif draft_exit not in exits[:-1]:
        raise ValueError(
            f"draft_exit={draft_exit!r} is not an exit before the last: this model's exits are after layers "
            f"{exits}, so allowed {exits[:-1] or 'none (it has one exit)'}"
        )
    if num_speculations == AUTO:
        return
    if not isinstance(num_speculations, int) or isinstance(num_speculations, bool) or num_speculations < 1:
        raise ValueError(
            f"num_speculations={num_speculations!r}: allowed a positive integer (the most tokens a round drafts) "
            "or 'auto'"
        )


@dataclass
class Completion:
    """What a request got: its new tokens and how they were made."""

    id: int
    prompt_tokens: int
    tokens: list[int]  # the generated tokens, the end token included
    exit_positions: list[int]  # the exit (index into the model's exits) each token came from
    finish_reason: str  # "eos", "length" or "cancelled"
    # Self-speculative decoding: tokens drafted, drafts the full model kept, rounds that refused a draft, rounds.
    drafts: int = 0
    accepted: int = 0
    refusals: int = 0
    verifications: int = 0
    seconds: float = 0.0  # from its prefill to its end
    # draft_exit or num_speculations "auto": the (exit or None, K) each round chose.
    choices: list[tuple[int | None, int]] = field(default_factory=list)


@dataclass
class Event:
    """What one engine step gave a request: the tokens it verified (in order), and its end."""

    id: int
    tokens: list[int]
    completion: Completion | None = None  # set when the request ended in this step

    @property
    def finished(self) -> bool:
        return self.completion is not None
