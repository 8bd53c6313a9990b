"""Evaluate exits once, then sweep routing thresholds offline.

Each token's loss, correctness and confidence at every exit are collected in one pass; any
threshold's routed perplexity, accuracy, exit fractions and compute then follow without running
the model again. Single process: for benchmarks, notebooks and figures (validation during
training uses the module's own DDP-aware metrics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lego_lightning.model import flops
from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.lean_loss import IGNORE_INDEX
from lego_lightning.model.routing import route


@dataclass
class ExitOutputs:
    """Per-token results at each exit: ``(n_exits, N)`` tensors, exits in ``exit_layers`` order.

    ``predicted`` is each exit's greedy token. ``target_bytes`` is the UTF-8 bytes of text all
    ``N`` targets cover, when the batches carry it (causal text data): bits per byte are then the
    summed loss over those bytes.
    """

    exit_layers: tuple[int, ...]
    nll: Tensor
    correct: Tensor
    confidence: Tensor
    seq_len: int
    target_bytes: int | None = None
    predicted: Tensor | None = None

    def agreement(self, exit_layer: int, with_exit: int | None = None) -> float:
        """How often ``exit_layer``'s greedy token equals ``with_exit``'s (default the deepest exit collected).

        With the deepest exit this is the acceptance rate of greedy self-speculative decoding that
        drafts at ``exit_layer``: a drafted token is kept exactly when the full model picks it too.
        """
        if self.predicted is None:
            raise ValueError("these outputs hold no greedy tokens (collect_exit_outputs records them)")
        reference = self.exit_layers[-1] if with_exit is None else with_exit
        a, b = (self.predicted[self.exit_layers.index(k)] for k in (exit_layer, reference))
        return (a == b).float().mean().item()

    def exit_ppl(self, exit_layer: int, mask: Tensor | None = None) -> float:
        i = self.exit_layers.index(exit_layer)
        nll = self.nll[i] if mask is None else self.nll[i][mask]
        return math.exp(nll.mean().item())

    def exit_acc(self, exit_layer: int) -> float:
        return self.correct[self.exit_layers.index(exit_layer)].float().mean().item()

    def exit_bpb(self, exit_layer: int) -> float | None:
        """Bits per byte at one exit; ``None`` without ``target_bytes``."""
        return self.bits_per_byte(self.nll[self.exit_layers.index(exit_layer)])

    def bits_per_byte(self, nll: Tensor) -> float | None:
        """Bits per byte of per-token losses (nats) over all ``N`` targets; ``None`` without ``target_bytes``."""
        if self.target_bytes is None:
            return None
        return nll.double().sum().item() / math.log(2) / self.target_bytes


@torch.no_grad()
def collect_exit_outputs(
    module: Any, batches: Iterable[Any], exit_layers: Sequence[int] | None = None, confidence: str | None = None
) -> ExitOutputs:
    """Run ``module`` (a :class:`~lego_lightning.SupervisedExitLM`) over ``batches`` in eval mode.

    Confidences are the module's own (its learned classifier with ``confidence="learned"``)
    unless ``confidence`` names another measure.
    """
    exit_layers = tuple(module.eval_exit_layers if exit_layers is None else exit_layers)
    measure = None if confidence is None else get_confidence(confidence)
    was_training = module.training
    module.eval()
    nll, correct, conf, predicted = [], [], [], []
    seq_len = 0
    target_bytes: int | None = 0
    for batch_idx, batch in enumerate(batches):
        input_ids, targets = (t.to(module.device) for t in module.model_inputs(batch, batch_idx))
        seq_len = input_ids.shape[1]
        keep = targets.flatten() != IGNORE_INDEX
        if target_bytes is not None:  # a block's bytes cover all its targets: only a loss that keeps them all
            has_bytes = isinstance(batch, Mapping) and "target_bytes" in batch and bool(keep.all())
            target_bytes = target_bytes + int(batch["target_bytes"].sum()) if has_bytes else None
        y = targets.flatten()[keep]
        hidden = module.exit_hidden_states(input_ids, exit_layers)
        rows = []
        for k in exit_layers:
            h = hidden[k].flatten(0, 1)[keep]
            logits = module.model.head(k)(h).float()
            confidence_k = module.exit_confidence(k, h, logits) if measure is None else measure(logits)
            top = logits.argmax(-1)
            rows.append((F.cross_entropy(logits, y, reduction="none"), top == y, confidence_k, top.int()))
        nll.append(torch.stack([r[0] for r in rows]))
        correct.append(torch.stack([r[1] for r in rows]))
        conf.append(torch.stack([r[2] for r in rows]))
        predicted.append(torch.stack([r[3] for r in rows]))
    module.train(was_training)
    return ExitOutputs(
        exit_layers,
        torch.cat(nll, 1).cpu(),
        torch.cat(correct, 1).cpu(),
        torch.cat(conf, 1).cpu(),
        seq_len,
        target_bytes or None,
        torch.cat(predicted, 1).cpu(),
    )


def routed_metrics(outputs: ExitOutputs, threshold: float, cfg: Any, confidence: str = "max_prob") -> dict[str, Any]:
    """Routed perplexity, accuracy, exit fractions and compute at one threshold."""
    position = route(outputs.confidence, threshold)
    pick = position.unsqueeze(0)
    fractions = {k: 0.0 for k in cfg.exit_layers}
    for i, k in enumerate(outputs.exit_layers):
        fractions[k] = (position == i).float().mean().item()
    context = flops.mean_context(outputs.seq_len, cfg.causal)
    routed_nll = outputs.nll.gather(0, pick)
    return {
        "threshold": threshold,
        "ppl": math.exp(routed_nll.mean().item()),
        "bpb": outputs.bits_per_byte(routed_nll),
        "acc": outputs.correct.gather(0, pick).float().mean().item(),
        "fractions": fractions,
        "flops_ratio": flops.routed_flops_ratio(cfg, fractions, context, confidence),
        "layers_ratio": flops.layers_only_ratio(cfg, fractions),
    }


def threshold_sweep(
    outputs: ExitOutputs, cfg: Any, thresholds: Sequence[float], confidence: str = "max_prob"
) -> list[dict[str, Any]]:
    """:func:`routed_metrics` at every threshold."""
    return [routed_metrics(outputs, t, cfg, confidence) for t in thresholds]
