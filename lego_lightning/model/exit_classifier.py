"""Learned exit classifiers: a cheap confidence for early exit (CALM's learned classifier).

A token's confidence at an exit, from its hidden state alone: a layer norm and a dot product,
``~13 * d_model`` FLOPs, instead of the exit head's ``2 * d_model * vocab`` matrix product and
softmax. A token that continues then never runs the exit's head at all.

Trained with the model frozen, to predict whether the exit's top token equals the deepest
exit's (``target="consistency"``, as in CALM) or the true next token (``target="correct"``, when
there is no deeper exit yet, as in ASHEM's phase 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego_lightning.model.lean_loss import IGNORE_INDEX
from lego_lightning.model.transformer import ExitTransformer

Target = Literal["consistency", "correct"]
TARGETS: tuple[str, ...] = get_args(Target)


class ExitClassifier(nn.Module):
    """One small classifier per exit in ``exit_layers``: ``P(this exit's top token is right)``."""

    def __init__(self, d_model: int, exit_layers: Iterable[int]) -> None:
        super().__init__()
        self.exit_layers = tuple(exit_layers)
        self.nets = nn.ModuleDict(
            {str(k): nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 1)) for k in self.exit_layers}
        )

    def logit(self, exit_layer: int, hidden: Tensor) -> Tensor:
        return self.nets[str(exit_layer)](hidden).squeeze(-1)

    def forward(self, exit_layer: int, hidden: Tensor) -> Tensor:
        """Confidence in ``[0, 1]`` for every token: ``(..., D) -> (...)``."""
        return torch.sigmoid(self.logit(exit_layer, hidden).float())


def exit_classifier_labels(
    model: ExitTransformer, hidden: dict[int, Tensor], exit_layers: Iterable[int], targets: Tensor, target: Target
) -> dict[int, Tensor]:
    """Whether each token's top prediction at each exit is right (``(B, T)`` bool per exit)."""
    reference = (
        targets if target == "correct" else model.head(model.exit_layers[-1])(hidden[model.exit_layers[-1]]).argmax(-1)
    )
    return {k: model.head(k)(hidden[k]).argmax(-1) == reference for k in exit_layers}


def train_exit_classifier(
    model: ExitTransformer,
    classifier: ExitClassifier,
    batches: Iterable[tuple[Tensor, Tensor]],
    target: Target = "consistency",
    lr: float = 1e-3,
    reduce_gradients: Callable[[Tensor], Tensor] | None = None,
    epochs: int = 1,
) -> dict[str, Any]:
    """Fit ``classifier`` on ``(input_ids, targets)`` batches with ``model`` frozen.

    ``batches`` is iterated ``epochs`` times (a list, or anything that iterates again).
    ``reduce_gradients`` averages each gradient across processes (``trainer.strategy.reduce``)
    so every rank's classifier stays the same. Returns each exit's label rate and accuracy over
    the last pass.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r} is not one of {TARGETS}")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    was_training = model.training
    model.eval()
    classifier.train()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    for _ in range(epochs):
        stats = _train_one_pass(model, classifier, batches, target, optimizer, reduce_gradients)
    model.train(was_training)
    classifier.eval()
    return {
        k: {"label_rate": v["positives"] / max(v["tokens"], 1), "accuracy": v["correct"] / max(v["tokens"], 1)}
        for k, v in stats.items()
    }


def _train_one_pass(model, classifier, batches, target, optimizer, reduce_gradients) -> dict[int, dict[str, float]]:
    stats = {k: {"positives": 0.0, "correct": 0.0, "tokens": 0.0} for k in classifier.exit_layers}
    for input_ids, targets in batches:
        with torch.no_grad():
            hidden = model.hidden_states(input_ids)
            labels = exit_classifier_labels(model, hidden, classifier.exit_layers, targets, target)
        keep = targets != IGNORE_INDEX
        loss = torch.zeros((), device=input_ids.device)
        for k in classifier.exit_layers:
            logit = classifier.logit(k, hidden[k])[keep].float()
            label = labels[k][keep].float()
            loss = loss + F.binary_cross_entropy_with_logits(logit, label)
            stats[k]["positives"] += label.sum().item()
            stats[k]["correct"] += ((logit > 0).float() == label).sum().item()
            stats[k]["tokens"] += label.numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if reduce_gradients is not None:
            for p in classifier.parameters():
                if p.grad is not None:
                    p.grad.copy_(reduce_gradients(p.grad))
        optimizer.step()
    return stats
