"""Confidence-based early-exit routing: a token leaves at the first exit whose confidence reaches the threshold."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_threshold(value: float | None, field: str = "routing_threshold") -> None:
    """Raise a clear error unless ``value`` is ``None`` or a number in ``[0, 1]``."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{field} must be a number in [0, 1] or None, got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{field} must be in [0, 1], got {value}")


def route(confidences: Tensor, threshold: float) -> Tensor:
    """Index of the exit each token leaves at.

    Args:
        confidences: ``(n_exits, N)``, shallowest exit first.
        threshold: a token leaves at exit ``i`` if ``confidences[i] >= threshold``; the deepest
            exit takes every token left. ``threshold = 1`` means no early exit at all: a float
            softmax can round to exactly 1.0, which would otherwise let a few tokens out.

    Returns:
        ``(N,)`` long tensor of exit positions in ``0 .. n_exits - 1``.
    """
    check_threshold(threshold, "threshold")
    n_exits, n = confidences.shape
    if threshold >= 1.0 or n_exits == 1:
        return torch.full((n,), n_exits - 1, dtype=torch.long, device=confidences.device)
    leaves = confidences[:-1] >= threshold
    leaves = torch.cat([leaves, torch.ones(1, n, dtype=torch.bool, device=confidences.device)])
    return leaves.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximal index
