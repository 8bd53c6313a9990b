"""lego_lightning: transformer language models built from stages with an exit after each.

Deep supervision, auxiliary losses, early exit, ASHEM, progressive growth, discriminative
and loss-scaled learning rates, as PyTorch Lightning modules and callbacks.
"""

from lego_lightning.model import ExitTransformer, Stage, TransformerConfig
from lego_lightning.modules import ASHEM, Phase, PhasedExitLM, ProgressiveExitLM, SupervisedExitLM

__all__ = [
    "ASHEM",
    "ExitTransformer",
    "Phase",
    "PhasedExitLM",
    "ProgressiveExitLM",
    "Stage",
    "SupervisedExitLM",
    "TransformerConfig",
]
__version__ = "0.1.0"
