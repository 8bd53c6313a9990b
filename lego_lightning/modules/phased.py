"""``PhasedExitLM``: train a model through a plan of phases, in one ``fit``.

Each phase is a :class:`~lego_lightning.modules.phase.Phase`: its depth, its exits' loss
weights, what trains and at which learning rates, and which tokens carry the loss. When
:class:`~lego_lightning.callbacks.PerplexityEarlyStopping` finds a phase over (patience or
epoch limit), it hands the phase's best weights to :meth:`PhasedExitLM.advance_phase`, and
:meth:`PhasedExitLM.enter_phase` does everything a phase change means, in this order, in one
place: let checkpoint callbacks rank the ending phase's last validation with its own model
(``BestAndLastCheckpoint.rank_before_phase_change``), restore the best weights, fit the
learned exit classifier (when the phase needs it), calibrate a threshold and mine the hard
tokens (``tokens="hard"``), initialise the grown layers, set the loss weights, freeze and
unfreeze, set every parameter group's learning rate (in the optimizer and its scheduler, so
checkpoints carry it), log and print the change.

The hard-token set lives in the module (``hard_tokens``, one bit per training token, saved in
checkpoints) and its own training step applies it; no callback changes a batch.

Every layer the plan will reach is built up front: DDP cannot see modules added after it wraps
the model (DESIGN.md, known traps), so growth initialises a stage that was there, unused, all
along. Every weight the plan ever trains still requires a gradient when DDP wraps the model
(it then registers them all), and only those: a weight no phase trains is frozen at set-up. Each
phase's freeze is applied after, at ``on_train_start`` and at each phase change. A plan of more
than one phase needs ``strategy="ddp_find_unused_parameters_true"`` under DDP; a plan of one
phase (a draft exit's head alone, say) runs under plain ``ddp``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lego_lightning.callbacks.exit_classifier_training import fit_exit_classifier
from lego_lightning.callbacks.hard_example_mining import mine_hard_tokens, on_device, only_hard_targets
from lego_lightning.callbacks.phase_trigger import log_once
from lego_lightning.callbacks.quantile_threshold_calibration import calibrate_threshold
from lego_lightning.data.token_set import TokenSet
from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.config import Stage, as_stage, validate_stages
from lego_lightning.model.distillation import greedy_targets, linear_distillation
from lego_lightning.model.exits import ExitRule
from lego_lightning.model.lean_loss import IGNORE_INDEX, linear_cross_entropy
from lego_lightning.model.transformer import GROW_INITS
from lego_lightning.modules.phase import Phase, ResolvedPhase, Unit, as_phase, grown_stage_ends, resolve_plan
from lego_lightning.modules.supervised_exit import SupervisedExitLM, pretrained_depth, stages_or_rule


class PhasedExitLM(SupervisedExitLM):
    """An exit transformer trained through a list of :class:`~lego_lightning.modules.phase.Phase`.

    Args:
        phases: the plan; the first phase needs ``layers``. In a YAML config,
            ``model.init_args.phases``, a list of mappings with the fields of ``Phase`` (typed as
            mappings first so that ``--model.phases`` on the command line replaces the config's
            plan whole rather than merging into its phases field by field).
        stages: the first phase's stages over its ``layers`` (default one stage, one exit);
            each later phase that grows adds one stage with an exit after its last layer.
        exits: instead of ``stages``, a rule for the first phase's exits, resolved against its
            depth (:class:`~lego_lightning.model.exits.ExitRule`; see ``SupervisedExitLM``).
        pretrained: as ``SupervisedExitLM``'s; ``phases[0].layers`` may then be left out (the
            checkpoint's depth).
        calibration_bins: histogram resolution of hard-token thresholds.
        log_prefix: the folder of the phase's own logs (default ``phases``; the presets use
            ``progressive`` and ``ashem``).
        monitor, mode: what ends a phase (with its ``patience``) and picks the weights it hands on:
            a logged metric, lower better (``min``) or higher (``max``). ``{first}`` and ``{last}``
            stand for the first phase's shallowest and deepest exit, so that a config fits any
            depth: ``val/exit{first}/agree`` with ``max`` follows a draft exit's agreement with
            the final one (when only a draft exit trains, ``val/ppl`` cannot change).

        **kwargs: :class:`SupervisedExitLM`'s arguments (the model's sizes, the optimizer's
            settings, ``confidence``, ...) but ``n_layers``: the depth is the deepest phase's.

    Logged: ``{log_prefix}/phase`` every epoch; when a phase that mines tokens starts,
    ``{log_prefix}/hard_frac`` (the share of training tokens mined) and, where a threshold is
    calibrated (``hard``, ``disagree_soft``), ``{log_prefix}/threshold``,
    ``{log_prefix}/calibration_hard_frac`` and a histogram ``{log_prefix}/confidence`` (for
    ``disagree_soft``, of the draft's probability of the other exit's token); when a phase grows, ``growth/init`` (0
    identity, 1 copy, 2 random); ``phase/ended_at_epoch`` from the early-stopping callback.
    """

    log_prefix = "phases"

    def __init__(
        self,
        phases: list[dict[str, Any] | Phase],
        stages: Sequence[Stage] | None = None,
        exits: dict[str, Any] | str | list[int] | ExitRule | None = None,
        pretrained: str | None = None,
        calibration_bins: int = 65_536,
        log_prefix: str | None = None,
        monitor: str = "val/ppl",
        mode: Literal["min", "max"] = "min",
        **kwargs: Any,
    ) -> None:
        if isinstance(phases, (str, Mapping)) or not isinstance(phases, Sequence):
            raise TypeError(f"phases must be a list of Phase (or mappings), got {type(phases).__name__}")
        plan = [as_phase(p, i) for i, p in enumerate(phases)]
        if not plan:
            raise ValueError("phases must hold at least one phase, got an empty list")
        if plan[0].layers is None:
            if pretrained is None:
                raise ValueError(
                    "phases[0].layers=None is not allowed: the first phase needs its depth, e.g. layers: 2 (with "
                    "model.pretrained, None is the checkpoint's depth)"
                )
            plan[0] = replace(plan[0], layers=pretrained_depth(pretrained))
        if "n_layers" in kwargs:
            raise ValueError(
                f"n_layers={kwargs['n_layers']!r} is not an argument of {type(self).__name__}: the depth is each "
                "phase's layers (the deepest phase's is the model's)"
            )
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r} is not allowed: 'min' or 'max'")
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} is not allowed: the name of a logged metric such as 'val/ppl'")
        if not isinstance(calibration_bins, int) or calibration_bins < 2:
            raise ValueError(f"calibration_bins must be an integer >= 2, got {calibration_bins!r}")
        first_depth = plan[0].layers
        # A new name: the arguments as given are what save_hyperparameters reads from this frame at the end.
        first_stages = stages_or_rule(stages, exits, first_depth) or [Stage((1, first_depth))]
        first = validate_stages([as_stage(s) for s in first_stages], first_depth)
        grown, depth = [], first_depth
        for end in grown_stage_ends(plan):
            grown.append(Stage((depth + 1, end), loss_weight=0.0))
            depth = end
        super().__init__(n_layers=depth, stages=[*first, *grown], pretrained=pretrained, **kwargs)
        self.plan: list[ResolvedPhase] = resolve_plan(
            plan,
            self.config.exit_layers,
            [s.loss_weight for s in self.config.stages],
            learned_confidence=self.confidence == "learned",
            causal=self.config.causal,
            pretrained=pretrained is not None,
        )
        self._units = self._unit_parameters()
        for r in self.plan:
            if not any(self._units[u] & self._trainable_ids for u in r.trained):
                raise ValueError(
                    f"phases[{r.index}].train={r.phase.train} trains nothing: those parts are in stages with "
                    "trainable: false"
                )
        self.calibration_bins = calibration_bins
        exits = self.plan[0].exits
        try:
            self.monitor = monitor.format(first=exits[0], last=exits[-1])
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"monitor={monitor!r} is not allowed: a metric name, where only {{first}} and {{last}} are replaced"
            ) from None
        self.mode = mode
        if log_prefix is not None:
            self.log_prefix = log_prefix
        self.phase = 1
        self.phase_start_epoch = 0
        self.hard_tokens: TokenSet | None = None  # one bit per training token, set by a phase with hard tokens
        self._device_tokens: TokenSet | None = None
        self.exit_classifier_stats: dict[int, dict[str, float]] = {}  # per exit, from the last fit
        self.exit_loss_weights = self._loss_weights(self.plan[0])
        self._save_plain_hyperparameters(inspect.currentframe())

    def _save_plain_hyperparameters(self, frame: Any) -> None:
        super()._save_plain_hyperparameters(frame)
        if self.hparams.get("phases"):
            self.hparams["phases"] = [as_phase(p, i).to_dict() for i, p in enumerate(self.hparams["phases"])]

    @property
    def hard_mask(self) -> Tensor | None:
        """The hard-token set as ``(training blocks, T)`` bool, read into memory (small sets: tests, reports)."""
        return None if self.hard_tokens is None else self.hard_tokens.to_mask()

    # ---------------------------------------------------------------------------- the plan
    @property
    def num_phases(self) -> int:
        return len(self.plan)

    @property
    def current(self) -> ResolvedPhase:
        """The running phase, resolved (depth, exits, loss weights, what trains)."""
        return self.plan[self.phase - 1]

    @property
    def phase_max_epochs(self) -> int:
        return self.current.phase.max_epochs

    @property
    def phase_patience(self) -> int:
        return self.current.phase.patience

    @property
    def phase_min_delta(self) -> float:
        return self.current.phase.min_delta

    def has_next_phase(self) -> bool:
        return self.phase < self.num_phases

    @property
    def eval_exit_layers(self) -> tuple[int, ...]:
        """The exits of the running phase's depth (a grown exit joins when its phase starts)."""
        return self.current.exits

    def _loss_weights(self, r: ResolvedPhase) -> list[float]:
        return [r.loss_weights.get(k, 0.0) for k in self.config.exit_layers]

    def phase_loss_weights(self, number: int) -> list[float]:
        """The loss weight of every exit (shallowest first) in phase ``number`` (1-based)."""
        return self._loss_weights(self.plan[number - 1])

    def _unit_parameters(self) -> dict[Unit, set[int]]:
        """The ids of the parameters in each trainable part (a shared or tied weight is in several)."""
        model = self.model
        embedding = [model.tok_emb] + ([model.pos_emb] if model.pos_emb is not None else [])
        units: dict[Unit, set[int]] = {("embedding",): {id(p) for m in embedding for p in m.parameters()}}
        for i, block in enumerate(model.blocks, start=1):
            units[("layer", i)] = {id(p) for p in block.parameters()}
        for k in self.config.exit_layers:
            units[("exit", k)] = {id(p) for p in model.head(k).parameters()}
        return units

    @property
    def _trainable_ids(self) -> set[int]:
        """Parameters of stages with ``trainable: true`` (the others never train, in any phase)."""
        trainable = [s.trainable for s in self.config.stages]
        return {id(p) for stage, _, p in self.model.named_stage_parameters() if trainable[stage]}

    def _lr_scales(self, r: ResolvedPhase) -> dict[int, float]:
        """Each trained parameter's learning-rate scale in phase ``r`` (the first part that names it wins)."""
        scales: dict[int, float] = {}
        for unit, scale in r.trained.items():
            for pid in self._units[unit]:
                scales.setdefault(pid, scale)
        return scales

    def set_trainable(self) -> None:
        """``requires_grad`` as the running phase says: what it trains, and nothing else of the model."""
        trained = set(self._lr_scales(self.current)) & self._trainable_ids
        for param in self.model.parameters():
            param.requires_grad_(id(param) in trained)

    # ------------------------------------------------------------------------- entering a phase
    def apply_phase(self, number: int) -> None:
        """The trainer-free part of :meth:`enter_phase`: phase ``number``'s loss weights, its grown layers
        initialised, and its freeze. What a caller without a Trainer (a timed step) needs."""
        self.phase = number
        r = self.current
        self.exit_loss_weights = self._loss_weights(r)
        self._grow(r)
        self.set_trainable()

    def _grow(self, r: ResolvedPhase) -> bool:
        """Initialise the stage phase ``r`` grows (built up front, unused until now); whether there is one."""
        if r.depth == r.previous_depth:
            return False
        self.model.init_stage(self.model.stage_index(r.depth), r.phase.grow_init)
        return True

    def advance_phase(
        self, trainer: L.Trainer, best_weights: Mapping[str, Tensor] | None = None, why: str = ""
    ) -> None:
        """The phase protocol of :class:`~lego_lightning.callbacks.PerplexityEarlyStopping`: enter the next phase."""
        if not self.has_next_phase():
            raise RuntimeError(f"{type(self).__name__} has no phase after phase {self.phase}")
        self.enter_phase(self.phase + 1, trainer, best_weights, why)

    def enter_phase(
        self, number: int, trainer: L.Trainer, best_weights: Mapping[str, Tensor] | None = None, why: str = ""
    ) -> None:
        """Everything a phase change does, in order (module docstring). ``why`` says why the last one ended."""
        for callback in trainer.checkpoint_callbacks:  # the ending phase's last validation, with its own model
            rank = getattr(callback, "rank_before_phase_change", None)
            if callable(rank):
                rank(trainer)
        if best_weights is not None:
            self.load_state_dict(best_weights)
        ended = self.phase
        self.phase = number
        self.phase_start_epoch = trainer.current_epoch + 1
        r = self.current
        self.exit_loss_weights = self._loss_weights(r)
        self._set_learning_rates(trainer)
        if r.fit_classifier:
            # The exit's classifier learns whether its top token is right (no deeper exit is trained yet).
            self.exit_classifier_stats = fit_exit_classifier(trainer, self, target="correct")
        threshold = self.select_tokens(trainer)
        if self._grow(r):
            log_once(trainer, {"growth/init": float(GROW_INITS.index(r.phase.grow_init))})
        self.set_trainable()
        rank_zero_info(self.describe_phase(ended, why, threshold, trainer))

    def select_tokens(self, trainer: L.Trainer) -> float | None:
        """The running phase's training tokens (``Phase.tokens``), mined into ``hard_tokens``; the threshold
        mining used (``None`` when the phase trains on all tokens)."""
        r = self.current
        self._device_tokens = None
        if not r.mines:
            self.hard_tokens = None
            return None
        confidence = self._mining_confidence(r)
        if r.phase.tokens == "disagree":
            threshold = 0.5  # the measure is 1 where the two exits agree, 0 where they do not
        else:
            threshold = calibrate_threshold(
                trainer, self, confidence, r.phase.hard_ratio, self.calibration_bins, self.log_prefix
            )
        if r.phase.tokens == "hard" and r.phase.confidence is None:  # the routing measure: route with it
            self.routing_threshold = threshold
        self.hard_tokens = mine_hard_tokens(trainer, self, confidence, threshold)
        log_once(trainer, {f"{self.log_prefix}/hard_frac": self.hard_tokens.fraction()})
        return threshold

    def _mining_confidence(self, r: ResolvedPhase) -> Callable[[Tensor], Tensor]:
        """The per-token measure whose low values mining selects: confidence at ``hard_exit`` (``hard``), or
        whether / how much ``hard_exit`` agrees with ``agree_with`` (``disagree``, ``disagree_soft``)."""
        k = r.hard_exit
        if r.agree_with is not None:
            other = r.agree_with

            def agreement(input_ids: Tensor) -> Tensor:
                hidden = self.exit_hidden_states(input_ids, [k, other])
                # One exit's logits alive at a time: the reference is its greedy token before k's are computed.
                reference = self.model.head(other)(hidden.pop(other)).argmax(dim=-1, keepdim=True)
                logits = self.model.head(k)(hidden[k]).float()
                if r.phase.tokens == "disagree":
                    return (logits.argmax(dim=-1, keepdim=True) == reference).squeeze(-1).float()
                return logits.softmax(dim=-1).gather(-1, reference).squeeze(-1)

            return agreement
        if r.phase.confidence is None:
            return lambda input_ids: self.token_confidence(input_ids, k)
        measure = get_confidence(r.phase.confidence)
        return lambda input_ids: measure(self.model.head(k)(self.exit_hidden_states(input_ids, [k])[k]))

    def _set_learning_rates(self, trainer: L.Trainer) -> None:
        """Each group at ``lr * stage lr_scale * phase lr_scale``, in the optimizer and its scheduler."""
        r = self.current
        scales = self._lr_scales(r)
        lr = self.optim_settings["lr"]
        for optimizer in trainer.optimizers:
            bases = []
            for group in optimizer.param_groups:
                base = lr * group.get("lr_scale", 1.0) * scales.get(id(group["params"][0]), r.default_lr_scale)
                group["initial_lr"] = base
                bases.append(base)
            for config in trainer.lr_scheduler_configs:
                scheduler = config.scheduler
                if scheduler.optimizer is not optimizer:
                    continue
                scheduler.base_lrs = list(bases)
                lambdas = getattr(scheduler, "lr_lambdas", None)
                for i, group in enumerate(optimizer.param_groups):
                    factor = lambdas[i](scheduler.last_epoch) if lambdas else 1.0
                    group["lr"] = bases[i] * factor
            if not trainer.lr_scheduler_configs:
                for group, base in zip(optimizer.param_groups, bases):
                    group["lr"] = base

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The stage groups, each split where the plan gives its parts different rates in some phase."""
        groups = []
        signatures = [self._lr_scales(r) for r in self.plan]
        for group in super().optimizer_param_groups():
            split: dict[tuple[float, ...], list] = {}
            for param in group["params"]:
                key = tuple(s.get(id(param), r.default_lr_scale) for s, r in zip(signatures, self.plan))
                split.setdefault(key, []).append(param)
            if len(split) == 1:
                groups.append(group)
                continue
            for n, params in enumerate(split.values()):
                groups.append({**group, "params": params, "name": f"{group['name']}/{n}"})
        return groups

    def describe_phase(self, ended: int, why: str, threshold: float | None, trainer: L.Trainer) -> str:
        """The short block printed when a phase starts: why the last ended, the threshold, depth, freeze and rates."""
        r = self.current
        lines = [f"Phase {ended}/{self.num_phases} ended{': ' + why if why else ''}."]
        if threshold is not None:
            lines.append(self.describe_tokens(threshold))
        grown = (
            f", layers {r.previous_depth + 1}-{r.depth} new ({r.phase.grow_init})" if r.depth > r.previous_depth else ""
        )
        lines.append(f"Phase {self.phase}/{self.num_phases}: {r.depth} layers{grown}, exits {list(r.exits)}")
        lines.append(
            f"  trains: {self._parts(lambda p: p.requires_grad)}; frozen: {self._parts(lambda p: not p.requires_grad)}"
        )
        rates = sorted(
            {g["lr"] for o in trainer.optimizers for g in o.param_groups if any(p.requires_grad for p in g["params"])},
            reverse=True,
        )
        lines.append(f"  learning rates: {', '.join(f'{lr:.3g}' for lr in rates)}")
        return "\n".join(lines)

    def describe_tokens(self, threshold: float) -> str:
        """The line that says which training tokens the running phase mined."""
        r = self.current
        assert self.hard_tokens is not None
        share = f"{self.hard_tokens.fraction():.1%} of the training tokens"
        if r.phase.tokens == "disagree":
            return f"  tokens: where exit {r.hard_exit}'s greedy token is not exit {r.agree_with}'s, {share}"
        if r.phase.tokens == "disagree_soft":
            return (
                f"  tokens: where exit {r.hard_exit} gives exit {r.agree_with}'s greedy token a probability below "
                f"{threshold:.4g} (hard_ratio {r.phase.hard_ratio}), {share}"
            )
        ratio = r.phase.hard_ratio
        return f"  hard tokens: threshold {threshold:.4g} at exit {r.hard_exit} (hard_ratio {ratio}), {share}"

    def _parts(self, keep: Callable[[torch.nn.Parameter], bool]) -> str:
        """The parts of the running depth whose every parameter satisfies ``keep``, by name."""
        params = {id(p): p for p in self.model.parameters()}
        names = []
        for unit, ids in self._units.items():
            if (unit[0] == "layer" and unit[1] > self.current.depth) or (
                unit[0] == "exit" and unit[1] > self.current.depth
            ):
                continue
            if ids and all(keep(params[i]) for i in ids if i in params):
                names.append(" ".join(str(u) for u in unit))
        return ", ".join(names) or "nothing"

    # --------------------------------------------------------------------------------- training
    @property
    def _isolated_above(self) -> int | None:
        """With ``context="none"``, the layer above which each hard token runs alone."""
        r = self.current
        return r.hard_exit if r.phase.tokens == "hard" and r.phase.context == "none" else None

    def exit_hidden_states(
        self, input_ids: Tensor, exit_layers: Sequence[int], keep: Tensor | None = None
    ) -> dict[int, Tensor]:
        cut = self._isolated_above
        if cut is None or max(exit_layers) <= cut:
            return super().exit_hidden_states(input_ids, exit_layers, keep)
        below = super().exit_hidden_states(input_ids, [cut, *(k for k in exit_layers if k < cut)], keep)
        shallow = below[cut]
        out = {k: v for k, v in below.items() if k in exit_layers}
        x = shallow.flatten(0, 1).unsqueeze(1)  # every token a sequence of one
        token_keep = None if keep is None else keep.repeat_interleave(shallow.shape[1], dim=0)
        for layer in range(cut + 1, max(exit_layers) + 1):
            x = self._isolated_layer(layer, x, token_keep)
            if layer in exit_layers:
                out[layer] = x.squeeze(1).view_as(shallow)
        return {k: out[k] for k in exit_layers}

    def _isolated_layer(self, layer: int, x: Tensor, keep: Tensor | None) -> Tensor:
        """Layer ``layer`` over tokens that are sequences of one; ``keep`` ``(tokens, n_layers)``: layer dropout."""
        y = self.model.blocks[layer - 1](x, self.model.rotary)
        return y if keep is None else torch.where(keep[:, layer - 1, None, None], y, x)

    def exit_losses(self, input_ids: Tensor, targets: Tensor, keep: Tensor | None = None) -> dict[int, Tensor]:
        if self.current.distill:
            return self._distilled_losses(input_ids, targets, keep)
        cut = self._isolated_above
        if cut is None:
            return super().exit_losses(input_ids, targets, keep)
        # Only the mined tokens go through the layers above the cut, each alone (the research's cached states).
        weighted = [k for k, w in zip(self.config.exit_layers, self.exit_loss_weights) if w > 0]
        below = [k for k in weighted if k <= cut]
        hidden = super().exit_hidden_states(input_ids, [cut, *below], keep)
        losses = {k: self.exit_loss(k, hidden[k], targets) for k in below}
        flat_targets = targets.flatten()
        hard = flat_targets != IGNORE_INDEX
        x = hidden[cut].flatten(0, 1)[hard].unsqueeze(1)
        token_keep = None if keep is None else keep.repeat_interleave(targets.shape[1], dim=0)[hard]
        for layer in range(cut + 1, max(weighted) + 1):
            x = self._isolated_layer(layer, x, token_keep)
            if layer in weighted:
                losses[layer] = self.exit_loss(layer, x.squeeze(1), flat_targets[hard])
        return losses

    def _distilled_losses(self, input_ids: Tensor, targets: Tensor, keep: Tensor | None) -> dict[int, Tensor]:
        """Each weighted exit's loss, the share ``Phase.distill`` names of it toward the teacher exit.

        The teacher runs in the same pass (with layer dropout, skipping what the batch skips), its
        head without gradients; layers between the deepest weighted exit and the teacher then run
        for the teacher alone."""
        r = self.current
        teacher = r.distill_from
        weighted = [k for k, w in zip(self.config.exit_layers, self.exit_loss_weights) if w > 0]
        hidden = self.exit_hidden_states(input_ids, sorted({*weighted, teacher}), keep)
        teacher_head = self.model.head(teacher)
        with torch.no_grad():
            teacher_x = teacher_head.norm(hidden[teacher]).flatten(0, -2)
        flat = targets.flatten()
        losses = {}
        for k in weighted:
            share = r.distill.get(k, 0.0)
            data = self.exit_loss(k, hidden[k], targets) if share < 1 else None
            if share == 0:
                losses[k] = data
                continue
            head = self.model.head(k)
            x = head.norm(hidden[k]).flatten(0, -2)
            chunk = self.loss_chunk_size or x.shape[0]
            if r.phase.distill_target == "greedy":
                teacher_tokens = greedy_targets(teacher_x, teacher_head.proj.weight, flat, chunk)
                distilled = linear_cross_entropy(x, head.proj.weight, teacher_tokens, chunk)
            else:
                distilled = linear_distillation(
                    x, head.proj.weight, teacher_x, teacher_head.proj.weight, flat, r.phase.distill_temperature, chunk
                )
            losses[k] = share * distilled if data is None else (1 - share) * data + share * distilled
        return losses

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.hard_tokens is not None:
            targets = batch["targets"]
            self._device_tokens = on_device(self.hard_tokens, self._device_tokens, targets.device)
            batch = {**batch, "targets": only_hard_targets(targets, self._device_tokens.rows(batch["index"]))}
        return super().training_step(batch, batch_idx)

    # ---------------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        if stage == "fit":  # before DDP wraps the model, so it registers only what some phase trains
            ever = set().union(*(self._lr_scales(r) for r in self.plan)) & self._trainable_ids
            for param in self.model.parameters():
                param.requires_grad_(id(param) in ever)
        super().setup(stage)
        mines = any(r.mines for r in self.plan)
        if stage == "fit" and mines and not hasattr(getattr(self.trainer, "datamodule", None), "train_dataset"):
            raise TypeError(
                "a phase that mines tokens (tokens='hard', 'disagree' or 'disagree_soft') needs "
                "trainer.datamodule.train_dataset (a dataset of dicts with "
                "input_ids, targets and index), as TextDataModule and SyntheticDataModule give"
            )

    def _check_ddp_unused_parameters(self) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        plain = isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get(
            "find_unused_parameters", False
        )
        if plain and self.num_phases > 1:
            raise ValueError(
                f"a plan of {self.num_phases} phases changes which weights train as it goes; under DDP use "
                "strategy='ddp_find_unused_parameters_true' (plain 'ddp' fails at the first step after a change)"
            )
        super()._check_ddp_unused_parameters()

    def configure_callbacks(self) -> list[Callback]:
        from lego_lightning.callbacks import PerplexityEarlyStopping

        # It ends each phase (a PerplexityEarlyStopping on the Trainer is replaced by it, as Lightning does with
        # a module's callback of the same type) and hands the phase's best weights to advance_phase.
        stopping = PerplexityEarlyStopping(
            monitor=self.monitor, mode=self.mode, patience=self.phase_patience, restore_best_weights=True
        )
        return [stopping, *super().configure_callbacks()]

    def on_train_start(self) -> None:
        self.set_trainable()  # after DDP wrapped the model, which then knows every weight the plan trains
        trainer = self.trainer
        if trainer.global_step == 0 and self.phase == 1:
            self._set_learning_rates(trainer)
            if self.current.mines and self.hard_tokens is None:  # a pretrained model's first phase mines it
                threshold = self.select_tokens(trainer)
                assert threshold is not None
                rank_zero_info(f"Phase 1/{self.num_phases}:\n{self.describe_tokens(threshold)}")
        elif trainer.ckpt_path:
            r = self.current
            threshold = "" if self.routing_threshold is None else f", routing threshold {self.routing_threshold:.4g}"
            hard = "" if self.hard_tokens is None else f", {self.hard_tokens.fraction():.1%} of tokens hard"
            rank_zero_info(
                f"Resumed in phase {self.phase}/{self.num_phases} (epoch {trainer.current_epoch}, {r.depth} layers"
                f"{threshold}{hard})"
            )

    def train_description(self) -> str:
        """``Epoch 5 · phase 2/2, epoch 1/3``: the phase and its own epoch against its limit, never a negative total."""
        trainer = self.trainer
        in_phase = trainer.current_epoch - self.phase_start_epoch
        limit = self.phase_max_epochs
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:  # the trainer may end the run sooner
            limit = min(limit, trainer.max_epochs - self.phase_start_epoch)
        return f"Epoch {trainer.current_epoch} · phase {self.phase}/{self.num_phases}, epoch {in_phase + 1}/{limit}"

    def on_train_epoch_end(self) -> None:
        self.log(f"{self.log_prefix}/phase", float(self.phase), sync_dist=True)  # equal on every rank; no DDP warning

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["phase"] = {"phase": self.phase, "phase_start_epoch": self.phase_start_epoch}
        checkpoint["hard_tokens"] = None if self.hard_tokens is None else self.hard_tokens.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("phase")
        if state:
            phase = int(state["phase"])
            if not 1 <= phase <= self.num_phases:
                raise ValueError(
                    f"the checkpoint is in phase {phase} but this model's plan has {self.num_phases} phases: build "
                    "it with the plan it was trained with"
                )
            self.phase = phase
            self.phase_start_epoch = int(state["phase_start_epoch"])
        if checkpoint.get("routing_threshold") is not None:
            self.routing_threshold = checkpoint["routing_threshold"]
        # Earlier checkpoints kept the set as an (N, T) bool mask: in "hard_mask", or before the set
        # moved into the module, in a callback's state.
        state = checkpoint.get("hard_tokens", checkpoint.get("hard_mask"))
        if state is None:
            old = [v for k, v in checkpoint.get("callbacks", {}).items() if k.startswith("HardExampleMining")]
            state = old[0].get("hard_mask") if old else None
        self.hard_tokens = TokenSet.from_state(state)
        self._device_tokens = None
