"""Token-level evaluation metrics for every exit and for the routed model.

Built on torchmetrics ``MeanMetric``, which sums values and counts across ranks, so
perplexity and accuracy under DDP equal those of one process over the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric


class ExitMetrics(nn.Module):
    """Mean NLL and accuracy per exit; routed NLL, accuracy and the fraction leaving at each exit."""

    def __init__(self, exit_layers: Sequence[int]) -> None:
        super().__init__()
        self.exit_layers = tuple(exit_layers)
        keys = [str(k) for k in self.exit_layers]
        self.nll = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.acc = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.routed_frac = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.routed_nll = MeanMetric()
        self.routed_acc = MeanMetric()

    def update_exit(self, exit_layer: int, nll: Tensor, correct: Tensor) -> None:
        self.nll[str(exit_layer)].update(nll)
        self.acc[str(exit_layer)].update(correct.float())

    def update_routed(self, nll: Tensor, correct: Tensor, exit_position: Tensor) -> None:
        """``exit_position`` ``(N,)`` indexes ``exit_layers``."""
        self.routed_nll.update(nll)
        self.routed_acc.update(correct.float())
        for i, k in enumerate(self.exit_layers):
            self.routed_frac[str(k)].update((exit_position == i).float())

    @property
    def has_routed(self) -> bool:
        return bool(self.routed_nll.update_count)

    def compute(self) -> dict[str, float]:
        """Plain floats, already reduced across ranks. Keys: ``exit{k}/loss|ppl|acc`` and ``routed/...``."""
        out: dict[str, float] = {}
        for k in self.exit_layers:
            if not self.nll[str(k)].update_count:
                continue
            nll = self.nll[str(k)].compute()
            out[f"exit{k}/loss"] = nll.item()
            out[f"exit{k}/ppl"] = torch.exp(nll).item()
            out[f"exit{k}/acc"] = self.acc[str(k)].compute().item()
        if self.has_routed:
            nll = self.routed_nll.compute()
            out["routed/loss"] = nll.item()
            out["routed/ppl"] = torch.exp(nll).item()
            out["routed/acc"] = self.routed_acc.compute().item()
            for k in self.exit_layers:
                out[f"routed/exit{k}_frac"] = self.routed_frac[str(k)].compute().item()
        return out

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, MeanMetric):
                metric.reset()
