"""Grow the model when a phase starts."""

from __future__ import annotations

import lightning as L

from lego_lightning.callbacks.phase_trigger import PhaseTriggeredCallback, log_once
from lego_lightning.model.transformer import GROW_INITS


class LayerExpansion(PhaseTriggeredCallback):
    """When the module enters phase ``at_phase``, call ``pl_module.expand(init)``.

    That is at the end of the validation that changes the phase (or at the first training batch,
    for phase 1), see :class:`~lego_lightning.callbacks.phase_trigger.PhaseTriggeredCallback`.

    Contract: the LightningModule has ``expand(init: str)``, which brings the next stage into
    use with ``init`` in :data:`~lego_lightning.model.transformer.GROW_INITS`; ``identity`` must leave the
    model's outputs unchanged. Building that stage up front and initialising it here (with
    :meth:`~lego_lightning.model.ExitTransformer.init_stage`, what
    :class:`~lego_lightning.modules.PhasedExitLM` does itself) keeps DDP valid. A module that
    adds layers instead must do so before DDP wraps it, and rebuild its depth in
    ``on_load_checkpoint`` before weights load.

    Logged once: ``growth/init`` (0 identity, 1 copy, 2 random) at the step it acts.
    """

    def __init__(self, init: str = "identity", at_phase: int = 2) -> None:
        if init not in GROW_INITS:
            raise ValueError(f"LayerExpansion.init={init!r} is not one of {GROW_INITS}")
        super().__init__(at_phase)
        self.init = init

    @property
    def state_key(self) -> str:
        return self._generate_state_key(init=self.init, at_phase=self.at_phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "expand", None)):
            raise TypeError(
                f"LayerExpansion needs a LightningModule with expand(init); {type(pl_module).__name__} has none"
            )

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.expand(self.init)
        log_once(trainer, {"growth/init": float(GROW_INITS.index(self.init))})
