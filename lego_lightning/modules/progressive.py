"""``ProgressiveExitLM``: train a shallow model, then grow layers on top and train only them, in one ``fit``.

Phase 1 trains layers ``1..phase1_layers`` with the given stages. When
:class:`~lego_lightning.callbacks.PerplexityEarlyStopping` ends phase 1 (patience or epoch
limit) it restores the phase's best weights and calls :meth:`advance_phase`; right after, at
the end of the same validation, :class:`~lego_lightning.callbacks.LayerExpansion` initialises
the new layers and :class:`~lego_lightning.callbacks.LayerFreeze` freezes the old ones. Phase 2
trains the new stage at ``phase2_lr_scale`` times the learning rate.

Every layer is built up front: DDP cannot see modules added after it wraps the model
(DESIGN.md, known traps), so growth initialises a stage that was there, unused, all along.
Under DDP this needs ``strategy="ddp_find_unused_parameters_true"``: each phase leaves some
weights without gradient.

The phase protocol (what the callbacks rely on): ``phase`` (1-based), ``phase_start_epoch``,
``phase_max_epochs``, ``phase_patience``, ``has_next_phase()``, ``advance_phase(trainer)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lego_lightning.model.config import Stage, as_stage, validate_stages
from lego_lightning.model.transformer import GROW_INITS, GrowInit
from lego_lightning.modules.supervised_exit import SupervisedExitLM


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class ProgressiveExitLM(SupervisedExitLM):
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

    The other arguments are :class:`SupervisedExitLM`'s. Logged: ``{log_prefix}/phase``.
    """

    log_prefix = "progressive"

    def __init__(
        self,
        vocab_size: int = 256,
        phase1_layers: int = 3,
        phase2_layers: int = 4,
        d_model: int = 64,
        n_heads: int = 4,
        d_ff: int | None = None,
        max_seq_len: int = 256,
        dropout: float = 0.0,
        positions: str = "learned",
        head_sharing: str = "shared",
        tie_embeddings: bool = False,
        stages: Sequence[Stage] | None = None,
        phase2_loss_weights: Sequence[float] | None = None,
        grow_init: GrowInit = "random",
        freeze_old_heads: bool = True,
        phase2_lr_scale: float = 0.1,
        phase1_max_epochs: int = 50,
        phase2_max_epochs: int = 50,
        phase1_patience: int = 1,
        phase2_patience: int = 1,
        routing_threshold: float | None = None,
        confidence: str = "max_prob",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        for name, value in (("phase1_layers", phase1_layers), ("phase2_layers", phase2_layers)):
            _positive(name, value)
        if phase2_layers <= phase1_layers:
            raise ValueError(
                f"phase2_layers={phase2_layers} must be larger than phase1_layers={phase1_layers}: "
                "phase 2 grows the model"
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
        phase1 = validate_stages([as_stage(s) for s in stages or [Stage((1, phase1_layers))]], phase1_layers)
        grown = Stage((phase1_layers + 1, phase2_layers), loss_weight=0.0)
        super().__init__(
            vocab_size=vocab_size,
            n_layers=phase2_layers,
            d_model=d_model,
            n_heads=n_heads,
            d_ff=d_ff,
            max_seq_len=max_seq_len,
            dropout=dropout,
            positions=positions,
            head_sharing=head_sharing,
            tie_embeddings=tie_embeddings,
            stages=[*phase1, grown],
            routing_threshold=routing_threshold,
            confidence=confidence,
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
        )
        weights2 = (
            [0.0] * len(phase1) + [1.0] if phase2_loss_weights is None else [float(w) for w in phase2_loss_weights]
        )
        if len(weights2) != self.num_exits or any(w < 0 for w in weights2) or not any(w > 0 for w in weights2):
            raise ValueError(
                f"phase2_loss_weights={list(weights2)} must hold {self.num_exits} weights >= 0 (one per exit "
                f"{self.config.exit_layers}), not all 0"
            )
        self.phase1_layers = phase1_layers
        self.phase_settings = {
            1: {"max_epochs": phase1_max_epochs, "patience": phase1_patience, "loss_weights": self.exit_loss_weights},
            2: {"max_epochs": phase2_max_epochs, "patience": phase2_patience, "loss_weights": weights2},
        }
        self.grow_init = grow_init
        self.phase2_lr_scale = phase2_lr_scale
        self.freeze_targets = self._default_freeze_targets(freeze_old_heads)
        self.phase = 1
        self.phase_start_epoch = 0
        self._save_plain_hyperparameters(inspect.currentframe())

    def _default_freeze_targets(self, freeze_old_heads: bool) -> list[str]:
        """Embeddings, the phase-1 layers and (with separate heads) the phase-1 heads, as module paths."""
        targets = ["model.tok_emb"] + (["model.pos_emb"] if self.model.pos_emb is not None else [])
        targets += [f"model.blocks.{i}" for i in range(self.phase1_layers)]
        if freeze_old_heads and self.config.head_sharing == "separate":
            targets += [f"model.heads.{i}" for i in range(self.num_exits - 1)]
        return targets

    # ---------------------------------------------------------------------------- phases
    @property
    def phase_max_epochs(self) -> int:
        return self.phase_settings[self.phase]["max_epochs"]

    @property
    def phase_patience(self) -> int:
        return self.phase_settings[self.phase]["patience"]

    def has_next_phase(self) -> bool:
        return self.phase < 2

    def advance_phase(self, trainer: L.Trainer) -> None:
        """Enter phase 2: the new exit's loss weights and the lower learning rate.

        Growth and freezing are the callbacks' part (right after this call). The learning
        rate scales in the optimizer and its scheduler, so checkpoints carry it.
        """
        if not self.has_next_phase():
            raise RuntimeError(f"{type(self).__name__} has no phase after phase {self.phase}")
        self.phase += 1
        self.phase_start_epoch = trainer.current_epoch + 1
        self.exit_loss_weights = list(self.phase_settings[self.phase]["loss_weights"])
        factor = self.phase2_lr_scale
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        for config in trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [lr * factor for lr in config.scheduler.base_lrs]

    def expand(self, init: str) -> None:
        """Initialise the grown stage (the ``LayerExpansion`` contract)."""
        self.model.init_stage(self.num_exits - 1, init)  # type: ignore[arg-type]

    @property
    def eval_exit_layers(self) -> tuple[int, ...]:
        """Phase 1 reports its own exits; the grown exit joins in phase 2."""
        exits = self.config.exit_layers
        return exits if self.phase >= 2 else exits[:-1]

    def configure_callbacks(self) -> list[Callback]:
        from lego_lightning.callbacks import LayerExpansion, LayerFreeze, PerplexityEarlyStopping

        # Early stopping first: it changes the phase at a validation's end, and the phase
        # callbacks after it act in the same hook, before ModelCheckpoint (always last) saves.
        return [
            PerplexityEarlyStopping(patience=self.phase_patience, restore_best_weights=True),
            LayerExpansion(init=self.grow_init, at_phase=2),
            LayerFreeze(modules=self.freeze_targets, at_phase=2),
            *super().configure_callbacks(),
        ]

    def on_train_epoch_end(self) -> None:
        self.log(f"{self.log_prefix}/phase", float(self.phase), sync_dist=True)  # equal on every rank; no DDP warning

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["phase"] = {"phase": self.phase, "phase_start_epoch": self.phase_start_epoch}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("phase")
        if state:
            self.phase = int(state["phase"])
            self.phase_start_epoch = int(state["phase_start_epoch"])
