"""Early stopping on validation perplexity that stops after exactly ``patience`` bad validations.

The research code stopped after 3 bad epochs with patience 1 (SEEDS.md section 3). This is
Lightning's ``EarlyStopping`` with the arguments checked up front and perplexity defaults:
its counter, state (saved in checkpoints, so a resumed run continues mid-patience) and
cross-rank decision are Lightning's own.

One default differs: the check runs right after each validation. Lightning checks at the end
of the training epoch when validation runs once per epoch, which fails on a missing metric
when a run ends mid-epoch (``max_steps``) before any validation.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import EarlyStopping


class PerplexityEarlyStopping(EarlyStopping):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` validations in a row.

    ``patience=0`` stops at the first validation without improvement (the research's
    character-level rule). Works with any LightningModule that logs ``monitor`` during
    validation; lower is better unless ``mode="max"``.
    """

    def __init__(
        self,
        monitor: str = "val/ppl",
        patience: int = 3,
        min_delta: float = 0.0,
        mode: str = "min",
        verbose: bool = False,
        check_on_train_epoch_end: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"PerplexityEarlyStopping.patience must be an integer >= 0, got {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"PerplexityEarlyStopping.min_delta must be a finite number >= 0, got {min_delta!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"PerplexityEarlyStopping.mode must be 'min' or 'max', got {mode!r}")
        if not monitor:
            raise ValueError("PerplexityEarlyStopping.monitor must name a logged metric, got an empty string")
        super().__init__(
            monitor=monitor,
            patience=patience,
            min_delta=min_delta,
            mode=mode,
            verbose=verbose,
            check_on_train_epoch_end=check_on_train_epoch_end,
            **kwargs,
        )
