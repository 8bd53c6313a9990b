"""A set of training-token positions, one bit per position: the hard tokens that mining finds.

Row ``i`` is training block ``i``; bit ``t`` of it is the block's target ``t``. Stored as packed
bits (``uint8``, 8 positions per byte), so 10^8 training tokens take 12.5 MB, and a batch reads
only its own rows. Under DDP each rank marks its own blocks; the ranks' sets are then summed,
which for disjoint rows is their union.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_COUNT_ROWS = 1 << 16  # rows counted at a time, so counting never unpacks the whole set


def pack(mask: Tensor) -> Tensor:
    """``(B, T)`` bool -> ``(B, ceil(T / 8))`` uint8, bit ``t % 8`` of byte ``t // 8`` for position ``t``."""
    b, t = mask.shape
    padded = torch.zeros(b, -(-t // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :t] = mask.to(torch.uint8)
    return (padded.view(b, -1, 8) * _BIT_VALUES.to(mask.device)).sum(dim=-1, dtype=torch.uint8)


def unpack(bits: Tensor, seq_len: int) -> Tensor:
    """The inverse of :func:`pack`: ``(B, ceil(T / 8))`` uint8 -> ``(B, T)`` bool."""
    values = _BIT_VALUES.to(bits.device)
    return (bits.unsqueeze(-1) & values).ne(0).flatten(1)[:, :seq_len]


class TokenSet:
    """Marked positions of ``(blocks, seq_len)`` training tokens, one bit each."""

    def __init__(self, bits: Tensor, seq_len: int) -> None:
        if bits.dtype != torch.uint8 or bits.dim() != 2 or bits.shape[1] != -(-seq_len // 8):
            raise ValueError(f"bits must be (blocks, ceil({seq_len}/8)) uint8, got {tuple(bits.shape)} {bits.dtype}")
        self.bits, self.seq_len = bits, seq_len

    @classmethod
    def empty(cls, blocks: int, seq_len: int, device: torch.device | str = "cpu") -> TokenSet:
        return cls(torch.zeros(blocks, -(-seq_len // 8), dtype=torch.uint8, device=device), seq_len)

    @classmethod
    def from_mask(cls, mask: Tensor) -> TokenSet:
        return cls(pack(mask.bool()), mask.shape[1])

    def mark(self, rows: Tensor, mask: Tensor) -> None:
        """Set blocks ``rows`` to ``mask`` ``(len(rows), seq_len)``."""
        self.bits[rows.to(self.bits.device)] = pack(mask.to(self.bits.device))

    def rows(self, index: Tensor) -> Tensor:
        """``(len(index), seq_len)`` bool: the marks of blocks ``index``, on ``index``'s device."""
        return unpack(self.bits[index.to(self.bits.device)].to(index.device), self.seq_len)

    def to_mask(self) -> Tensor:
        """Every mark as ``(blocks, seq_len)`` bool, in memory: for small sets (tests, reports)."""
        return unpack(self.bits, self.seq_len)

    def to(self, device: torch.device | str) -> TokenSet:
        return TokenSet(self.bits.to(device), self.seq_len)

    def count(self) -> int:
        """How many positions are marked (counted a slice of rows at a time)."""
        table = _POPCOUNT.to(self.bits.device)
        return sum(int(table[self.bits[i : i + _COUNT_ROWS].long()].sum()) for i in range(0, len(self), _COUNT_ROWS))

    def fraction(self) -> float:
        return self.count() / max(1, len(self) * self.seq_len)

    def __len__(self) -> int:
        return self.bits.shape[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TokenSet) and self.seq_len == other.seq_len and torch.equal(self.bits, other.bits)

    __hash__ = None  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only: checkpoints load with ``weights_only=True``."""
        return {"bits": self.bits.cpu(), "seq_len": self.seq_len}

    @classmethod
    def from_state(cls, state: dict[str, Any] | Tensor | None) -> TokenSet | None:
        """From :meth:`state_dict`, or from an earlier checkpoint's ``(N, T)`` bool mask."""
        if state is None:
            return None
        if isinstance(state, Tensor):
            return cls.from_mask(state)
        return cls(state["bits"], int(state["seq_len"]))
