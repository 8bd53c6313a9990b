"""Freeze named submodules when a phase starts; the freeze survives resume."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import nn

from lego_lightning.callbacks.phase_trigger import PhaseTriggeredCallback


def find_modules(pl_module: L.LightningModule, names: Sequence[str]) -> list[nn.Module]:
    """The submodules at ``names`` (paths as in ``named_modules()``); a clear error for any that is missing."""
    modules = dict(pl_module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        top = sorted({n.split(".")[0] for n in modules if n})
        raise ValueError(
            f"LayerFreeze targets {missing} do not exist in {type(pl_module).__name__}; "
            f"targets are module paths as in named_modules(), e.g. under {top}"
        )
    return [modules[n] for n in names]


class LayerFreeze(PhaseTriggeredCallback):
    """When the module enters phase ``at_phase``, set ``requires_grad=False`` on the named submodules.

    That is at the end of the validation that changes the phase (or at the first training batch,
    for phase 1), see :class:`~lego_lightning.callbacks.phase_trigger.PhaseTriggeredCallback`.

    Frozen weights get no gradient, so the optimizer (AdamW, SGD...) skips them and no backward
    pass runs through a frozen prefix of the network. Works on any LightningModule; targets
    are paths as in ``named_modules()`` (``"model.blocks.0"``) and are checked at ``setup``,
    before training.

    Unlike Lightning's ``BackboneFinetuning``, which re-freezes on resume and never unfreezes,
    the freeze is part of this callback's checkpoint state and is re-applied while the
    checkpoint loads, before DDP wraps the model.

    Under DDP, freezing after the model is wrapped is valid only with
    ``find_unused_parameters=True`` (``strategy="ddp_find_unused_parameters_true"``); with
    plain ``ddp`` the next step fails. ``setup`` refuses that combination up front.
    """

    def __init__(self, modules: Sequence[str], at_phase: int = 2) -> None:
        modules = list(modules)
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"LayerFreeze.modules must be a non-empty list of module paths, got {modules!r}")
        super().__init__(at_phase)
        self.modules = modules

    @property
    def state_key(self) -> str:
        return self._generate_state_key(modules=self.modules, at_phase=self.at_phase)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        find_modules(pl_module, self.modules)
        from lightning.pytorch.strategies import DDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
            raise ValueError(
                "LayerFreeze changes which weights get gradients during training; under DDP that needs "
                "strategy='ddp_find_unused_parameters_true' (plain 'ddp' fails at the first step after the freeze)"
            )

    def apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in find_modules(pl_module, self.modules):
            module.requires_grad_(False)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = self._own_state(checkpoint)
        if state and state.get("applied"):
            self.apply(trainer, pl_module)
