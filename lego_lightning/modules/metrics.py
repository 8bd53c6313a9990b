"""Token-level evaluation metrics for every exit and for the routed model.

Built on torchmetrics ``MeanMetric`` and ``SumMetric``, which sum values and counts across
ranks, so perplexity, accuracy and bits per byte under DDP equal those of one process over the
same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric


class ExitMetrics(nn.Module):
    """Mean NLL and accuracy per exit (also on hard and easy tokens), each exit's agreement with the deepest;
    routed NLL, accuracy and exit fractions."""

    def __init__(self, exit_layers: Sequence[int]) -> None:
        super().__init__()
        self.exit_layers = tuple(exit_layers)
        keys = [str(k) for k in self.exit_layers]
        self.nll = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.acc = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.agree = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.hard_nll = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.easy_nll = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.routed_frac = nn.ModuleDict({k: MeanMetric() for k in keys})
        self.routed_nll = MeanMetric()
        self.routed_acc = MeanMetric()
        # Bits per byte: the tokens scored and the UTF-8 bytes of text they cover.
        self.tokens = SumMetric()
        self.text_bytes = SumMetric()

    def update_exit(
        self, exit_layer: int, nll: Tensor, correct: Tensor, hard: Tensor | None = None, agree: Tensor | None = None
    ) -> None:
        """``hard`` ``(N,)`` marks tokens below the routing threshold at the first exit, when there is one;
        ``agree`` ``(N,)`` the tokens whose greedy token here is the deepest exit's."""
        key = str(exit_layer)
        self.nll[key].update(nll)
        self.acc[key].update(correct.float())
        if agree is not None:
            self.agree[key].update(agree.float())
        if hard is not None:
            # Zero weights keep every rank's update the same shape, also when a batch has no hard token.
            self.hard_nll[key].update(nll, hard.float())
            self.easy_nll[key].update(nll, (~hard).float())

    def update_routed(self, nll: Tensor, correct: Tensor, exit_position: Tensor, exit_layers: Sequence[int]) -> None:
        """``exit_position`` ``(N,)`` indexes ``exit_layers``, the exits that routing chose among."""
        self.routed_nll.update(nll)
        self.routed_acc.update(correct.float())
        for i, k in enumerate(exit_layers):
            self.routed_frac[str(k)].update((exit_position == i).float())

    def update_bytes(self, tokens: int, text_bytes: Tensor) -> None:
        """Every exit scored ``tokens`` targets that cover ``text_bytes`` bytes of text."""
        self.tokens.update(torch.tensor(float(tokens), device=text_bytes.device))
        self.text_bytes.update(text_bytes.sum().float())

    @property
    def has_routed(self) -> bool:
        return bool(self.routed_nll.update_count)

    def compute(self) -> dict[str, float]:
        """Plain floats, already reduced across ranks. Keys: ``exit{k}/loss|ppl|acc|agree|bpb`` and ``routed/...``."""
        out: dict[str, float] = {}
        # nats per token -> bits per byte: x tokens / (bytes * ln 2), lm-eval's wikitext convention.
        to_bpb = None
        if self.text_bytes.update_count:
            to_bpb = (self.tokens.compute() / (self.text_bytes.compute() * math.log(2))).item()
        for k in self.exit_layers:
            if not self.nll[str(k)].update_count:
                continue
            nll = self.nll[str(k)].compute()
            out[f"exit{k}/loss"] = nll.item()
            out[f"exit{k}/ppl"] = torch.exp(nll).item()
            out[f"exit{k}/acc"] = self.acc[str(k)].compute().item()
            if self.agree[str(k)].update_count:
                out[f"exit{k}/agree"] = self.agree[str(k)].compute().item()
            if to_bpb is not None:
                out[f"exit{k}/bpb"] = nll.item() * to_bpb
            for split, metric in (("hard", self.hard_nll[str(k)]), ("easy", self.easy_nll[str(k)])):
                # Decide on update_count, equal on every rank: compute() is a collective under DDP.
                # No hard (or easy) token anywhere gives 0/0, which is dropped.
                if metric.update_count:
                    value = torch.exp(metric.compute()).item()
                    if math.isfinite(value):
                        out[f"exit{k}/{split}_ppl"] = value
        if self.has_routed:
            nll = self.routed_nll.compute()
            out["routed/loss"] = nll.item()
            out["routed/ppl"] = torch.exp(nll).item()
            out["routed/acc"] = self.routed_acc.compute().item()
            if to_bpb is not None:
                out["routed/bpb"] = nll.item() * to_bpb
            for k in self.exit_layers:
                if self.routed_frac[str(k)].update_count:
                    out[f"routed/exit{k}_frac"] = self.routed_frac[str(k)].compute().item()
        return out

    def reset(self) -> None:
        for metric in self.modules():
            if isinstance(metric, (MeanMetric, SumMetric)):
                metric.reset()
