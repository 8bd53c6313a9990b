"""``ProgressiveExitLM``: train a shallow model, then grow layers on top and train only them, in one ``fit``.

A preset of :class:`~lego_lightning.modules.PhasedExitLM` with two phases (SEEDS.md section 3):
phase 1 trains layers ``1..phase1_layers`` with the given stages; phase 2 grows the model to
``phase2_layers``, initialises the new layers with ``grow_init``, freezes the embedding, the
phase-1 layers (and, with separate heads and ``freeze_old_heads``, the phase-1 exits' heads)
and trains the rest at ``phase2_lr_scale`` times the learning rate. ``phases`` in its
hyperparameters is derived from these arguments, so configs and checkpoints keep today's names.

Under DDP this needs ``strategy="ddp_find_unused_parameters_true"``: each phase leaves some
weights without gradient.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from lego_lightning.model.config import Stage, TransformerConfig, as_stage
from lego_lightning.model.transformer import GROW_INITS, GrowInit
from lego_lightning.modules.phase import Phase
from lego_lightning.modules.phased import PhasedExitLM


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def two_phase_plan(
    phase1_layers: int,
    phase2_layers: int,
    phase1_exits: Sequence[int],
    phase2_loss_weights: Sequence[float] | None,
    grow_init: str,
    train_old_heads: bool,
    phase2_lr_scale: float,
    phase1_max_epochs: int,
    phase2_max_epochs: int,
    phase1_patience: int,
    phase2_patience: int,
    **phase2: object,
) -> list[Phase]:
    """The research's two phases as a plan; ``phase2`` adds fields to the second phase (hard tokens)."""
    for name, value in (("phase1_layers", phase1_layers), ("phase2_layers", phase2_layers)):
        _positive(name, value)
    if phase2_layers <= phase1_layers:
        raise ValueError(
            f"phase2_layers={phase2_layers} must be larger than phase1_layers={phase1_layers}: phase 2 grows the model"
        )
    for name, value in (("phase1_max_epochs", phase1_max_epochs), ("phase2_max_epochs", phase2_max_epochs)):
        _positive(name, value)
    for name, value in (("phase1_patience", phase1_patience), ("phase2_patience", phase2_patience)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if grow_init not in GROW_INITS:
        raise ValueError(f"grow_init={grow_init!r} is not one of {GROW_INITS}")
    if not phase2_lr_scale > 0:
        raise ValueError(f"phase2_lr_scale must be > 0, got {phase2_lr_scale}")
    exits = [*phase1_exits, phase2_layers]
    weights2 = [0.0] * len(phase1_exits) + [1.0]
    if phase2_loss_weights is not None:
        weights2 = [float(w) for w in phase2_loss_weights]
    if len(weights2) != len(exits) or any(w < 0 for w in weights2) or not any(w > 0 for w in weights2):
        raise ValueError(
            f"phase2_loss_weights={list(weights2)} must hold {len(exits)} weights >= 0 (one per exit "
            f"{tuple(exits)}), not all 0"
        )
    train = ["new", *(f"exit {k}" for k in phase1_exits if train_old_heads)]
    return [
        Phase(layers=phase1_layers, max_epochs=phase1_max_epochs, patience=phase1_patience),
        Phase(
            layers=phase2_layers,
            grow_init=grow_init,  # type: ignore[arg-type]
            loss_weights=dict(zip(exits, weights2)),
            train=train,
            lr_scale=phase2_lr_scale,
            max_epochs=phase2_max_epochs,
            patience=phase2_patience,
            **phase2,  # type: ignore[arg-type]
        ),
    ]


class ProgressiveExitLM(PhasedExitLM):
    """Two-phase progressive layer training (SEEDS.md section 3), as one LightningModule.

    Args:
        phase1_layers: depth trained in phase 1.
        phase2_layers: depth after growth; must be larger.
        stages: phase-1 stages over ``1..phase1_layers`` (default one stage, one exit).
        phase2_loss_weights: one weight per exit after growth (the phase-1 exits, then the new
            one); default only the new exit.
        grow_init: ``identity`` (the grown model starts computing what phase 1 ended with),
            ``copy`` or ``random`` (the research's choice in section 3).
        freeze_old_heads: with separate heads, also freeze the phase-1 exits' heads. A shared
            head is never frozen: the new exit trains it (as the research did).
        phase2_lr_scale: phase 2 runs at this times the learning rate (research: 0.1).
        phase1_max_epochs, phase2_max_epochs, phase1_patience, phase2_patience: per-phase
            limits for :class:`~lego_lightning.callbacks.PerplexityEarlyStopping`.

        **kwargs: the model's sizes, ``confidence``, ``routing_threshold``, ``objective`` and the
            optimizer's settings, as :class:`~lego_lightning.modules.PhasedExitLM` takes them.

    Logged: ``progressive/phase``.
    """

    log_prefix = "progressive"

    def __init__(
        self,
        phase1_layers: int = 3,
        phase2_layers: int = 4,
        stages: Sequence[Stage] | None = None,
        phase2_loss_weights: Sequence[float] | None = None,
        grow_init: GrowInit = "random",
        freeze_old_heads: bool = True,
        phase2_lr_scale: float = 0.1,
        phase1_max_epochs: int = 50,
        phase2_max_epochs: int = 50,
        phase1_patience: int = 1,
        phase2_patience: int = 1,
        **kwargs: Any,
    ) -> None:
        _positive("phase1_layers", phase1_layers)
        phase1_stages = [as_stage(s) for s in stages or [Stage((1, phase1_layers))]]
        phases = two_phase_plan(
            phase1_layers,
            phase2_layers,
            [s.exit_layer for s in phase1_stages],
            phase2_loss_weights,
            grow_init,
            not freeze_old_heads and kwargs.get("head_sharing", TransformerConfig.head_sharing) == "separate",
            phase2_lr_scale,
            phase1_max_epochs,
            phase2_max_epochs,
            phase1_patience,
            phase2_patience,
        )
        super().__init__(phases=phases, stages=phase1_stages, **kwargs)
        self.phase1_layers = phase1_layers
        self._save_plain_hyperparameters(inspect.currentframe())
