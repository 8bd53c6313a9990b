"""The training progress bar's description, set by a module (Lightning's TQDM and Rich bars).

Lightning's Rich bar shows ``Epoch N/max_epochs - 1``, which reads ``Epoch 5/-2`` when the
trainer has no epoch limit (``max_epochs=-1``, as a phased run has: its phases end it).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


def show_train_description(trainer: L.Trainer, text: str) -> None:
    """Show ``text`` as the description of the training bar, if there is one now."""
    bar = trainer.progress_bar_callback
    if isinstance(bar, RichProgressBar):
        if bar.progress is not None and bar.train_progress_bar_id is not None:
            style = bar.theme.description
            bar.progress.update(bar.train_progress_bar_id, description=f"[{style}]{text}" if style else text)
    elif isinstance(bar, TQDMProgressBar) and bar._train_progress_bar is not None:
        bar.train_progress_bar.set_description(text, refresh=False)
