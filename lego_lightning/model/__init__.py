"""Plain-PyTorch model: config, exit transformer, confidence measures, routing, FLOPs accounting."""

from lego_lightning.model.confidence import (
    ConfidenceMeasure,
    available_confidences,
    get_confidence,
    register_confidence,
)
from lego_lightning.model.config import Stage, TransformerConfig, validate_stages
from lego_lightning.model.routing import route
from lego_lightning.model.transformer import ExitTransformer

__all__ = [
    "ConfidenceMeasure",
    "ExitTransformer",
    "Stage",
    "TransformerConfig",
    "available_confidences",
    "get_confidence",
    "register_confidence",
    "route",
    "validate_stages",
]
