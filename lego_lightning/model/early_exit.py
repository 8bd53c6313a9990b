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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.routing import check_threshold
from lego_lightning.model.transformer import Block, ExitTransformer

# A confidence from a hidden state, for measures that need no logits: (exit_layer, (N, D)) -> (N,)
HiddenConfidence = Callable[[int, Tensor], Tensor]


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
    measure = get_confidence(confidence)
    x = model.embed(idx)
    # Per-token bookkeeping on the flattened (B * T) sequence: 1-D index_select/index_copy_ are
    # cheap where 2-D advanced indexing into (B, T, V) logits is not.
    active = torch.ones(B * T, dtype=torch.bool, device=dev)
    exit_position = torch.full((B * T,), len(cfg.stages) - 1, dtype=torch.long, device=dev)
    nll = torch.zeros(B * T, device=dev) if targets is not None else None
    logits_out = None if targets is not None else torch.empty(B * T, cfg.vocab_size, device=dev)  # all written

    def record(token: Tensor, logits: Tensor) -> None:
        if nll is not None:
            target = targets.reshape(-1).index_select(0, token)
            nll.index_copy_(0, token, F.cross_entropy(logits.float(), target, reduction="none"))
        else:
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
    tokens: Tensor  # (B, P + N): the prompt and the generated tokens
    exit_position: Tensor  # (B, N): the exit each generated token came from


def _attend_cached(
    model: ExitTransformer, block: Block, x: Tensor, cache_k: Tensor, cache_v: Tensor, position: int, rows: Tensor
) -> Tensor:
    """One decoding step of one layer: every row writes its key/value; ``rows`` also attend and run the MLP.

    Few operations per step matter as much as few FLOPs at decode time (each is a tiny matrix
    product): with every row active this is the plain layer, one fused q/k/v projection and no
    gathers; rows that left pay one fused k/v projection.
    """
    B = x.shape[0]
    attn = block.attn
    h = block.ln1(x)  # (B, 1, D)
    everyone = len(rows) == B
    if everyone:
        q, k, v = (attn.to_heads(t) for t in attn.project(h))
    else:
        k, v = (attn.to_heads(t) for t in attn.project(h, "kv"))
    pos = torch.full((B, 1), position, dtype=torch.long, device=x.device)
    if model.rotary is not None:
        k = model.rotary(k, pos)
    cache_k[:, :, position : position + 1] = k
    cache_v[:, :, position : position + 1] = v
    if len(rows) == 0:
        return x
    if everyone:
        if model.rotary is not None:
            q = model.rotary(q, pos)
        y = attn.attend(q, cache_k[:, :, : position + 1], cache_v[:, :, : position + 1])
        return block.after_attention(x, attn.proj(attn.from_heads(y)))
    (q,) = attn.project(h[rows], "q")
    q = attn.to_heads(q)
    if model.rotary is not None:
        q = model.rotary(q, pos[rows])
    y = attn.attend(q, cache_k[rows, :, : position + 1], cache_v[rows, :, : position + 1])
    x = x.clone()
    x[rows] = block.after_attention(x[rows], attn.proj(attn.from_heads(y)))
    return x


def _prefill(model: ExitTransformer, prompt: Tensor, caches: list[tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """All layers over the prompt, keys and values cached; hidden states at every exit, last position."""
    x = model.embed(prompt)
    P = prompt.shape[1]
    at_exits = {}
    for i, block in enumerate(model.blocks, start=1):
        attn = block.attn
        q, k, v = (attn.to_heads(t) for t in attn.project(block.ln1(x)))
        if model.rotary is not None:
            q, k = model.rotary(q), model.rotary(k)
        caches[i - 1][0][:, :, :P] = k
        caches[i - 1][1][:, :, :P] = v
        y = attn.attend(q, k, v, is_causal=model.config.causal)
        x = block.after_attention(x, attn.proj(attn.from_heads(y)))
        if i in model.exit_layers:
            at_exits[i] = x[:, -1]
    return at_exits


@torch.no_grad()
def generate(
    model: ExitTransformer,
    prompt: Tensor,
    max_new_tokens: int,
    threshold: float | None = None,
    confidence: str = "max_prob",
    hidden_confidence: HiddenConfidence | None = None,
) -> Generation:
    """Greedy decoding with a KV cache; each sequence picks its exit at every step by the routing rule.

    The prompt runs through every layer. A sequence whose confidence reaches ``threshold`` at
    an exit takes that exit's token; the layers it skips still get its key and value for this
    position, from the state carried up from its exit. ``threshold=None`` decodes at full depth
    and gives exactly the tokens of plain greedy decoding without a cache.
    """
    if threshold is not None:
        check_threshold(threshold, "threshold")
    if not model.config.causal:
        raise ValueError("generate() needs a causal model; this one attends both ways (the masked objective)")
    B, P = prompt.shape
    total = P + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={model.config.max_seq_len}"
        )
    cfg, dev = model.config, prompt.device
    hd, H = cfg.head_dim, cfg.n_kv_heads
    ref = next(model.parameters())
    caches = [
        tuple(torch.zeros(B, H, total, hd, device=dev, dtype=ref.dtype) for _ in "kv") for _ in range(cfg.n_layers)
    ]
    measure = get_confidence(confidence)
    exits = cfg.exit_layers
    tokens = torch.cat([prompt, torch.zeros(B, max_new_tokens, dtype=prompt.dtype, device=dev)], dim=1)
    exit_position = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)

    at_exits = _prefill(model, prompt, caches)
    decided = torch.zeros(B, dtype=torch.bool, device=dev)
    next_token = torch.zeros(B, dtype=prompt.dtype, device=dev)
    for s, e in enumerate(exits):
        rows = (~decided).nonzero(as_tuple=True)[0]
        token, leave = _exit_decision(
            model, e, at_exits[e][rows], s == len(exits) - 1, threshold, measure, hidden_confidence
        )
        next_token[rows[leave]] = token[leave]
        exit_position[rows[leave], 0] = s
        decided[rows[leave]] = True
    tokens[:, P] = next_token
    for step in range(1, max_new_tokens):
        position = P + step - 1
        x = model.embed(tokens[:, position : position + 1], start=position)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        next_token = torch.zeros(B, dtype=prompt.dtype, device=dev)
        for s, stage in enumerate(cfg.stages):
            first, last = stage.layers
            rows = active.nonzero(as_tuple=True)[0]  # fixed within a stage: rows leave only at exits
            for layer in range(first, last + 1):
                k_cache, v_cache = caches[layer - 1]
                x = _attend_cached(model, model.blocks[layer - 1], x, k_cache, v_cache, position, rows)
            if len(rows) == 0:
                continue  # every row has left; deeper layers still wrote their keys and values
            token, leave = _exit_decision(
                model, last, x[rows, 0], s == len(exits) - 1, threshold, measure, hidden_confidence
            )
            next_token[rows[leave]] = token[leave]
            exit_position[rows[leave], step] = s
            active[rows[leave]] = False
        tokens[:, position + 1] = next_token
    return Generation(tokens, exit_position)


def _exit_decision(
    model: ExitTransformer,
    exit_layer: int,
    h: Tensor,
    final: bool,
    threshold: float | None,
    measure,
    hidden_confidence: HiddenConfidence | None,
) -> tuple[Tensor, Tensor]:
    """Greedy token of every row at this exit (only rows that leave run the head) and which rows leave."""
    head = model.head(exit_layer)
    if final:
        return head(h).argmax(-1), torch.ones(len(h), dtype=torch.bool, device=h.device)
    if threshold is None or threshold >= 1:
        return torch.zeros(len(h), dtype=torch.long, device=h.device), torch.zeros(
            len(h), dtype=torch.bool, device=h.device
        )
    token = torch.zeros(len(h), dtype=torch.long, device=h.device)
    if hidden_confidence is not None:
        leave = hidden_confidence(exit_layer, h) >= threshold
        if leave.any():
            token[leave] = head(h[leave]).argmax(-1)
        return token, leave
    logits = head(h)
    return logits.argmax(-1), measure(logits) >= threshold
