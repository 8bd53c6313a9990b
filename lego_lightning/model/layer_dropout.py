"""Layer dropout (LayerSkip, Elhoushi et al. 2024): in training, each sample skips whole layers.

Layer ``l`` of ``L`` is skipped by a sample with probability ``p_max * S(l)``, where the depth
scale ``S`` is one of torchtune's (``modules/layer_dropout.py``, whose names and formulas these
are): it is 0 at the first layer and 1 at the last (``uniform`` is 1 everywhere), so deeper
layers drop more, which LayerSkip credits for making early exits agree with the last one. A
skipped layer passes its input through unchanged, as in torchtune (no rescaling). Nothing is
dropped in evaluation: the module draws a mask only in its training step.

The mask is drawn outside the model, from a generator seeded by ``(seed, rank, step, micro-batch)``:

* a resumed run draws exactly the masks the uninterrupted run drew (they depend on the step,
  not on a random stream that would have to be saved), and the global random state that
  dropout and data shuffling use is left untouched;
* under DDP every rank draws its own masks (the rank is part of the seed): ranks drop
  independently, as their batches are different samples;
* the model receives the mask as a tensor, so ``torch.compile`` traces the training step
  without a break. For the same reason a skipped layer still runs, and its output is
  discarded (``torch.where``): layer dropout saves no compute here, and FLOPs count every layer.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor

from lego_lightning.model.config import is_int, is_number

DepthScale = Literal["uniform", "linear", "exp", "log", "sin", "sigmoid", "step"]
DEPTH_SCALES: tuple[str, ...] = get_args(DepthScale)


def depth_scale(scale: str, layer: int, n_layers: int) -> float:
    """torchtune's ``get_scale`` at the 1-based ``layer`` of ``n_layers``: 0 at the first layer, 1 at the last."""
    period, x = n_layers - 1, layer - 1
    if period == 0:
        return 1.0  # one layer: torchtune's convention, the full rate
    t = x / period
    return {
        "uniform": 1.0,
        "linear": t,
        "exp": math.exp(x * math.log(2) / period) - 1,
        "log": math.log(x + 1) / math.log(period + 1),
        "sin": math.sin(0.5 * math.pi * t),
        "sigmoid": 1 / (1 + math.exp(-10 * (t - 0.5))),
        "step": 0.0 if x < period else 1.0,
    }[scale]


@dataclass(frozen=True)
class LayerDropout:
    """Per-sample layer dropout in training, at rates that rise with depth.

    Args:
        p_max: the deepest layer's rate, in ``[0, 1)``.
        scale: how the rate rises with depth, one of :data:`DEPTH_SCALES` (torchtune's names).
        ramp_steps: a curriculum: ``p_max`` rises linearly from 0 over this many optimizer steps
            (0: the full rate from the first step).
        seed: the masks' seed; ``None`` takes the run's (``seed_everything``, else 0).
    """

    p_max: float = 0.1
    scale: DepthScale = "exp"
    ramp_steps: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_number(self.p_max) or not 0.0 <= self.p_max < 1.0:
            raise ValueError(f"layer_dropout.p_max={self.p_max!r} is not allowed: a rate in [0, 1)")
        if self.scale not in DEPTH_SCALES:
            raise ValueError(f"layer_dropout.scale={self.scale!r} is not one of {DEPTH_SCALES}")
        if not is_int(self.ramp_steps) or self.ramp_steps < 0:
            raise ValueError(f"layer_dropout.ramp_steps={self.ramp_steps!r} is not allowed: an integer >= 0")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"layer_dropout.seed={self.seed!r} is not allowed: an integer, or None for the run's")

    def rates(self, n_layers: int, step: int) -> list[float]:
        """Each layer's rate in force at optimizer step ``step`` (the curriculum's share of ``p_max``)."""
        ramp = 1.0 if self.ramp_steps == 0 else min(1.0, step / self.ramp_steps)
        return [self.p_max * ramp * depth_scale(self.scale, layer, n_layers) for layer in range(1, n_layers + 1)]

    def keep_mask(self, batch_size: int, rates: list[float], key: tuple[int, ...], device: Any = None) -> Tensor:
        """``(batch_size, layers)`` bool: whether each sample runs each layer, drawn from ``key`` (rank, step, ...)."""
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        state = np.random.SeedSequence([seed & 0xFFFFFFFF, *key]).generate_state(2, np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        draws = torch.rand((batch_size, len(rates)), generator=generator)
        return (draws >= torch.tensor(rates)).to(device)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, safe for ``torch.load(weights_only=True)`` and YAML."""
        return asdict(self)


def as_layer_dropout(value: LayerDropout | dict[str, Any] | None) -> LayerDropout | None:
    """A :class:`LayerDropout` from itself or its dict form (as stored in checkpoints and YAML)."""
    if value is None or isinstance(value, LayerDropout):
        return value
    if isinstance(value, dict):
        names = set(LayerDropout.__dataclass_fields__)
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"layer_dropout has unknown fields {unknown}: allowed {sorted(names)}")
        return LayerDropout(**value)
    raise TypeError(f"layer_dropout must be a LayerDropout or a mapping, got {type(value).__name__}: {value!r}")
