"""BERT-style masking for the masked-word objective (Devlin et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor

from lego_lightning.model.lean_loss import IGNORE_INDEX


def mask_tokens(
    tokens: Tensor, mask_id: int, vocab_size: int, mask_prob: float = 0.15, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Choose each token with probability ``mask_prob``; of the chosen, 80% become ``mask_id``,
    10% a random token, 10% stay. Returns ``(inputs, targets)``: targets hold the original token
    at chosen positions and -100 (no loss) everywhere else.

    Random numbers come from ``generator`` (on the CPU) when given, so validation can mask the
    same positions every epoch.
    """
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    draws = torch.rand((2, *tokens.shape), generator=generator).to(tokens.device)
    random_tokens = torch.randint(vocab_size, tokens.shape, generator=generator).to(tokens.device)
    chosen = draws[0] < mask_prob
    targets = tokens.masked_fill(~chosen, IGNORE_INDEX)
    inputs = torch.where(chosen & (draws[1] < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (draws[1] >= 0.8) & (draws[1] < 0.9), random_tokens, inputs)
    return inputs, targets
