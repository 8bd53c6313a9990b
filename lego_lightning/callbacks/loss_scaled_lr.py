"""Loss-scaled learning rate (SDTrainer, SEEDS.md section 5): the step's lr is the scheduler's times ``L ** p``."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.optim import Optimizer

MODES = ("sd", "sd2")


class LossScaledLR(Callback):
    """Scale every parameter group's learning rate by the training loss for one optimizer step.

    After the scheduler has set a group's lr ``A'``, the step uses ``A'' = A' * L**p`` (``sd2``:
    larger steps when the loss is large) or ``A' / L**p`` (``sd``), where ``L`` is the step's
    training loss: averaged over gradient-accumulation micro-batches and over ranks, so every
    replica takes the same step. Right after the optimizer step, every group's lr is put back to
    what the scheduler set, so any schedule (constant, linear, cosine, chainable or not) keeps
    its shape.

    Args:
        mode: ``"sd2"`` multiplies by ``L**power``, ``"sd"`` divides.
        power: ``p``; the research used the cube root.
        min_scale, max_scale: clamp of the applied scale, so a loss spike cannot blow the lr up.
        warmup_steps: the scale moves linearly from 1 to its full value over these optimizer steps.

    A non-finite loss leaves the lr unscaled for that step and warns once; the number of such
    steps is kept in the checkpoint. Logged: ``train/lr_scale`` (beside ``lr-*`` from
    ``LearningRateMonitor``, which shows the scheduler's unscaled lr).

    Works with any LightningModule using automatic optimization and any torch optimizer, with
    one or several param groups. Not supported, and refused at ``setup``: manual optimization
    (there is no single "step's loss" Lightning can see). With fp16 AMP a step skipped for
    infinite gradients is restored at the end of the batch instead, after a chainable
    scheduler may have read the scaled lr; bf16 and fp32 have no skipped steps.
    """

    def __init__(
        self,
        mode: Literal["sd", "sd2"] = "sd2",
        power: float = 1 / 3,
        min_scale: float = 0.1,
        max_scale: float = 10.0,
        warmup_steps: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"LossScaledLR.mode={mode!r} is not one of {MODES}")
        if not math.isfinite(power) or power <= 0:
            raise ValueError(f"LossScaledLR.power must be a finite number > 0, got {power!r}")
        if not (0 < min_scale <= 1 <= max_scale) or not math.isfinite(max_scale):
            raise ValueError(
                "LossScaledLR needs 0 < min_scale <= 1 <= max_scale < inf, "
                f"got min_scale={min_scale}, max_scale={max_scale}"
            )
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"LossScaledLR.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.mode, self.power, self.min_scale, self.max_scale = mode, float(power), float(min_scale), float(max_scale)
        self.warmup_steps = warmup_steps
        self.skipped_nonfinite = 0
        self.last_scale = 1.0
        self._micro_losses: list[Tensor] = []
        self._scheduled_lrs: dict[int, list[float]] = {}
        self._hooks: list[Any] = []
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, power=self.power)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise ValueError(
                f"LossScaledLR needs automatic optimization; {type(pl_module).__name__} sets "
                "automatic_optimization=False. Scale the lr inside your own training_step instead."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            self._hooks.append(optimizer.register_step_post_hook(self._restore))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # ------------------------------------------------------------------------------------- hooks
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        # Lightning hands over each micro-batch's loss already divided by the accumulation
        # factor, so their sum is the step's mean loss.
        self._micro_losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        if not self._micro_losses:
            return
        loss = torch.stack(self._micro_losses).sum().float()
        self._micro_losses.clear()
        loss = trainer.strategy.reduce(loss, reduce_op="mean")  # every rank takes the same step
        scale = self.scale_for(float(loss), trainer.global_step)
        self._scheduled_lrs[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        self.last_scale = scale
        pl_module.log("train/lr_scale", scale, on_step=True, on_epoch=False)

    def _restore(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        scheduled = self._scheduled_lrs.pop(id(optimizer), None)
        if scheduled is not None:
            for group, lr in zip(optimizer.param_groups, scheduled):
                group["lr"] = lr

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for optimizer in trainer.optimizers:  # a step skipped by the AMP scaler never ran the post-hook
            self._restore(optimizer, (), {})

    # ------------------------------------------------------------------------------------- scale
    def scale_for(self, loss: float, step: int) -> float:
        """The factor applied at optimizer step ``step`` for a loss ``loss``."""
        if not math.isfinite(loss) or loss < 0:
            self.skipped_nonfinite += 1
            if not self._warned:
                warnings.warn(f"LossScaledLR: the loss is {loss}; this step keeps the scheduler's lr", stacklevel=2)
                self._warned = True
            return 1.0
        exponent = self.power if self.mode == "sd2" else -self.power
        full = math.inf if loss == 0 and exponent < 0 else loss**exponent  # inf is clamped to max_scale
        full = min(self.max_scale, max(self.min_scale, full))
        if self.warmup_steps and step < self.warmup_steps:
            return 1.0 + (full - 1.0) * step / self.warmup_steps
        return full

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_nonfinite": self.skipped_nonfinite, "last_scale": self.last_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_nonfinite = int(state_dict["skipped_nonfinite"])
        self.last_scale = float(state_dict["last_scale"])
