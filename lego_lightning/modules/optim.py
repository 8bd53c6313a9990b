"""AdamW parameter groups per stage (discriminative learning rates) and warm-up schedules.

Each group carries ``lr_scale`` and starts at ``base_lr * lr_scale``; the schedule multiplies
every group's initial lr by the same factor, so layer-wise rates compose with any schedule
(the pattern of MAE's ``lr_decay.py``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from lego_lightning.model.transformer import ExitTransformer

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES = ("constant", "linear", "cosine")


def freeze_untrainable_stages(model: ExitTransformer) -> None:
    """Set ``requires_grad=False`` on the parameters of stages with ``trainable=False``.

    Call before the model is wrapped for distributed training.
    """
    trainable = [s.trainable for s in model.config.stages]
    for stage, _, param in model.named_stage_parameters():
        if not trainable[stage]:
            param.requires_grad_(False)


def param_groups(model: ExitTransformer, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """One group per (stage, decay), leaving out stages with ``trainable=False``.

    Matrices of linear layers decay; norms, biases and embeddings do not. Parameters frozen
    during training (``requires_grad=False``) stay in their group: they get no gradient, so
    AdamW skips them, and the groups keep one layout over the whole run, which is what lets a
    checkpoint taken after a freeze load its optimizer state.
    """
    stages = model.config.stages
    grouped: dict[tuple[int, bool], list] = {}
    for stage, name, param in model.named_stage_parameters():
        if not stages[stage].trainable:
            continue
        decay = param.ndim >= 2 and not name.startswith(("tok_emb.", "pos_emb."))
        grouped.setdefault((stage, decay), []).append(param)
    groups = []
    for (stage, decay), params in sorted(grouped.items()):
        first, last = stages[stage].layers
        scale = stages[stage].lr_scale
        groups.append(
            {
                "params": params,
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"layers{first}-{last}" + ("" if decay else "/no_decay"),
            }
        )
    return groups


class WarmupSchedule:
    """Learning-rate multiplier: linear warm-up, then constant, linear or cosine decay.

    A callable object (not a lambda) so ``LambdaLR.state_dict()`` stores its plain attributes
    and checkpoints load with ``weights_only=True``.
    """

    def __init__(self, kind: Schedule, warmup_steps: int, total_steps: int | None, min_lr_ratio: float) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"scheduler={kind!r} is not one of {SCHEDULES}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if kind != "constant" and (
            total_steps is None or not math.isfinite(total_steps) or total_steps <= warmup_steps
        ):
            raise ValueError(
                f"scheduler={kind!r} needs a finite number of training steps larger than warmup_steps={warmup_steps}, "
                f"got {total_steps}; set trainer.max_steps or trainer.max_epochs"
            )
        self.kind = kind
        self.warmup_steps = warmup_steps
        self.total_steps = int(total_steps) if total_steps is not None and math.isfinite(total_steps) else None
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        assert self.total_steps is not None
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        decay = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay
