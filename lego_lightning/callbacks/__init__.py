"""Callbacks usable in any Lightning project that meets each one's documented contract."""

from lego_lightning.callbacks.exit_weight_schedule import ExitWeightSchedule
from lego_lightning.callbacks.perplexity_early_stopping import PerplexityEarlyStopping

__all__ = ["ExitWeightSchedule", "PerplexityEarlyStopping"]
