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
"""

from __future__ import annotations

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


def embed(model: ExitTransformer, cache: SlotCache, p: Pass) -> Tensor:
    """The tokens of the pass's slots at its columns, embedded at their positions: ``(R, Q, D)``."""
    return model.embed(cache.tokens[p.slots[:, None], p.positions], positions=p.positions)


def run_layers(
    model: ExitTransformer,
    cache: SlotCache,
    layers: range,
    x: Tensor,
    p: Pass,
    attending: Tensor | None = None,
) -> Tensor:
    """``layers`` (1-based) over ``x`` ``(R, Q, D)`` of the pass ``p``; each writes its keys and values.

    ``attending`` (indices into the ``R`` rows): only these rows attend and run the rest of the
    block; the others keep their hidden state and only give the deeper layers their keys and
    values. ``None``: every row.
    """
    if cache.compiled is not None and attending is None:
        out = cache.compiled(layers, x, p)
        if out is not None:
            return out
    for layer in layers:
        keys, values = cache.layer(layer)
        x = _layer(model, model.blocks[layer - 1], keys, values, x, p, attending)
    return x


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
