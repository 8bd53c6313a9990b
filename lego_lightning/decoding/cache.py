"""The KV cache of the decoding engine: a fixed number of slots, each holding one request.

A slot holds its request's keys and values from column 0, so a token's column is its position:
nothing is padded, and a slot is freed and reused without moving any other. A slot's valid
length is kept by the engine, not here: whatever lies past it (drafts that were refused, a
verification's padding, the request that held the slot before) is never attended, since a query
sees only the columns up to its own, and is overwritten when the slot gets there. Rolling back
is setting a length.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lego_lightning.model.config import TransformerConfig


class SlotCache:
    """Keys and values ``(slots, kv_heads, width, head_dim)`` per layer, with each slot's tokens by column.

    ``width`` is the longest request's context plus room past it: a verification writes up to its
    longest draft past a slot's last token, and a row that drafted less than the longest in its
    batch writes its padding there too.
    """

    def __init__(
        self, config: TransformerConfig, slots: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.slots = slots
        self.width = width
        shape = (config.n_layers, slots, config.n_kv_heads, width, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        # Every token of every slot by column (prompt, kept tokens, drafts): what the next pass embeds.
        self.tokens = torch.zeros(slots, self.width, dtype=torch.long, device=device)
        # Compiled passes at fixed shapes (decoding.compiled.FixedShapePasses), when the engine compiles.
        self.compiled: Callable[[range, Tensor, Any], Tensor | None] | None = None

    def layer(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s (1-based) keys and values, ``(slots, kv_heads, width, head_dim)`` each."""
        return self.keys[layer - 1], self.values[layer - 1]

    @staticmethod
    def bytes_per_slot(config: TransformerConfig, width: int, dtype: torch.dtype) -> int:
        """Memory of one slot: keys and values of every layer over ``width`` columns, and its tokens."""
        elements = 2 * config.n_layers * config.n_kv_heads * width * config.head_dim
        return elements * torch.empty((), dtype=dtype).element_size() + width * 8


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the machine's available memory on
    the CPU; ``None`` where that cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_slots_fit(
    config: TransformerConfig, slots: int, width: int, device: torch.device, dtype: torch.dtype
) -> None:
    """An error that says how many slots fit, raised before the cache is allocated, where ``slots`` do not."""
    if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
        raise ValueError(f"slots={slots!r}: allowed a positive integer (requests decoded at once)")
    free = available_memory(device)
    per_slot = SlotCache.bytes_per_slot(config, width, dtype)
    if free is not None and slots * per_slot > free:
        raise ValueError(
            f"slots={slots} needs {slots * per_slot / 2**20:.0f} MiB of KV cache ({per_slot / 2**20:.1f} MiB a slot at "
            f"{width} columns), more than the {free / 2**20:.0f} MiB free on {device}: at most "
            f"{free // per_slot} slots fit"
        )
