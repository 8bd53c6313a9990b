"""Early exit that skips work: routed teacher-forced scoring.

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

Decoding (with a KV cache, routed or not, and self-speculative) is the engine's, in
:mod:`lego_lightning.decoding`.

Plain PyTorch, inference only (``torch.no_grad``), the model in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lego_lightning.model.confidence import HiddenConfidence, confidence_measure
from lego_lightning.model.routing import check_threshold
from lego_lightning.model.transformer import Block, ExitTransformer


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
    measure = confidence_measure(confidence, hidden_confidence)
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
