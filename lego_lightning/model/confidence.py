"""Named confidence measures for early exit.

Each measure maps an exit's logits ``(..., vocab)`` to a confidence in ``[0, 1]`` (higher means
more sure), so one ``routing_threshold`` in ``[0, 1]`` works with all of them. Each also states
what it costs per token beyond the head's logits, so compute accounting counts it.

New measures are added with :func:`register_confidence` without touching routing or training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# FLOPs per vocabulary element of a numerically stable softmax: max, subtract, exp, sum, divide.
SOFTMAX_FLOPS_PER_ELEMENT = 5

# A confidence from a hidden state, for measures that need no logits (a trained exit classifier):
# (exit_layer, (N, D)) -> (N,)
HiddenConfidence = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class ConfidenceMeasure:
    """A confidence function and its cost.

    Args:
        name: the name used in configs (``confidence: max_prob``).
        fn: ``logits (..., V) -> confidence (...)`` in ``[0, 1]``.
        flops_per_element: FLOPs per vocabulary element per token, softmax included.
        reads_hidden: the measure reads the exit's hidden state, not its logits (a learned exit
            classifier): a token that does not leave runs no head at that exit. Its cost is
            ``flops_per_hidden`` FLOPs per model dimension.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    flops_per_element: float = 0.0
    reads_hidden: bool = False
    flops_per_hidden: float = 0.0

    def __call__(self, logits: Tensor) -> Tensor:
        return self.fn(logits)

    def flops_per_token(self, vocab_size: int, d_model: int = 0) -> float:
        return self.flops_per_element * vocab_size + self.flops_per_hidden * d_model


def _max_prob(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def _margin(logits: Tensor) -> Tensor:
    top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def _entropy(logits: Tensor) -> Tensor:
    # 1 - H / log(V): 1 for a one-hot distribution, 0 for the uniform one.
    logp = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(dim=-1)
    return (1.0 - entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0)


_REGISTRY: dict[str, ConfidenceMeasure] = {}


def register_confidence(measure: ConfidenceMeasure) -> ConfidenceMeasure:
    """Make ``measure`` available by name to routing, configs and FLOPs accounting."""
    if measure.name in _REGISTRY:
        raise ValueError(f"a confidence measure named {measure.name!r} is already registered")
    _REGISTRY[measure.name] = measure
    return measure


def available_confidences() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_confidence(name: str) -> ConfidenceMeasure:
    """The measure registered under ``name``; a clear error lists the allowed names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"confidence={name!r} is not a known measure; allowed: {available_confidences()}") from None


def confidence_measure(name: str, hidden_confidence: HiddenConfidence | None) -> ConfidenceMeasure:
    """The measure named ``name``; a learned one needs its classifier, named before any work."""
    measure = get_confidence(name)
    if measure.reads_hidden and hidden_confidence is None:
        raise ValueError(
            f"confidence={name!r} reads each exit's hidden state through a trained ExitClassifier: pass it "
            "as hidden_confidence (a module built with confidence='learned' holds it: module.exit_classifier)"
        )
    return measure


def _needs_classifier(logits: Tensor) -> Tensor:
    raise TypeError(
        "confidence='learned' reads hidden states through a trained ExitClassifier, not logits; "
        "use a module built with confidence='learned' (it owns the classifier)"
    )


register_confidence(ConfidenceMeasure("max_prob", _max_prob, SOFTMAX_FLOPS_PER_ELEMENT + 1))
register_confidence(ConfidenceMeasure("margin", _margin, SOFTMAX_FLOPS_PER_ELEMENT + 2))
register_confidence(ConfidenceMeasure("entropy", _entropy, SOFTMAX_FLOPS_PER_ELEMENT + 3))
# A layer norm (7 per element), a dot product (2 per element) and a sigmoid: see exit_classifier.py.
register_confidence(ConfidenceMeasure("learned", _needs_classifier, reads_hidden=True, flops_per_hidden=9 + 4))
