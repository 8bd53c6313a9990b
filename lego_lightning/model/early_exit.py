"""Early exit that skips work: routed teacher-forced scoring and greedy generation with a KV cache.

A token that leaves at an exit does no further work. Deeper layers still need keys and values
at its position for the tokens that continue, so its hidden state is carried upward unchanged
and only its key/value projections run there (state propagation, as in CALM). Queries,
output projections and MLPs of deeper layers run only for the tokens that continue, and so
does attention unless most tokens continue (then the causal kernel over every position costs
less than a masked one over theirs).

With nobody leaving (threshold 1) this is the full model; with everybody leaving at the first
exit (threshold 0) it is that exit. In between, the continuing tokens attend to propagated keys
and values where the simulated routing of ``SupervisedExitLM`` evaluation used the deeper
layers' own, so perplexities can differ slightly; the benchmarks report the difference.

Plain PyTorch, inference only (``torch.no_grad``), the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lego_lightning.model.confidence import ConfidenceMeasure, get_confidence
from lego_lightning.model.routing import check_threshold
from lego_lightning.model.transformer import Block, ExitTransformer

# A confidence from a hidden state, for measures that need no logits: (exit_layer, (N, D)) -> (N,)
HiddenConfidence = Callable[[int, Tensor], Tensor]


def _measure(confidence: str, hidden_confidence: HiddenConfidence | None) -> ConfidenceMeasure:
    """The measure named ``confidence``; a learned one needs its classifier, named before any work."""
    measure = get_confidence(confidence)
    if measure.reads_hidden and hidden_confidence is None:
        raise ValueError(
            f"confidence={confidence!r} reads each exit's hidden state through a trained ExitClassifier: pass it "
            "as hidden_confidence (a module built with confidence='learned' holds it: module.exit_classifier)"
        )
    return measure


@dataclass
class _Packing:
    """Where the tokens that continue sit, computed once per stage (the set changes only at exits).

    Per-token work (the query projection, the output projection, the MLP) runs on the ``N``
    active tokens packed flat, with no padding. Attention needs each row's keys, so queries
    go back to a per-row layout: ``(B, M)`` slots (``M`` = most active tokens in a row, padded
    where rows differ) with an explicit mask, or, for a causal model where that would cost
    more than the full model's attention (``M > T / 2``), all ``T`` positions with the causal
    kernel, which skips the masked half.
    """

    token: Tensor  # (N,) each active token's index into the flattened (B * T) sequence
    query: Tensor  # (N,) its index into the flattened query layout: (B * M) slots or (B * T) positions
    slots: int  # M, or T in the full layout
    positions: Tensor | None  # (B, M) the position of each slot (padding points at 0); None in the full layout
    mask: Tensor | None  # (B, 1, M, T) keys each slot may attend to; None when every key is allowed

    @classmethod
    def of(cls, active: Tensor, causal: bool) -> _Packing:
        B, T = active.shape
        rows, cols = active.nonzero(as_tuple=True)  # row-major: each row's tokens in order
        token = rows * T + cols
        M = int(active.sum(dim=1).max())
        if causal and 2 * M > T:
            return cls(token, token, T, None, None)
        slots = (active.cumsum(dim=1) - 1)[rows, cols]
        positions = torch.zeros(B, M, dtype=torch.long, device=active.device)
        positions[rows, slots] = cols
        mask = None
        if causal:
            mask = (torch.arange(T, device=active.device).view(1, 1, T) <= positions.unsqueeze(-1)).unsqueeze(1)
        return cls(token, rows * M + slots, M, positions, mask)


def _block_for_active(model: ExitTransformer, block: Block, x: Tensor, pack: _Packing) -> Tensor:
    """One layer where only the packed active tokens run; the others only give keys and values."""
    B, T, D = x.shape
    attn = block.attn
    flat = x.reshape(B * T, D)
    h = block.ln1(x)
    # Every token's key and value, in one product with the fused projection's k/v rows.
    k, v = (attn.to_heads(t) for t in attn.project(h, "kv"))
    (q_act,) = attn.project(h.reshape(B * T, D).index_select(0, pack.token), "q")
    q = attn.to_heads(q_act.new_zeros(B * pack.slots, D).index_copy(0, pack.query, q_act).view(B, pack.slots, D))
    if model.rotary is not None:
        q, k = model.rotary(q, pack.positions), model.rotary(k)
    # The full layout (positions 0..T-1) takes the causal kernel; a packed one its mask.
    mask = {"is_causal": True} if pack.positions is None else {"attn_mask": pack.mask}
    y = attn.attend(q, k, v, **mask)
    y = attn.from_heads(y).reshape(B * pack.slots, D).index_select(0, pack.query)
    x_act = block.after_attention(flat.index_select(0, pack.token), attn.proj(y))
    return flat.index_copy(0, pack.token, x_act).view(B, T, D)


@dataclass
class RoutedScores:
    """Where each token left and what it scored there."""

    exit_position: Tensor  # (B, T) index into the model's exit_layers
    nll: Tensor | None  # (B, T) negative log-likelihood of the targets, when targets were given
    logits: Tensor | None  # (B, T, V) the logits of each token's exit, when no targets were given


@torch.no_grad()
def routed_forward(
    model: ExitTransformer,
    idx: Tensor,
    threshold: float,
    confidence: str = "max_prob",
    targets: Tensor | None = None,
    hidden_confidence: HiddenConfidence | None = None,
) -> RoutedScores:
    """Score ``idx`` ``(B, T)`` with every token leaving at its first exit whose confidence reaches ``threshold``.

    With ``hidden_confidence`` (a learned exit classifier) a token that continues runs no head
    at a non-final exit; otherwise ``confidence`` is computed from the exit's logits.
    """
    check_threshold(threshold, "threshold")
    cfg = model.config
    B, T = idx.shape
    dev = idx.device
    measure = _measure(confidence, hidden_confidence)
    x = model.embed(idx)
    # Per-token bookkeeping on the flattened (B * T) sequence: 1-D index_select/index_copy_ are
    # cheap where 2-D advanced indexing into (B, T, V) logits is not.
    active = torch.ones(B * T, dtype=torch.bool, device=dev)
    exit_position = torch.full((B * T,), len(cfg.stages) - 1, dtype=torch.long, device=dev)
    nll = torch.zeros(B * T, device=dev) if targets is not None else None
    logits_out: Tensor | None = None  # (B * T, V), every row written by the end

    def record(token: Tensor, logits: Tensor) -> None:
        nonlocal logits_out
        if nll is not None:
            target = targets.reshape(-1).index_select(0, token)
            nll.index_copy_(0, token, F.cross_entropy(logits.float(), target, reduction="none"))
        elif logits_out is None and len(token) == B * T:  # every token, in order: the head's output is the result
            logits_out = logits.to(torch.get_default_dtype())
        else:
            if logits_out is None:
                logits_out = torch.empty(B * T, cfg.vocab_size, device=dev)
            logits_out.index_copy_(0, token, logits.to(logits_out.dtype))

    for s, stage in enumerate(cfg.stages):
        first, last = stage.layers
        pack = None if bool(active.all()) else _Packing.of(active.view(B, T), cfg.causal)
        for block in model.blocks[first - 1 : last]:
            x = block(x, model.rotary) if pack is None else _block_for_active(model, block, x, pack)
        token = active.nonzero(as_tuple=True)[0]
        head = model.head(last)
        h = x.reshape(B * T, -1).index_select(0, token)
        if s == len(cfg.stages) - 1:
            record(token, head(h))
            break
        if threshold >= 1:  # nobody leaves before the last exit; no head, no confidence
            leave = torch.zeros_like(token, dtype=torch.bool)
        elif hidden_confidence is not None:
            leave = hidden_confidence(last, h) >= threshold
            record(token[leave], head(h[leave]))
        else:
            logits = head(h)
            leave = measure(logits) >= threshold
            if nll is None:
                # Every active token's logits, not only the leaving ones': at the first exit that is
                # no copy at all, where picking the leaving rows out copied them twice (at GPT-2
                # 124M's sizes a large share of routed scoring's time); the rows of tokens that
                # continue are overwritten later.
                record(token, logits)
            else:
                record(token[leave], logits[leave])
        exit_position[token[leave]] = s
        active[token[leave]] = False
        if not bool(active.any()):
            break
    return RoutedScores(
        exit_position.view(B, T),
        None if nll is None else nll.view(B, T),
        None if logits_out is None else logits_out.view(B, T, -1),
    )


# --------------------------------------------------------------------------------------- generation
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
    # Self-speculative decoding: tokens through the layers up to the draft exit and above it, and
    # head rows, summed over the batch after the prompt (what its FLOPs are counted from).
    work: dict[str, int] | None = None


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen from an exit's logits: greedy at ``temperature`` 0, else sampled.

    Sampling divides the logits by ``temperature``, keeps the ``top_k`` most likely tokens and
    the smallest set whose probability reaches ``top_p``, then draws from each sequence's own
    generator, so a sequence gets the same tokens alone or in any batch.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: Tensor, generators: list[torch.Generator]) -> Tensor:
        """One token per row of ``logits`` ``(n, V)``; row ``i`` draws from ``generators[i]``."""
        if self.greedy:
            return logits.argmax(-1)
        probs = self.probabilities(logits)
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generators)])

    def probabilities(self, logits: Tensor) -> Tensor:
        """The distribution a sampled token is drawn from, ``(..., V)`` in float32: temperature, top-k, top-p."""
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            outside = probs.cumsum(-1) - probs >= self.top_p  # the mass before it already reaches top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(outside, float("-inf")))
        return scores.softmax(-1)


def _attend_cached(
    model: ExitTransformer,
    block: Block,
    x: Tensor,
    cache: tuple[Tensor, Tensor],
    column: int,
    positions: Tensor,
    keys_kept: Tensor | None,
    rows: Tensor,
) -> Tensor:
    """One decoding step of one layer: every row writes its key/value; ``rows`` also attend and run the MLP.

        ``column`` is the cache slot of this step, ``positions`` ``(B, 1)`` each row's position (its
        own count of real tokens), ``keys_kept`` ``(B, S)`` which cached keys are not padding (``None``:
    all of them). Few
        operations per step matter as much as few FLOPs at decode time (each is a tiny matrix
        product): with every row active this is the plain layer, one fused q/k/v projection and no
        gathers; rows that left pay one fused k/v projection.
    """
    B = x.shape[0]
    attn = block.attn
    cache_k, cache_v = cache
    h = block.ln1(x)  # (B, 1, D)
    everyone = len(rows) == B
    if everyone:
        q, k, v = (attn.to_heads(t) for t in attn.project(h))
    else:
        k, v = (attn.to_heads(t) for t in attn.project(h, "kv"))
    if model.rotary is not None:
        k = model.rotary(k, positions)
    cache_k[:, :, column : column + 1] = k
    cache_v[:, :, column : column + 1] = v
    if len(rows) == 0:
        return x
    mask = None if keys_kept is None else keys_kept[:, None, None, : column + 1]  # (B, 1, 1, S)
    if everyone:
        if model.rotary is not None:
            q = model.rotary(q, positions)
        y = attn.attend(q, cache_k[:, :, : column + 1], cache_v[:, :, : column + 1], attn_mask=mask)
        return block.after_attention(x, attn.proj(attn.from_heads(y)))
    (q,) = attn.project(h[rows], "q")
    q = attn.to_heads(q)
    if model.rotary is not None:
        q = model.rotary(q, positions[rows])
    mask = None if mask is None else mask[rows]
    y = attn.attend(q, cache_k[rows, :, : column + 1], cache_v[rows, :, : column + 1], attn_mask=mask)
    x = x.clone()
    x[rows] = block.after_attention(x[rows], attn.proj(attn.from_heads(y)))
    return x


def _prefill(
    model: ExitTransformer, prompt: Tensor, kept: Tensor | None, caches: list[tuple[Tensor, Tensor]]
) -> dict[int, Tensor]:
    """All layers over the prompt, keys and values cached; hidden states at every exit, last position.

    ``kept`` ``(B, P)`` marks real tokens (``None``: no padding); padding (on the left) gets no
    attention from them, and each real token has the position it would have without the padding.
    """
    P = prompt.shape[1]
    positions, causal = None, {"is_causal": True}
    if kept is not None:
        positions = (kept.long().cumsum(1) - 1).clamp(min=0)
        below = torch.ones(P, P, dtype=torch.bool, device=prompt.device).tril()
        # A padding query attends to itself alone: its output is never read, and no row is all -inf.
        itself = torch.eye(P, dtype=torch.bool, device=prompt.device)
        causal = {"attn_mask": ((below & kept[:, None, :]) | itself).unsqueeze(1)}
    x = model.embed(prompt, positions=positions)
    at_exits = {}
    for i, block in enumerate(model.blocks, start=1):
        attn = block.attn
        q, k, v = (attn.to_heads(t) for t in attn.project(block.ln1(x)))
        if model.rotary is not None:
            q, k = model.rotary(q, positions), model.rotary(k, positions)
        caches[i - 1][0][:, :, :P] = k
        caches[i - 1][1][:, :, :P] = v
        y = attn.attend(q, k, v, **causal)
        x = block.after_attention(x, attn.proj(attn.from_heads(y)))
        if i in model.exit_layers:
            at_exits[i] = x[:, -1]
    return at_exits


def _check_attention_mask(attention_mask: Tensor | None, prompt: Tensor) -> Tensor:
    """The prompt's real tokens as a bool ``(B, P)``; padding must be on the left, each row with a real token."""
    if attention_mask is None:
        return torch.ones_like(prompt, dtype=torch.bool)
    if attention_mask.shape != prompt.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(prompt.shape)}")
    kept = attention_mask.bool()
    if not kept[:, -1].all() or (kept[:, 1:].long() < kept[:, :-1].long()).any():
        raise ValueError("attention_mask must pad prompts on the left: each row 0s, then 1s up to the last column")
    return kept


def _generators(seed: int | Sequence[int] | None, batch: int, device: torch.device) -> list[torch.Generator]:
    """Each sequence's own generator: ``seed + i`` for row ``i`` of an int, or one seed per row."""
    if seed is None:
        seeds = [int(torch.randint(0, 2**62, ()).item()) for _ in range(batch)]
    elif isinstance(seed, int):
        seeds = [seed + i for i in range(batch)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"seed has {len(seeds)} values for {batch} sequences: give one per sequence or an int")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


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
    draft_exit: int | None = None,
    num_speculations: int = 4,
    draft_threshold: float | None = None,
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
    the end token), its exit position -1, and it computes nothing but its keys and values.

    ``draft_exit=E`` decodes self-speculatively (:mod:`~lego_lightning.model.speculative`): exit E
    drafts up to ``num_speculations`` tokens, stopping a row's draft where ``confidence`` falls
    below ``draft_threshold``, and the layers above verify them, so the tokens are the full
    model's (greedy: equal to ``threshold=None``; sampled: from the same distribution).
    """
    sampling, measure = check_decoding(
        model, max_new_tokens, threshold, draft_exit, num_speculations, draft_threshold, temperature, top_k, top_p,
        confidence, hidden_confidence,
    )  # fmt: skip
    B, P = prompt.shape
    total = P + max_new_tokens
    kept = _check_attention_mask(attention_mask, prompt)
    lengths = kept.sum(1)  # each row's real prompt tokens: the position of its first new token
    if int(lengths.max()) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({int(lengths.max())}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={model.config.max_seq_len}"
        )
    cfg, dev = model.config, prompt.device
    generators = _generators(seed, B, dev) if temperature > 0 else []
    # After its end token a sequence holds pad_token_id, by default the end token itself.
    pad = pad_token_id if pad_token_id is not None else eos_token_id if eos_token_id is not None else 0
    if draft_exit is not None:
        from lego_lightning.model.speculative import decode_speculatively  # it builds on this module

        return decode_speculatively(
            model, prompt, kept, max_new_tokens, draft_exit, num_speculations, sampling, generators, pad,
            eos_token_id, draft_threshold, measure, hidden_confidence,
        )  # fmt: skip
    ref = next(model.parameters())
    caches = [
        tuple(torch.zeros(B, cfg.n_kv_heads, total, cfg.head_dim, device=dev, dtype=ref.dtype) for _ in "kv")
        for _ in range(cfg.n_layers)
    ]
    # Without padding the plain kernels run (causal prompt, unmasked decoding) and no step syncs for positions.
    padded = not bool(kept.all())
    keys_kept = torch.cat([kept, kept.new_ones(B, max_new_tokens)], dim=1) if padded else None
    exits = cfg.exit_layers
    tokens = torch.cat([prompt, torch.full((B, max_new_tokens), pad, dtype=prompt.dtype, device=dev)], dim=1)
    exit_position = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    active = torch.ones(B, dtype=torch.bool, device=dev)  # rows without a token yet at this step
    # Decoding a batch is bound by reading weights, the head's the largest. With a learned
    # classifier a row that leaves needs its exit's logits only for its token, which nothing reads
    # before the step ends; where its exit shares the final projection (LayerSkip's shared head),
    # its logits wait and join the final exit's in one product: one read of the head per step.
    final_proj = model.head(exits[-1]).proj
    waits = [
        hidden_confidence is not None
        and threshold is not None
        and threshold < 1  # nobody leaves early (as _exit_decision decides)
        and model.head(e).proj.weight is final_proj.weight
        for e in exits[:-1]
    ]
    waiting: list[tuple[Tensor, int, Tensor]] = []  # (rows, exit index, normed hidden states)
    last = len(exits) - 1

    def emit(step: int, s: int, rows: Tensor, logits: Tensor) -> None:
        drawn_by = [generators[r] for r in rows.tolist()] if generators else []
        tokens[rows, P + step] = sampling.pick(logits, drawn_by).to(tokens.dtype)
        exit_position[rows, step] = s
        active[rows] = False

    def take(step: int, s: int, rows: Tensor, h: Tensor) -> None:
        """``rows`` at exit ``s`` with hidden states ``h``: those that leave take their token there."""
        if s < last and waits[s]:
            leave = hidden_confidence(exits[s], h) >= threshold
            if leave.any():
                waiting.append((rows[leave], s, model.head(exits[s]).norm(h[leave])))
                active[rows[leave]] = False
        elif s == last and waiting:
            waiting.append((rows, s, model.head(exits[s]).norm(h)))
        else:
            leave, logits = _exit_decision(model, exits[s], h, s == last, threshold, measure, hidden_confidence)
            if leave.any():
                emit(step, s, rows[leave], logits)

    def settle(step: int) -> None:
        """The step's waiting rows (and those at the final exit) take their tokens from one product."""
        if waiting:
            logits = final_proj(torch.cat([normed for _, _, normed in waiting]))
            for (rows, s, _), part in zip(waiting, logits.split([len(rows) for rows, _, _ in waiting])):
                emit(step, s, rows, part)
            waiting.clear()

    at_exits = _prefill(model, prompt, kept if padded else None, caches)
    for s, e in enumerate(exits):  # the prompt ran every layer: each exit decides in turn
        rows = active.nonzero(as_tuple=True)[0]
        if len(rows):
            take(0, s, rows, at_exits[e][rows])
    settle(0)
    for step in range(1, max_new_tokens):
        if eos_token_id is not None:
            finished |= tokens[:, P + step - 1] == eos_token_id
            if finished.all():
                break  # every later token is already the padding
        active.copy_(~finished)
        column = P + step - 1
        positions = (lengths + step - 1).unsqueeze(1)
        x = model.embed(tokens[:, column : column + 1], positions=positions if padded else None, start=column)
        for s, stage in enumerate(cfg.stages):
            rows = active.nonzero(as_tuple=True)[0]  # fixed within a stage: rows leave only at exits
            for layer in range(stage.layers[0], stage.layers[1] + 1):
                x = _attend_cached(
                    model, model.blocks[layer - 1], x, caches[layer - 1], column, positions, keys_kept, rows
                )
            if len(rows):  # a row that left still gave deeper layers its keys and values
                take(step, s, rows, x[rows, 0])
        settle(step)
    return Generation(tokens, exit_position)


def check_decoding(
    model: ExitTransformer,
    max_new_tokens: int,
    threshold: float | None = None,
    draft_exit: int | None = None,
    num_speculations: int = 4,
    draft_threshold: float | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    confidence: str = "max_prob",
    hidden_confidence: HiddenConfidence | None = None,
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
        from lego_lightning.model.speculative import check_draft  # it builds on this module

        check_draft(model, draft_exit, num_speculations)
    if draft_threshold is not None:
        if draft_exit is None:
            raise ValueError(f"draft_threshold={draft_threshold} stops self-speculative drafts: it needs a draft_exit")
        check_threshold(draft_threshold, "draft_threshold")
    if not model.config.causal:
        raise ValueError("generate() needs a causal model; this one attends both ways (the masked objective)")
    return Sampling(temperature, top_k, top_p), _measure(confidence, hidden_confidence)


def _exit_decision(
    model: ExitTransformer,
    exit_layer: int,
    h: Tensor,
    final: bool,
    threshold: float | None,
    measure,
    hidden_confidence: HiddenConfidence | None,
) -> tuple[Tensor, Tensor]:
    """Which rows leave at this exit, and the logits of those that do (only they run the head)."""
    head = model.head(exit_layer)
    everyone = torch.ones(len(h), dtype=torch.bool, device=h.device)
    if final:
        return everyone, head(h)
    if threshold is None or threshold >= 1:
        return ~everyone, h.new_zeros(0, model.config.vocab_size)
    if hidden_confidence is not None:
        leave = hidden_confidence(exit_layer, h) >= threshold
        return leave, head(h[leave]) if leave.any() else h.new_zeros(0, model.config.vocab_size)
    logits = head(h)
    leave = measure(logits) >= threshold
    return leave, logits[leave]
