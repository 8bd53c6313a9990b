"""Lightning's model summary with its FLOPs column from our own count, per token, instead of zeros.

Lightning fills the column by running ``example_input_array`` through the model under
``FlopCounterMode``; our modules have no such input (a batch is a dict of token ids), so the
column read 0 everywhere. Here it holds :mod:`lego_lightning.model.flops`' count for one token:
the model row a forward at full depth through the last exit, each block's row one layer, each
head's row one head, attention over the mean context of the data's blocks. The modules put this
summary in place of the trainer's own when they are set up (:func:`use_counted_flops`), so
``enable_model_summary`` and ``max_depth`` keep working as in Lightning.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import ModelSummary as Summary

from lego_lightning.model import flops


def flops_per_token(pl_module: Any, seq_len: int) -> dict[str, float]:
    """FLOPs for one token of each part of a module holding an ``ExitTransformer`` as ``model``, by summary name."""
    cfg = pl_module.config
    context = flops.mean_context(seq_len, cfg.causal)
    layer, head = flops.layer_flops(cfg, context).total, flops.head_flops(cfg).total
    counted = {
        "model": flops.full_flops(cfg, context).total,
        "model.tok_emb": flops.embedding_flops(cfg).total,
        "model.blocks": cfg.n_layers * layer,
        "model.heads": head,  # a forward through the last exit runs one head
    }
    counted.update({f"model.blocks.{i}": layer for i in range(cfg.n_layers)})
    counted.update({f"model.heads.{i}": head for i in range(len(pl_module.model.heads))})
    return counted


class CountedFlopsSummary(Summary):
    """Lightning's summary whose FLOPs are ``counted`` per token (parts not in it: 0), with no forward pass."""

    def __init__(self, model: L.LightningModule, max_depth: int, counted: dict[str, float]) -> None:
        self._counted = counted
        super().__init__(model, max_depth)

    @property
    def flop_counts(self) -> dict[str, dict[Any, int]]:
        return {name: {"per token": int(self._counted.get(name, 0))} for name in self.layer_names}

    @property
    def total_flops(self) -> int:
        return int(self._counted.get("model", 0))


class _CountedFlops:
    """What both summaries (plain and Rich) change: the summary they build, and a line that says what FLOPs means."""

    _max_depth: int

    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Summary:
        return CountedFlopsSummary(
            pl_module, self._max_depth, flops_per_token(pl_module, self._seq_len(trainer, pl_module))
        )

    @staticmethod
    def _seq_len(trainer: L.Trainer, pl_module: Any) -> int:
        return getattr(trainer.datamodule, "seq_len", None) or pl_module.config.max_seq_len

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # type: ignore[misc]
        if self._max_depth:
            seq_len = self._seq_len(trainer, pl_module)
            rank_zero_info(
                f"FLOPs are counted per token (lego_lightning.model.flops): the model's row is a forward through "
                f"all {pl_module.config.n_layers} layers and the last exit, attention over a mean context of "
                f"{flops.mean_context(seq_len, pl_module.config.causal):g} tokens (blocks of {seq_len})"
            )


class ExitModelSummary(_CountedFlops, ModelSummary):
    """Lightning's ``ModelSummary`` with FLOPs counted per token."""


class ExitRichModelSummary(_CountedFlops, RichModelSummary):
    """Lightning's ``RichModelSummary`` with FLOPs counted per token."""


def use_counted_flops(trainer: L.Trainer) -> None:
    """Put the counted-FLOPs summary in place of the trainer's own (Lightning's plain or Rich one, with its
    settings); nothing when the trainer has none (``enable_model_summary=False``) or a summary class of the user's.

    Done in place, at set-up, rather than returned from ``configure_callbacks``: Lightning would then tell the
    user that a summary they never passed overrides theirs.
    """
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            cls = ExitRichModelSummary if type(callback) is RichModelSummary else ExitModelSummary
            trainer.callbacks[i] = cls(max_depth=callback._max_depth, **callback._summarize_kwargs)
