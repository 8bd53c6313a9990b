"""Callbacks usable in any Lightning project that meets each one's documented contract."""

from lego_lightning.callbacks.checkpoint import BestAndLastCheckpoint
from lego_lightning.callbacks.exit_classifier_training import ExitClassifierTraining
from lego_lightning.callbacks.exit_diagnostics import ExitDiagnostics
from lego_lightning.callbacks.exit_weight_schedule import ExitWeightSchedule
from lego_lightning.callbacks.hard_example_mining import HardExampleMining
from lego_lightning.callbacks.layer_expansion import LayerExpansion
from lego_lightning.callbacks.layer_freeze import LayerFreeze
from lego_lightning.callbacks.loss_scaled_lr import LossScaledLR
from lego_lightning.callbacks.perplexity_early_stopping import PerplexityEarlyStopping
from lego_lightning.callbacks.quantile_threshold_calibration import QuantileThresholdCalibration
from lego_lightning.callbacks.random_state import RandomStateCheckpoint

__all__ = [
    "BestAndLastCheckpoint",
    "ExitClassifierTraining",
    "ExitDiagnostics",
    "ExitWeightSchedule",
    "HardExampleMining",
    "LayerExpansion",
    "LayerFreeze",
    "LossScaledLR",
    "PerplexityEarlyStopping",
    "QuantileThresholdCalibration",
    "RandomStateCheckpoint",
]
