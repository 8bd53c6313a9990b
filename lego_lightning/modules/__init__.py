"""LightningModules."""

from lego_lightning.modules.ashem import ASHEM
from lego_lightning.modules.phase import Phase
from lego_lightning.modules.phased import PhasedExitLM
from lego_lightning.modules.progressive import ProgressiveExitLM
from lego_lightning.modules.supervised_exit import SupervisedExitLM

__all__ = ["ASHEM", "Phase", "PhasedExitLM", "ProgressiveExitLM", "SupervisedExitLM"]
