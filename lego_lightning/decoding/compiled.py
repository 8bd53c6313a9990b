"""Passes at fixed shapes, for ``torch.compile``: every slot and the cache's whole width, whatever runs.

A compiled graph is specialised to its shapes. The engine's passes change shape as rows join,
leave, draft or accept different counts; here every pass runs over all slots, a verification
over as many positions as the most drafts a request may make, and attention over the cache's
whole width with a mask, so a graph is compiled once per kind of pass (a full step, a draft, a
verification: per range of layers) and never again. A slot outside the pass computes at the
cache's last columns, which no real query attends. Prefills (any prompt length) run eager. The extra rows and
columns cost arithmetic that a step bound by reading weights barely notices; whether the fused
graph pays is measured (``benchmarks/decoding.py``), not assumed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from lego_lightning.decoding.attention import Pass
from lego_lightning.decoding.cache import SlotCache
from lego_lightning.model.transformer import ExitTransformer


def _layers(
    model: ExitTransformer, first: int, stop: int, x: Tensor, positions: Tensor, write_index: Tensor, mask: Tensor,
    keys: Tensor, values: Tensor,
) -> Tensor:  # fmt: skip
    """Layers ``first .. stop - 1`` over every slot: the block's arithmetic of :func:`~.attention.run_layers`."""
    rotary = model.rotary
    for layer in range(first, stop):
        block = model.blocks[layer - 1]
        attn = block.attn
        q, k, v = (attn.to_heads(t) for t in attn.project(block.ln1(x)))
        if rotary is not None:
            q, k = rotary(q, positions), rotary(k, positions)
        head_dim = k.shape[-1]
        keys[layer - 1].view(-1, head_dim).index_copy_(0, write_index, k.reshape(-1, head_dim))
        values[layer - 1].view(-1, head_dim).index_copy_(0, write_index, v.reshape(-1, head_dim))
        y = attn.attend(q, keys[layer - 1], values[layer - 1], attn_mask=mask)
        x = block.after_attention(x, attn.proj(attn.from_heads(y)))
    return x


class FixedShapePasses:
    """``run_layers`` for a cache whose passes are compiled: one graph per (layers, positions), over every slot."""

    def __init__(self, model: ExitTransformer, cache: SlotCache, positions: int, backend: str = "inductor") -> None:
        """``positions``: what a verification runs at most (the most drafts a request may make, plus one)."""
        self.model, self.cache, self.positions, self.backend = model, cache, positions, backend
        self.graphs: dict[tuple[int, int, int], Callable[..., Tensor]] = {}

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
        row_columns = p.columns[:, :1] + torch.arange(Q, device=dev)
        key = (layers.start, layers.stop, Q)
        if key not in self.graphs:
            fn = functools.partial(_layers, self.model, layers.start, layers.stop)
            self.graphs[key] = torch.compile(fn, backend=self.backend, dynamic=False, fullgraph=True)
        columns = torch.arange(W - Q, W, device=dev).expand(S, Q).clone()  # a slot outside the pass: the last ones
        columns[p.slots] = row_columns
        write_index = ((torch.arange(S, device=dev)[:, None] * heads + torch.arange(heads, device=dev)) * W)[
            :, :, None
        ] + columns[:, None, :]
        mask = (torch.arange(W, device=dev) <= columns[:, :, None]).unsqueeze(1)
        every = x.new_zeros(S, Q, x.shape[2]).index_copy(0, p.slots, x)
        positions = columns.clamp(max=self.model.config.max_seq_len - 1)
        # Every kind of pass is a graph of the same function to dynamo, which allows 8 before it refuses.
        with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(self.graphs))):
            out = self.graphs[key](every, positions, write_index.reshape(-1), mask, cache.keys, cache.values)
        return out.index_select(0, p.slots)[:, :given]
