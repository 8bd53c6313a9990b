"""Passes at fixed shapes, for ``torch.compile``: every slot and the cache's whole width, whatever runs.

A compiled graph is specialised to its shapes. The engine's passes change shape as rows join,
leave, draft or accept different counts; here every pass runs over all slots, a verification
over as many positions as the most drafts a request may make, and attention over the cache's
whole width with a mask, so a graph is compiled once per number of positions (a step or a draft,
a verification) and never again. A slot outside the pass computes at the cache's last columns,
which no real query attends. Prefills (any prompt length) run eager.

What is compiled is a layer's arithmetic before and after its attention, two graphs whose
inputs include the layer's weights, so every layer shares them; writing the cache and attending
stay outside: a graph that mutates an input copies all of it at every call. The extra rows and
columns cost arithmetic that a step bound by reading weights barely notices; whether the fused
graphs pay is measured (``benchmarks/decoding.py``), not assumed.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lego_lightning.decoding.attention import Pass
from lego_lightning.decoding.cache import SlotCache
from lego_lightning.model.transformer import Block, ExitTransformer, RotaryEmbedding


def _before_attention(block: Block, rotary: RotaryEmbedding | None, x: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
    """A layer up to its attention: the norm, the fused projection, the heads, the rotation."""
    attn = block.attn
    q, k, v = (attn.to_heads(t) for t in attn.project(block.ln1(x)))
    if rotary is not None:
        q, k = rotary(q, positions), rotary(k, positions)
    return q, k, v


def _after_attention(block: Block, x: Tensor, y: Tensor) -> Tensor:
    """A layer from its attention's output on: the projection, the residual, the MLP."""
    return block.after_attention(x, block.attn.proj(block.attn.from_heads(y)))


class FixedShapePasses:
    """``run_layers`` for a cache whose passes are compiled: one graph per (layers, positions), over every slot."""

    def __init__(self, model: ExitTransformer, cache: SlotCache, positions: int, backend: str = "inductor") -> None:
        """``positions``: what a verification runs at most (the most drafts a request may make, plus one)."""
        self.model, self.cache, self.positions = model, cache, positions
        # Two graphs per number of positions, shared by every layer (their weights are the graphs' inputs).
        # The cache is written and attended outside them: a graph that mutates its input copies all of it.
        compile = functools.partial(torch.compile, backend=backend, dynamic=False, fullgraph=True)
        self.before, self.after = compile(_before_attention), compile(_after_attention)

    def __call__(self, layers: range, x: Tensor, p: Pass) -> Tensor | None:
        """The pass at fixed shapes, or ``None`` for a prefill (left to the eager path)."""
        if p.causal:
            return None
        cache, dev = self.cache, x.device
        S, W, heads = cache.slots, cache.width, cache.keys.shape[2]
        R, given, D = x.shape
        Q = 1 if given == 1 else self.positions
        if given < Q:  # a verification of fewer drafts: its padding runs on past the row's last position
            x = torch.cat([x, x.new_zeros(R, Q - given, D)], 1)
        columns = torch.arange(W - Q, W, device=dev).expand(S, Q).clone()  # a slot outside the pass: the last ones
        columns[p.slots] = p.columns[:, :1] + torch.arange(Q, device=dev)
        write_index = ((torch.arange(S, device=dev)[:, None] * heads + torch.arange(heads, device=dev)) * W)[
            :, :, None
        ] + columns[:, None, :]
        write_index = write_index.reshape(-1)
        mask = (torch.arange(W, device=dev) <= columns[:, :, None]).unsqueeze(1)
        positions = columns.clamp(max=self.model.config.max_seq_len - 1)
        x = x.new_zeros(S, Q, D).index_copy(0, p.slots, x)
        # Each kind of pass is its own graph of the same two functions, which dynamo allows 8 of before it refuses.
        with torch._dynamo.config.patch(recompile_limit=64):
            for layer in layers:
                block = self.model.blocks[layer - 1]
                q, k, v = self.before(block, self.model.rotary, x, positions)
                keys, values = cache.layer(layer)
                keys.view(-1, k.shape[-1]).index_copy_(0, write_index, k.reshape(-1, k.shape[-1]))
                values.view(-1, v.shape[-1]).index_copy_(0, write_index, v.reshape(-1, v.shape[-1]))
                x = self.after(block, x, block.attn.attend(q, keys, values, attn_mask=mask))
        return x.index_select(0, p.slots)[:, :given]
