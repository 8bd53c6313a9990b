"""The training progress bar's description, given by a module (Lightning's TQDM and Rich bars).

Lightning's Rich bar shows ``Epoch N/max_epochs - 1``, which reads ``Epoch 5/-2`` when the
trainer has no epoch limit (``max_epochs=-1``, as a phased run has: its phases end it). A bar
draws its description at the start of every epoch, before any hook of the module runs, so a
description set from the module's own hooks came one frame late: the bar asks the module instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def follow_description(trainer: L.Trainer, describe: Callable[[], str | None]) -> None:
    """Make the trainer's training bar (Lightning's Rich or TQDM bar) show ``describe()`` from the first frame
    of every epoch; ``None`` from it keeps Lightning's own description."""
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar):
        lightnings = type(bar)._get_train_description.__get__(bar)
        bar._get_train_description = lambda epoch: describe() or lightnings(epoch)
    elif isinstance(bar, TQDMProgressBar):
        lightnings_start = type(bar).on_train_epoch_start.__get__(bar)

        def on_train_epoch_start(trainer: L.Trainer, *args: Any) -> None:
            text = describe()
            if text is None:
                return lightnings_start(trainer, *args)
            # Lightning's, with the description set before the reset draws the bar.
            if bar._leave:
                bar.train_progress_bar = bar.init_train_tqdm()
            bar.train_progress_bar.set_description(text, refresh=False)
            bar.train_progress_bar.reset(total=convert_inf(bar.total_train_batches))
            bar.train_progress_bar.initial = 0

        bar.on_train_epoch_start = on_train_epoch_start
