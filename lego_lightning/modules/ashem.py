"""``ASHEM``: Adaptive Supervision via Hard Example Mining (SEEDS.md section 2), end to end in one ``fit``.

A preset of :class:`~lego_lightning.modules.PhasedExitLM` with two phases. Phase 1 trains a
shallow model. When its validation perplexity stops improving, phase 2 starts
(:meth:`~lego_lightning.modules.PhasedExitLM.enter_phase`, in this order): phase 1's best
weights come back; with ``confidence="learned"`` the shallow exit's classifier is fitted; the
shallow exit's max-prob threshold is calibrated at ``hard_ratio`` on held-out tokens; every
training token below it is mined; the deep layers grow (identity-initialised by default, the
deep exit's head copied from the shallow one); the embeddings, shallow layers and shallow exit
freeze. Phase 2 trains the deep layers and exit at a tenth of the learning rate, on whole
sequences with the loss on hard tokens only. Validation in phase 2 reports both exits and the
routed two-stage model.

What the research did differently, kept as options so its effect can be measured:
``head_sharing="shared"`` with ``freeze_shallow_exit=False`` trains the shared head in phase 2
(the shallow exit's predictions drift; SEEDS.md mistake 4), and ``phase2_context="none"`` feeds
the deep layers each hard token's shallow state alone, without context (mistake 3).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Literal

from lego_lightning.model.config import HeadSharing
from lego_lightning.model.transformer import GrowInit
from lego_lightning.modules.phase import CONTEXTS
from lego_lightning.modules.phased import PhasedExitLM
from lego_lightning.modules.progressive import two_phase_plan


class ASHEM(PhasedExitLM):
    """Shallow model, hard-token mining, growth, frozen lower layers, two-stage routed inference.

    Args:
        phase1_layers: depth of the shallow model (research: 2).
        phase2_layers: depth after growth (research: 4).
        head_sharing: ``separate`` by default (unlike the other modules): the shallow exit's
            head stays frozen while the deep exit's trains.
        hard_ratio: fraction of held-out tokens below the calibrated threshold (research: 0.5).
        grow_init: ``identity`` (phase 2 starts from phase 1's best outputs), ``copy``, ``random``.
        freeze_shallow_exit: freeze the shallow exit's head in phase 2 (needs separate heads).
        phase2_context: ``full`` (each hard token keeps its sequence) or ``none`` (the
            research's isolated single states).
        phase2_lr_scale, phase1/2_max_epochs, phase1/2_patience: research defaults 0.1, 50,
            50, 1, 3.
        **kwargs: the model's sizes, ``confidence``, ``calibration_bins`` and the optimizer's
            settings, as :class:`~lego_lightning.modules.PhasedExitLM` takes them.
            ``confidence`` is ``max_prob`` (research), any registered measure, or ``learned``: a
            small classifier on the shallow exit's hidden state, trained when phase 1 ends, so
            tokens that continue to the deep exit skip the shallow head.

    Logged: ``ashem/phase``, ``ashem/threshold``, ``ashem/hard_frac``, a histogram
    ``ashem/confidence`` of shallow-exit confidences, and every metric of ``SupervisedExitLM``.
    """

    log_prefix = "ashem"

    def __init__(
        self,
        phase1_layers: int = 2,
        phase2_layers: int = 4,
        head_sharing: HeadSharing = "separate",
        hard_ratio: float = 0.5,
        grow_init: GrowInit = "identity",
        freeze_shallow_exit: bool = True,
        phase2_context: Literal["full", "none"] = "full",
        phase2_lr_scale: float = 0.1,
        phase1_max_epochs: int = 50,
        phase2_max_epochs: int = 50,
        phase1_patience: int = 1,
        phase2_patience: int = 3,
        **kwargs: Any,
    ) -> None:
        if isinstance(hard_ratio, bool) or not isinstance(hard_ratio, (int, float)) or not 0.0 < hard_ratio < 1.0:
            raise ValueError(f"ASHEM.hard_ratio must be in (0, 1), got {hard_ratio!r}")
        if phase2_context not in CONTEXTS:
            raise ValueError(f"ASHEM.phase2_context={phase2_context!r} is not one of {CONTEXTS}")
        if freeze_shallow_exit and head_sharing != "separate":
            raise ValueError(
                f"ASHEM.freeze_shallow_exit=True needs head_sharing='separate', got {head_sharing!r}: with one shared "
                "head, training the deep exit changes the shallow exit too"
            )
        phases = two_phase_plan(
            phase1_layers,
            phase2_layers,
            [phase1_layers],
            None,
            grow_init,
            not freeze_shallow_exit and head_sharing == "separate",
            phase2_lr_scale,
            phase1_max_epochs,
            phase2_max_epochs,
            phase1_patience,
            phase2_patience,
            tokens="hard",
            hard_ratio=float(hard_ratio),
            hard_exit=phase1_layers,
            context=phase2_context,
        )
        super().__init__(
            phases=phases,
            head_sharing=head_sharing,
            # What ASHEM fixes: one exit on the shallow model, the routing threshold calibrated
            # when phase 2 starts, next-token prediction.
            stages=None,
            routing_threshold=None,
            objective="causal",
            **kwargs,
        )
        self.phase1_layers = phase1_layers
        self._save_plain_hyperparameters(inspect.currentframe())

    @property
    def shallow_exit(self) -> int:
        return self.phase1_layers

    @property
    def deep_exit(self) -> int:
        return self.config.n_layers

    # ---------------------------------------------------------------------------- checkpoints, report
    def summary_table(self, metrics: dict[str, Any]) -> str:
        """The end-of-run report: every exit, hard and easy tokens, the routed model, its compute."""
        m = {k.removeprefix("val/"): float(v) for k, v in metrics.items()}
        lines = [
            f"ASHEM two-stage evaluation (phase {self.phase}, threshold {self.routing_threshold})",
            f"{'exit':<10}{'PPL':>12}{'acc':>10}{'hard PPL':>12}{'easy PPL':>12}{'tokens here':>13}{'bits/byte':>11}",
        ]

        def cell(key: str, width: int, spec: str) -> str:
            # Blank where there is nothing to show (no threshold yet: no hard and easy tokens), not nan.
            value = m.get(key, math.nan)
            return f"{'' if math.isnan(value) else format(value, spec):>{width}}"

        for k in self.eval_exit_layers:
            cells = (
                f"{'layer ' + str(k):<10}",
                cell(f"exit{k}/ppl", 12, ".2f"),
                cell(f"exit{k}/acc", 10, ".2%"),
                cell(f"exit{k}/hard_ppl", 12, ".2f"),
                cell(f"exit{k}/easy_ppl", 12, ".2f"),
                cell(f"routed/exit{k}_frac", 13, ".1%"),
                cell(f"exit{k}/bpb", 11, ".3f"),
            )
            lines.append("".join(cells))
        if "routed/ppl" in m:
            lines.append(
                f"{'routed':<10}{m['routed/ppl']:>12.2f}{m['routed/acc']:>10.2%}{'':>37}{cell('routed/bpb', 11, '.3f')}"
            )
            lines.append(
                f"compute of the routed model against the {self.config.n_layers}-layer model: "
                f"FLOPs of everything that runs {m['routed/flops_ratio']:.1%}, layers only (the research's measure) "
                f"{m['routed/layers_ratio']:.1%}"
            )
        return "\n".join(lines)
