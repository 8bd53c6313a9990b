"""Exits placed by rule, for a model of any depth, and loss weights that follow the exits' depth.

A config written for one checkpoint should run on another of a different depth: instead of
``stages`` that name layers 1-4, 5-8, 9-12 of a 12-layer model, an :class:`ExitRule` says where
the exits go (``every: 4``, fractions of the depth, every layer), and :meth:`ExitRule.stages`
resolves it into the same :class:`~lego_lightning.model.config.Stage` list once the depth is
known (when the model is built, from its ``n_layers`` or from a pretrained checkpoint). The
last layer always has an exit: it is the model's own output.

The loss-weight scales are LayerSkip's (Elhoushi et al. 2024; torchtune's
``modules/early_exit_loss.py``): a weight per exit from the 1-based layer ``l`` it follows,
normalised to sum to 1. :class:`~lego_lightning.callbacks.ExitWeightSchedule` takes the same
names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import accumulate
from typing import Any

from lego_lightning.model.config import Stage, is_int, is_number

# Each exit's weight from the 1-based layers the exits follow, before normalising to sum 1.
WEIGHT_SCALES: dict[str, Callable[[Sequence[int]], list[float]]] = {
    "final": lambda layers: [0.0] * (len(layers) - 1) + [1.0],  # the last exit alone: standard training
    "uniform": lambda layers: [1.0] * len(layers),
    "l": lambda layers: [float(k) for k in layers],
    "sqrt_l": lambda layers: [math.sqrt(k) for k in layers],
    "inv_l": lambda layers: [1.0 / k for k in layers],
    "inv_sqrt_l": lambda layers: [1.0 / math.sqrt(k) for k in layers],
    "sum_l": lambda layers: [float(k) for k in accumulate(layers)],  # the cumulative sum over the exits
}


def exit_weights(scale: str, exit_layers: Sequence[int], where: str = "scale") -> list[float]:
    """One loss weight per exit (shallowest first) by the named ``scale``, summing to 1."""
    if scale not in WEIGHT_SCALES:
        raise ValueError(f"{where}={scale!r} is not a loss-weight scale: allowed {tuple(WEIGHT_SCALES)}")
    raw = WEIGHT_SCALES[scale](exit_layers)
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class ExitRule:
    """Where the exits of a model of any depth go; exactly one of ``layers``, ``every``, ``fractions``.

    Args:
        layers: 1-based layer numbers, e.g. ``[4, 8]``; each must exist in the model.
        every: an exit after every ``every``-th layer (``every: 1`` is every layer, LayerSkip's;
            the string ``"all"`` says the same).
        fractions: fractions of the depth in ``(0, 1]``; each becomes the nearest layer (halves
            up, at least layer 1), so ``[0.25, 0.5, 0.75]`` is 3, 6, 9 of 12 and 1, 1, 2 of 2.
        loss_weights: each exit's loss weight: a number for every exit alike, or a scale over the
            exits' depth normalised to sum 1 (``uniform``, ``final``, ``l``, ``sqrt_l``, ``inv_l``,
            ``inv_sqrt_l``, ``sum_l``; see :data:`WEIGHT_SCALES`).
        final_loss_weight: replaces the last exit's weight when set (``0``: train only the added
            exits, as EE-Tuning does with the trunk frozen).
        lr_scale: every stage's learning-rate scale.

    The last layer always ends a stage; exits that fall on the same layer are one exit.
    """

    layers: tuple[int, ...] | None = None
    every: int | None = None
    fractions: tuple[float, ...] | None = None
    loss_weights: str | float = "uniform"
    final_loss_weight: float | None = None
    lr_scale: float = 1.0

    def __post_init__(self) -> None:
        given = [name for name in ("layers", "every", "fractions") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"exits: give exactly one of layers, every, fractions (or 'all'), got {given or 'none'}: "
                "e.g. {every: 4}, {layers: [4, 8]}, {fractions: [0.25, 0.5]}"
            )
        if self.layers is not None:
            layers = tuple(self.layers) if isinstance(self.layers, Sequence) else (self.layers,)
            if not layers or not all(is_int(v) for v in layers):
                raise ValueError(f"exits.layers={self.layers!r} is not allowed: a non-empty list of layer numbers")
            bad = [v for v in layers if v < 1]
            if bad:
                raise ValueError(f"exits.layers={list(layers)} names layer {bad[0]}: layers are numbered from 1")
            object.__setattr__(self, "layers", layers)
        if self.every is not None and (not is_int(self.every) or self.every < 1):
            raise ValueError(f"exits.every={self.every!r} is not allowed: a positive integer (1: every layer)")
        if self.fractions is not None:
            fractions = tuple(self.fractions) if isinstance(self.fractions, Sequence) else (self.fractions,)
            if not fractions:
                raise ValueError("exits.fractions=[] is not allowed: a non-empty list of numbers in (0, 1]")
            for f in fractions:
                if not is_number(f) or not 0.0 < f <= 1.0:
                    raise ValueError(f"exits.fractions={list(fractions)} has {f!r}: each must be in (0, 1]")
            object.__setattr__(self, "fractions", tuple(float(f) for f in fractions))
        if isinstance(self.loss_weights, str):
            if self.loss_weights not in WEIGHT_SCALES:
                raise ValueError(
                    f"exits.loss_weights={self.loss_weights!r} is not allowed: a number >= 0 or a scale among "
                    f"{tuple(WEIGHT_SCALES)}"
                )
        elif not is_number(self.loss_weights) or self.loss_weights < 0:
            raise ValueError(
                f"exits.loss_weights={self.loss_weights!r} is not allowed: a number >= 0 or a scale among "
                f"{tuple(WEIGHT_SCALES)}"
            )
        if self.final_loss_weight is not None and (not is_number(self.final_loss_weight) or self.final_loss_weight < 0):
            raise ValueError(f"exits.final_loss_weight={self.final_loss_weight!r} is not allowed: a number >= 0")
        if not is_number(self.lr_scale) or self.lr_scale <= 0:
            raise ValueError(f"exits.lr_scale={self.lr_scale!r} is not allowed: a number > 0")

    def exit_layers(self, n_layers: int) -> tuple[int, ...]:
        """The exits of a model of ``n_layers`` layers, shallowest first, the last layer included."""
        if self.layers is not None:
            past = [v for v in self.layers if v > n_layers]
            if past:
                raise ValueError(
                    f"exits.layers={list(self.layers)} names layer {past[0]}, past the model's depth: allowed "
                    f"1..{n_layers}"
                )
            chosen = set(self.layers)
        elif self.every is not None:
            chosen = set(range(self.every, n_layers + 1, self.every))
        else:
            assert self.fractions is not None
            chosen = {max(1, math.floor(f * n_layers + 0.5)) for f in self.fractions}
        return tuple(sorted(chosen | {n_layers}))

    def stages(self, n_layers: int) -> tuple[Stage, ...]:
        """The rule resolved for ``n_layers`` layers: one stage per exit, with the rule's weights and lr scale."""
        exits = self.exit_layers(n_layers)
        if isinstance(self.loss_weights, str):
            weights = exit_weights(self.loss_weights, exits, "exits.loss_weights")
        else:
            weights = [float(self.loss_weights)] * len(exits)
        if self.final_loss_weight is not None:
            weights[-1] = float(self.final_loss_weight)
        if not any(w > 0 for w in weights):
            raise ValueError(
                f"exits: every loss weight is 0 for exits {list(exits)} (loss_weights={self.loss_weights!r}, "
                f"final_loss_weight={self.final_loss_weight!r}): at least one exit must be trained"
            )
        firsts = [1, *(e + 1 for e in exits[:-1])]
        return tuple(
            Stage((first, last), loss_weight=w, lr_scale=float(self.lr_scale))
            for first, last, w in zip(firsts, exits, weights)
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, safe for ``torch.load(weights_only=True)`` and YAML."""
        d = asdict(self)
        for name in ("layers", "fractions"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d


def as_exit_rule(value: ExitRule | Mapping[str, Any] | str | Sequence[int]) -> ExitRule:
    """An :class:`ExitRule` from itself, its dict form, ``"all"``, or a list of layer numbers."""
    if isinstance(value, ExitRule):
        return value
    if isinstance(value, str):
        if value.strip().lower() != "all":
            raise ValueError(
                f"exits={value!r} is not allowed: 'all', a list of layer numbers, or a mapping such as {{every: 4}}"
            )
        return ExitRule(every=1)
    if isinstance(value, Mapping):
        names = {"layers", "every", "fractions", "loss_weights", "final_loss_weight", "lr_scale"}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"exits has unknown fields {unknown}: allowed {sorted(names)}")
        return ExitRule(**value)
    if isinstance(value, Sequence):
        return ExitRule(layers=tuple(value))
    raise TypeError(f"exits must be 'all', a list of layers or a mapping, got {type(value).__name__}: {value!r}")
