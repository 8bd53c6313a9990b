"""The one attention path of decoding: any range of layers over any slots, at any run of positions.

A *pass* runs ``Q`` consecutive positions of each of ``R`` slots, slot ``r``'s starting at its own
column. Every position writes its key and value at its column of its slot and attends to its
slot's columns up to its own. The same function serves:

* a new prompt's prefill into a free slot (``Q`` = the prompt, from column 0);
* a one-token step (``Q`` = 1, at each slot's own length);
* a draft (layers up to the draft exit, ``Q`` = 1);
* a verification (the layers above the draft exit, ``Q`` = the drafts and the token before them).

With ``attending`` only some rows attend and run their MLP; the others only write their keys and
values, from the hidden state they bring (routed decoding's state propagation, CALM's: a token
that left at an exit gives the deeper layers its keys and values and does no other work).

What a pass needs beyond the layers (positions, the keys each query may see, where keys are
written) is worked out once per pass in :class:`Pass`, so a layer is the block's own arithmetic
plus two index copies into the cache. Where every slot starts at the same column the plain
kernels run: no mask for a one-token step, the causal kernel for prefills from column 0.

A :class:`Packed` pass runs rows of different lengths together (new prompts beside one-token
steps) with their positions one after the other: the layer's matrix products run once over all
of them, with no padding, and attention runs per group of rows of one length. A step that
admits a request then reads the weights once for its prefill and for everybody's next token.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from lego_lightning.decoding.cache import SlotCache
from lego_lightning.model.transformer import Block, ExitTransformer


@dataclass
class Pass:
    """Where ``Q`` positions of ``R`` slots read and write, shared by every layer of one pass."""

    slots: Tensor  # (R,) cache slot of each row
    columns: Tensor  # (R, Q) each position's column in its slot
    positions: Tensor  # (R, Q) each position's position: its column, clamped to the context
    span: int  # columns any query of the pass may see: keys are read up to here
    whole: bool  # the rows are every slot of the cache in order: keys are read as a view, not gathered
    write_column: int | None  # the one column every row writes (Q = 1, same start), else None
    write_index: Tensor | None  # (R * kv_heads * Q,) flat row of each written key in a layer's cache
    mask: Tensor | None  # (R, 1, Q, span) keys each query may see; None when it sees every key or is_causal
    causal: bool  # every row starts at column 0 and the pass is as wide as the keys: the causal kernel

    @classmethod
    def of(cls, cache: SlotCache, slots: list[int], start: list[int], Q: int, max_seq_len: int) -> Pass:
        """The pass over ``slots`` (host lists), row ``r`` at columns ``start[r] .. start[r] + Q - 1``."""
        device = cache.tokens.device
        R = len(slots)
        span = max(start) + Q
        slot_t = torch.tensor(slots, device=device)
        columns = torch.tensor(start, device=device)[:, None] + torch.arange(Q, device=device)
        same_start = min(start) == max(start)
        whole = cache.slots == R and slots == list(range(R))
        write_column = start[0] if same_start and Q == 1 and whole else None
        write_index = None
        if write_column is None:
            heads = cache.keys.shape[2]
            # A layer's cache viewed as (slots * kv_heads * width, head_dim): row (slot, head, column).
            base = (slot_t[:, None] * heads + torch.arange(heads, device=device)) * cache.width  # (R, H)
            write_index = (base[:, :, None] + columns[:, None, :]).reshape(-1)
        causal = same_start and start[0] == 0 and span == Q
        mask = None
        if not causal and not (same_start and Q == 1):
            mask = (torch.arange(span, device=device) <= columns[:, :, None]).unsqueeze(1)
        positions = columns.clamp(max=max_seq_len - 1)  # a verification's padding may run past the context
        return cls(slot_t, columns, positions, span, whole, write_column, write_index, mask, causal)

    def write(self, cache: Tensor, new: Tensor) -> None:
        """``new`` ``(R, kv_heads, Q, head_dim)`` into one layer's ``cache`` at each row's columns."""
        if self.write_column is not None:
            cache[:, :, self.write_column : self.write_column + 1] = new
        else:
            cache.view(-1, cache.shape[-1]).index_copy_(0, self.write_index, new.reshape(-1, new.shape[-1]))

    def read(self, cache: Tensor, rows: Tensor | None = None) -> Tensor:
        """One layer's keys (or values) of the pass's slots, or of ``rows`` of them, up to ``span``."""
        seen = cache[:, :, : self.span]
        if rows is not None:
            return seen.index_select(0, self.slots.index_select(0, rows))
        return seen if self.whole else seen.index_select(0, self.slots)

    def attention_kwargs(self, rows: Tensor | None = None) -> dict:
        if self.causal:
            assert rows is None, "a causal pass runs every row"
            return {"is_causal": True}
        mask = self.mask if rows is None or self.mask is None else self.mask.index_select(0, rows)
        return {"attn_mask": mask}


@dataclass
class Packed:
    """Rows of different numbers of positions, one after the other: ``T`` positions in all."""

    slots: Tensor  # (T,) each position's slot
    columns: Tensor  # (T,) its column there
    positions: Tensor  # (T,) its position (its column, clamped to the context)
    write_index: Tensor  # (T * kv_heads,) flat row of each written key in a layer's cache, position by position
    groups: list[tuple[Pass, Tensor]]  # rows of one length: their pass, and where its R * Q positions sit
    last: Tensor  # (rows,) where each row's last position sits

    @classmethod
    def of(cls, cache: SlotCache, slots: list[int], start: list[int], counts: list[int], max_seq_len: int) -> Packed:
        """Row ``r`` at columns ``start[r] .. start[r] + counts[r] - 1`` of slot ``slots[r]`` (host lists)."""
        device = cache.tokens.device
        first = [0]
        for n in counts:
            first.append(first[-1] + n)
        rows_of: dict[int, list[int]] = {}
        for r, n in enumerate(counts):
            rows_of.setdefault(n, []).append(r)
        groups = []
        for n, rows in rows_of.items():
            p = Pass.of(cache, [slots[r] for r in rows], [start[r] for r in rows], n, max_seq_len)
            groups.append((p, torch.tensor([first[r] + q for r in rows for q in range(n)], device=device)))
        slot_t = torch.tensor([s for s, n in zip(slots, counts) for _ in range(n)], device=device)
        columns = torch.tensor([c + q for c, n in zip(start, counts) for q in range(n)], device=device)
        heads = cache.keys.shape[2]
        write_index = (slot_t[:, None] * heads + torch.arange(heads, device=device)) * cache.width + columns[:, None]
        last = torch.tensor(first[1:], device=device) - 1
        return cls(slot_t, columns, columns.clamp(max=max_seq_len - 1), write_index.reshape(-1), groups, last)


def embed(model: ExitTransformer, cache: SlotCache, p: Pass | Packed) -> Tensor:
    """The tokens of the pass's slots at its columns, embedded at their positions: ``(R, Q, D)``, or ``(T, D)``
    for a packed pass."""
    if isinstance(p, Packed):
        ids = cache.tokens[p.slots, p.columns]
        return model.embed(ids[None], positions=p.positions[None])[0]
    return model.embed(cache.tokens[p.slots[:, None], p.positions], positions=p.positions)


def run_layers(
    model: ExitTransformer,
    cache: SlotCache,
    layers: range,
    x: Tensor,
    p: Pass | Packed,
    attending: Tensor | None = None,
) -> Tensor:
    """``layers`` (1-based) over ``x`` ``(R, Q, D)`` of the pass ``p`` (``(T, D)`` of a packed one); each
    writes its keys and values.

    ``attending`` (indices into the ``R`` rows): only these rows attend and run the rest of the
    block; the others keep their hidden state and only give the deeper layers their keys and
    values. ``None``: every row.
    """
    if isinstance(p, Packed):
        for layer in layers:
            keys, values = cache.layer(layer)
            x = _packed_layer(model, model.blocks[layer - 1], keys, values, x, p)
        return x
    if cache.compiled is not None and attending is None:
        out = cache.compiled(layers, x, p)
        if out is not None:
            return out
    for layer in layers:
        keys, values = cache.layer(layer)
        x = _layer(model, model.blocks[layer - 1], keys, values, x, p, attending)
    return x


def run_tapped(
    model: ExitTransformer, cache: SlotCache, layers: range, x: Tensor, p: Pass | Packed, taps: Collection[int]
) -> tuple[Tensor, dict[int, Tensor]]:
    """:func:`run_layers`, also giving the hidden state after each layer of ``taps`` that ``layers`` runs."""
    kept, first = {}, layers.start
    for tap in sorted(t for t in taps if layers.start <= t < layers.stop):
        x = run_layers(model, cache, range(first, tap + 1), x, p)
        kept[tap], first = x, tap + 1
    if first < layers.stop:
        x = run_layers(model, cache, range(first, layers.stop), x, p)
    return x, kept


def _layer(
    model: ExitTransformer, block: Block, keys: Tensor, values: Tensor, x: Tensor, p: Pass, attending: Tensor | None
) -> Tensor:
    attn, rotary = block.attn, model.rotary
    h = block.ln1(x)
    if attending is None:
        q, k, v = (attn.to_heads(t) for t in attn.project(h))  # (R, H, Q, hd)
    else:
        k, v = (attn.to_heads(t) for t in attn.project(h, "kv"))
    if rotary is not None:
        k = rotary(k, p.positions)
    p.write(keys, k)
    p.write(values, v)
    if attending is None:
        if rotary is not None:
            q = rotary(q, p.positions)
        y = attn.attend(q, p.read(keys), p.read(values), **p.attention_kwargs())
        return block.after_attention(x, attn.proj(attn.from_heads(y)))
    if len(attending) == 0:
        return x
    (q,) = attn.project(h.index_select(0, attending), "q")
    q = attn.to_heads(q)
    if rotary is not None:
        q = rotary(q, p.positions.index_select(0, attending))
    y = attn.attend(q, p.read(keys, attending), p.read(values, attending), **p.attention_kwargs(attending))
    x_attending = block.after_attention(x.index_select(0, attending), attn.proj(attn.from_heads(y)))
    return x.index_copy(0, attending, x_attending)


def _packed_layer(model: ExitTransformer, block: Block, keys: Tensor, values: Tensor, x: Tensor, p: Packed) -> Tensor:
    """One layer over the ``T`` positions of a packed pass: the products over all at once, attention per group."""
    attn, rotary = block.attn, model.rotary
    T = x.shape[0]
    q, k, v = (attn.to_heads(t[None])[0] for t in attn.project(block.ln1(x)))  # (heads, T, hd)
    if rotary is not None:
        q, k = rotary(q[None], p.positions[None])[0], rotary(k[None], p.positions[None])[0]
    head_dim = k.shape[-1]
    keys.view(-1, head_dim).index_copy_(0, p.write_index, k.transpose(0, 1).reshape(-1, head_dim))
    values.view(-1, head_dim).index_copy_(0, p.write_index, v.transpose(0, 1).reshape(-1, head_dim))
    y = q.new_empty(T, q.shape[0] * head_dim)
    for group, where in p.groups:
        R, Q = group.columns.shape
        q_group = q.index_select(1, where).view(q.shape[0], R, Q, head_dim).transpose(0, 1)  # (R, heads, Q, hd)
        out = attn.attend(q_group, group.read(keys), group.read(values), **group.attention_kwargs())
        y.index_copy_(0, where, attn.from_heads(out).reshape(R * Q, -1))
    return block.after_attention(x, attn.proj(y))
