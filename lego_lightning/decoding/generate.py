"""``generate``: a batch of prompts decoded by the engine, as a tensor in and a tensor out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lego_lightning.decoding.engine import Engine
from lego_lightning.decoding.request import AUTO, Request, check_draft
from lego_lightning.decoding.sampling import Sampling
from lego_lightning.decoding.speed import WORK
from lego_lightning.model.confidence import ConfidenceMeasure, HiddenConfidence, confidence_measure
from lego_lightning.model.routing import check_threshold
from lego_lightning.model.transformer import ExitTransformer


@dataclass
class Generation:
    tokens: Tensor  # (B, P + N): the prompt (as given, padding included) and the generated tokens
    exit_position: Tensor  # (B, N): the exit each generated token came from; -1 once the sequence has ended
    # Self-speculative decoding only (None otherwise), per row: tokens drafted, drafts the full
    # model kept, rounds that refused a draft, and verifying passes (rounds).
    drafts: Tensor | None = None
    accepted: Tensor | None = None
    refusals: Tensor | None = None
    verifications: Tensor | None = None
    # Self-speculative decoding: rows through the layers up to a draft exit and through the draft heads,
    # positions through the layers above it and the final head, summed over the batch after the prompt
    # (what its FLOPs are counted from).
    work: dict[str, int] | None = None
    # draft_exit or num_speculations "auto": per row, the (exit or None for full depth, K) each round chose.
    choices: list[list[tuple[int | None, int]]] | None = None


@torch.no_grad()
def generate(
    model: ExitTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    threshold: float | None = None,
    confidence: str = "max_prob",
    hidden_confidence: HiddenConfidence | None = None,
    *,
    attention_mask: Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    draft_exit: int | str | None = None,
    num_speculations: int | str = 4,
    draft_threshold: float | None = None,
    slots: int | None = None,
    max_speculations: int = 8,
) -> Generation:
    """Decoding with a KV cache; each sequence picks its exit at every step by the routing rule,
    or, with ``draft_exit``, decodes self-speculatively.

    The prompt runs through every layer. A sequence whose confidence reaches ``threshold`` at
    an exit takes that exit's token; the layers it skips still get its key and value for this
    position, from the state carried up from its exit. ``threshold=None`` decodes at full depth
    and gives exactly the tokens of plain greedy decoding without a cache. ``confidence`` names
    the measure; ``"learned"`` reads each exit's hidden state through ``hidden_confidence``, a
    trained :class:`~lego_lightning.model.exit_classifier.ExitClassifier`, and a sequence that
    continues runs no head at that exit; one that leaves at an exit sharing the final exit's
    projection gets its logits in the step's one product with the final exit's rows.

    Prompts of different lengths are padded on the left with ``attention_mask`` marking the real
    tokens (as ``transformers`` does); tokens are greedy at ``temperature`` 0, else sampled
    (:class:`Sampling`) from each sequence's own generator (``seed``: an int gives row ``i``
    ``seed + i``, or one seed per row), so a sequence gets the same tokens alone or in a batch.
    A sequence that produces ``eos_token_id`` ends: later tokens are ``pad_token_id`` (default
    the end token), its exit position -1, and it computes nothing more.

    ``draft_exit=E`` decodes self-speculatively (:mod:`~lego_lightning.decoding.policies`): exit E
    drafts up to ``num_speculations`` tokens, stopping a row's draft where ``confidence`` falls
    below ``draft_threshold``, and the layers above verify them, so the tokens are the full
    model's (greedy: equal to ``threshold=None``; sampled: from the same distribution).
    ``draft_exit="auto"`` chooses the exit (or no drafts) every round, ``num_speculations="auto"``
    the K, up to ``max_speculations`` (:mod:`~lego_lightning.decoding.auto`).

    The rows are requests of an :class:`~lego_lightning.decoding.engine.Engine` with ``slots``
    cache slots (default: one per row); with fewer, a row that ends makes room for the next
    (continuous batching), and each row's tokens are the same.
    """
    check_decoding(
        model, max_new_tokens, threshold, draft_exit, num_speculations, draft_threshold, temperature, top_k, top_p,
        confidence, hidden_confidence, max_speculations,
    )  # fmt: skip
    B, P = prompt.shape
    kept = check_attention_mask(attention_mask, prompt)
    lengths = kept.sum(1).tolist()
    if max(lengths) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({max(lengths)}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    seeds = row_seeds(seed, B) if temperature > 0 else [None] * B
    engine = Engine(
        model, slots or B, threshold=threshold, confidence=confidence, hidden_confidence=hidden_confidence,
        max_speculations=speculation_room(draft_exit, num_speculations, max_speculations),
        max_context=max(lengths) + max_new_tokens,
    )  # fmt: skip
    settings = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        draft_exit=draft_exit, num_speculations=num_speculations, draft_threshold=draft_threshold,
    )  # fmt: skip
    ids = [
        engine.add(Request(prompt[row, P - lengths[row] :].tolist(), seed=seeds[row], **settings)) for row in range(B)
    ]
    done = engine.run()
    # After its end token a sequence holds pad_token_id, by default the end token itself.
    pad = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    new = torch.full((B, max_new_tokens), pad, dtype=prompt.dtype)
    exit_position = torch.full((B, max_new_tokens), -1, dtype=torch.long)
    for row, request_id in enumerate(ids):
        completion = done[request_id]
        n = len(completion.tokens)
        new[row, :n] = torch.tensor(completion.tokens, dtype=prompt.dtype)
        exit_position[row, :n] = torch.tensor(completion.exit_positions)
    out = Generation(torch.cat([prompt, new.to(prompt.device)], dim=1), exit_position.to(prompt.device))
    if draft_exit is not None:
        counts = {
            name: torch.tensor([getattr(done[i], name) for i in ids], device=prompt.device)
            for name in ("drafts", "accepted", "refusals", "verifications")
        }
        out.drafts, out.accepted, out.refusals, out.verifications = (
            counts[name] for name in ("drafts", "accepted", "refusals", "verifications")
        )
        out.work = {key: engine.work[key] for key in WORK}
        if AUTO in (draft_exit, num_speculations):
            out.choices = [done[i].choices for i in ids]
    return out


def speculation_room(draft_exit: int | str | None, num_speculations: int | str, max_speculations: int) -> int:
    """The drafts a round may make at most: none without a draft exit, the cap ``max_speculations`` for
    ``num_speculations="auto"``, else ``num_speculations``."""
    if draft_exit is None:
        return 0
    return max_speculations if num_speculations == AUTO else num_speculations


def check_decoding(
    model: ExitTransformer,
    max_new_tokens: int,
    threshold: float | None = None,
    draft_exit: int | str | None = None,
    num_speculations: int | str = 4,
    draft_threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    confidence: str = "max_prob",
    hidden_confidence: HiddenConfidence | None = None,
    max_speculations: int = 8,
) -> tuple[Sampling, ConfidenceMeasure]:
    """Every setting of :func:`generate` but the prompt's, checked before any work; the sampling and the
    confidence measure they give."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: allowed a positive integer")
    if threshold is not None:
        check_threshold(threshold, "threshold")
    if draft_exit is not None:
        if threshold is not None:
            raise ValueError(
                f"threshold={threshold} and draft_exit={draft_exit}: routing and self-speculative decoding are two "
                "ways to decode; give one (draft_threshold stops a draft early)"
            )
        check_draft(model, draft_exit, num_speculations)
        if num_speculations == AUTO and (
            not isinstance(max_speculations, int) or isinstance(max_speculations, bool) or max_speculations < 1
        ):
            raise ValueError(
                f"max_speculations={max_speculations!r}: num_speculations='auto' chooses K up to it; allowed a "
                "positive integer"
            )
    elif num_speculations == AUTO:
        raise ValueError("num_speculations='auto' chooses how many tokens a draft exit drafts: it needs a draft_exit")
    if draft_threshold is not None:
        if draft_exit is None:
            raise ValueError(f"draft_threshold={draft_threshold} stops self-speculative drafts: it needs a draft_exit")
        check_threshold(draft_threshold, "draft_threshold")
    if not model.config.causal:
        raise ValueError("generate() needs a causal model; this one attends both ways (the masked objective)")
    return Sampling(temperature, top_k, top_p), confidence_measure(confidence, hidden_confidence)


def check_attention_mask(attention_mask: Tensor | None, prompt: Tensor) -> Tensor:
    """The prompt's real tokens as a bool ``(B, P)``; padding must be on the left, each row with a real token."""
    if attention_mask is None:
        return torch.ones_like(prompt, dtype=torch.bool)
    if attention_mask.shape != prompt.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(prompt.shape)}")
    kept = attention_mask.bool()
    if not kept[:, -1].all() or (kept[:, 1:].long() < kept[:, :-1].long()).any():
        raise ValueError("attention_mask must pad prompts on the left: each row 0s, then 1s up to the last column")
    return kept


def row_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int | None]:
    """Each sequence's seed: ``seed + i`` for row ``i`` of an int, one seed per row, or none (drawn)."""
    if seed is None:
        return [None] * batch
    if isinstance(seed, int):
        return [seed + i for i in range(batch)]
    seeds = [int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"seed has {len(seeds)} values for {batch} sequences: give one per sequence or an int")
    return seeds
