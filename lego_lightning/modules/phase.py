"""A phase of training as data: :class:`Phase`, and the checks that turn a list of them into a plan.

A plan is a list of phases; the first one trains a fresh model, each later one may grow it
(``layers``), choose what trains (``train``) and at which learning rates (``lr_scale``), and
put the loss on the tokens an earlier exit is unsure of (``tokens="hard"``) or on those where
two exits disagree (``tokens="disagree"``, ``"disagree_soft"``), and train an exit on a deeper
exit's distribution instead of the data (``distill``). A phase ends
after ``patience`` validations without improvement or after ``max_epochs`` epochs, whichever
comes first (:class:`~lego_lightning.callbacks.PerplexityEarlyStopping` decides).
:class:`~lego_lightning.modules.PhasedExitLM` runs a plan.

What trains is a list of parts, each a string:

* ``"all"``: the embedding, every layer and every exit of the phase's depth;
* ``"new"``: the layers this phase grows and their exit (in the first phase: ``"all"``);
* ``"embedding"``; ``"layer K"``; ``"layers A-B"``; ``"exit K"``; ``"exits"`` (every exit of
  the phase's depth); ``"layers above exit K"`` (layers ``K+1`` to the phase's depth);
  ``"classifier"`` (fit the learned exit classifier when the phase starts, with
  ``confidence="learned"``).

Everything a phase does not name is frozen. Layers and exits are numbered from 1; an exit is
named by the layer it follows, or, so that a plan fits any depth (exits placed by rule), by
``first`` or ``last``: the phase's shallowest or deepest exit (``"exit first"``,
``"layers above exit first"``, ``loss_weights: {last: 1.0}``, ``hard_exit: first``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.config import is_int, is_number
from lego_lightning.model.transformer import GROW_INITS, GrowInit

Tokens = Literal["all", "hard", "disagree", "disagree_soft"]
Context = Literal["full", "none"]
DistillTarget = Literal["softmax", "greedy"]
TOKENS: tuple[str, ...] = get_args(Tokens)
CONTEXTS: tuple[str, ...] = get_args(Context)
DISTILL_TARGETS: tuple[str, ...] = get_args(DistillTarget)
# The token selections that mine a set of training tokens when the phase starts.
MINED: tuple[str, ...] = ("hard", "disagree", "disagree_soft")

# A trainable part of the model: ("embedding",), ("layer", i) or ("exit", k).
Unit = tuple[Any, ...]
_RANGE = re.compile(r"^layers?\s+(\d+)(?:\s*-\s*(\d+))?$")
_EXIT = re.compile(r"^exit\s+(\d+|first|last)$")
_ABOVE = re.compile(r"^layers\s+above\s+exit\s+(\d+|first|last)$")
# Exits named by their place instead of their layer, so that a plan fits any depth.
EXIT_NAMES = ("first", "last")
ExitRef = int | str


@dataclass(frozen=True)
class Phase:
    """One phase of a training plan. Every field has a default; a plan's first phase needs ``layers``.

    Args:
        max_epochs: the phase ends after this many epochs at most.
        patience: ...or after this many validations in a row without improvement (0: the first).
        min_delta: an improvement smaller than this does not count.
        layers: the model's depth during the phase; more than the previous phase's grows the
            model by one stage (with its own exit after the new last layer). ``None`` keeps the
            previous depth.
        grow_init: how the new layers start: ``identity`` (the grown model computes what the
            previous one did), ``copy`` (of the layers below) or ``random``.
        loss_weights: ``{exit layer (or first, last): weight}``; exits not named get 0. Default: the first
            phase's ``stages`` weights; later phases, only the deepest exit.
        train: the parts that train (module docstring); everything else is frozen. Default
            ``["all"]`` in the first phase, ``["new"]`` after.
        lr_scale: multiplies the learning rate of what trains (relative to the module's ``lr``,
            not to the previous phase): one number, or ``{part: scale}`` with parts of ``train``
            as keys (a part without a key gets 1.0), so new and unfrozen old layers can differ.
        tokens: which training tokens carry the loss, chosen once when the phase starts:
            ``all``; ``hard``: those whose confidence at ``hard_exit`` is below a threshold
            calibrated on held-out tokens so that ``hard_ratio`` of them fall below it (ASHEM);
            ``disagree``: those where ``hard_exit``'s greedy token differs from ``agree_with``'s
            (the drafts self-speculative decoding drafting at ``hard_exit`` loses);
            ``disagree_soft``: those where ``hard_exit``'s probability of ``agree_with``'s greedy
            token is below a threshold calibrated as ``hard``'s (``hard_ratio`` of held-out
            tokens below it).
        hard_ratio: the fraction of held-out tokens below the threshold, in (0, 1).
        hard_exit: the exit whose confidence is calibrated and mined (a layer, or ``first`` or
            ``last`` of this phase's exits); default the previous phase's deepest exit (in a
            first phase, which may mine a pretrained model, and with ``disagree*``: ``first``).
        agree_with: with ``disagree*``, the exit ``hard_exit`` is compared with (default
            ``last``, the model's output).
        confidence: the measure mined (``max_prob``, ``margin``, ``entropy``); default the
            module's, which also sets the routing threshold to the calibrated one.
        context: with hard tokens, ``full`` keeps each hard token's sequence as its context;
            ``none`` feeds the layers above ``hard_exit`` each hard token's state alone (the
            research's variant, SEEDS.md mistake 3).
        distill: the share of each exit's loss that is distillation toward ``distill_from``
            instead of cross-entropy with the data: one number for every trained exit, or
            ``{exit: share}`` (exits not named: 0), each in [0, 1]; 1 is distillation alone.
        distill_from: the teacher exit, deeper than every distilled one (default ``last``). Its
            forward runs without gradients, in the same pass.
        distill_target: ``softmax``: the KL divergence from the teacher's softmax at
            ``distill_temperature`` to the student's (times the temperature squared, Hinton's
            scaling); ``greedy``: cross-entropy with the teacher's greedy token.
        distill_temperature: the softmax temperature of ``softmax`` distillation, > 0.
    """

    max_epochs: int = 50
    patience: int = 1
    min_delta: float = 0.0
    layers: int | None = None
    grow_init: GrowInit = "identity"
    loss_weights: dict[ExitRef, float] | None = None
    train: list[str] | None = None
    lr_scale: float | dict[str, float] = 1.0
    tokens: Tokens = "all"
    hard_ratio: float = 0.5
    hard_exit: ExitRef | None = None
    confidence: str | None = None
    context: Context = "full"
    agree_with: ExitRef = "last"
    distill: float | dict[ExitRef, float] = 0.0
    distill_from: ExitRef = "last"
    distill_target: DistillTarget = "softmax"
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        # JSON and some YAML paths give layer numbers as strings ("2"), mapping keys always.
        for name in ("loss_weights", "distill"):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, {_as_layer(k): w for k, w in value.items()})
        for name in ("agree_with", "distill_from", "hard_exit"):
            object.__setattr__(self, name, _as_layer(getattr(self, name)))
        self.check("Phase")

    def check(self, where: str) -> None:
        """Field-by-field checks; errors start with ``where`` (``"Phase"`` or ``"phases[1]"``)."""

        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"{where}.{name}={getattr(self, name)!r} is not allowed: {allowed}")

        if not is_int(self.max_epochs) or self.max_epochs < 1:
            fail("max_epochs", "a positive integer")
        if not is_int(self.patience) or self.patience < 0:
            fail("patience", "an integer >= 0")
        if not is_number(self.min_delta) or self.min_delta < 0:
            fail("min_delta", "a finite number >= 0")
        if self.layers is not None and (not is_int(self.layers) or self.layers < 1):
            fail("layers", "a positive integer, or None to keep the previous phase's depth")
        if self.grow_init not in GROW_INITS:
            fail("grow_init", f"one of {GROW_INITS}")
        if self.loss_weights is not None:
            if not isinstance(self.loss_weights, Mapping) or not self.loss_weights:
                fail("loss_weights", "a non-empty mapping {exit layer: weight >= 0}")
            for k, w in self.loss_weights.items():
                if not _is_exit_ref(k) or not is_number(w) or w < 0:
                    fail("loss_weights", "a mapping {exit layer, first or last: finite weight >= 0}")
            if not any(w > 0 for w in self.loss_weights.values()):
                fail("loss_weights", "at least one weight > 0 (a phase must train some exit)")
        if self.train is not None and (
            isinstance(self.train, str) or not self.train or not all(isinstance(p, str) for p in self.train)
        ):
            fail("train", 'a non-empty list of parts such as ["layers 3-4", "exit 4"]')
        if isinstance(self.lr_scale, Mapping):
            if not all(isinstance(k, str) and is_number(v) and v > 0 for k, v in self.lr_scale.items()):
                fail("lr_scale", "a number > 0, or {part of train: number > 0}")
            unknown = sorted(set(self.lr_scale) - set(self.train or ()))
            if unknown:
                fail("lr_scale", f"keys among this phase's train parts {self.train}; {unknown} are not")
        elif not is_number(self.lr_scale) or self.lr_scale <= 0:
            fail("lr_scale", "a number > 0, or {part of train: number > 0}")
        if self.tokens not in TOKENS:
            fail("tokens", f"one of {TOKENS}")
        if not is_number(self.hard_ratio) or not 0.0 < self.hard_ratio < 1.0:
            fail("hard_ratio", "a number in (0, 1)")
        if self.hard_exit is not None and not _is_exit_ref(self.hard_exit):
            fail("hard_exit", "a positive layer number, first or last, or None for the previous phase's deepest exit")
        if self.confidence == "learned":
            fail("confidence", "a measure of the logits; leave it None to mine with the module's learned classifier")
        if self.confidence is not None:
            try:
                get_confidence(self.confidence)
            except ValueError as err:
                raise ValueError(f"{where}.confidence: {err}") from None
        if self.context not in CONTEXTS:
            fail("context", f"one of {CONTEXTS}")
        if self.context == "none" and self.tokens != "hard":
            fail("context", "'none' only with tokens='hard' (it says how hard tokens are fed)")
        if not _is_exit_ref(self.agree_with):
            fail("agree_with", "a positive layer number, first or last")
        compared = self.tokens in ("disagree", "disagree_soft")
        if compared and self.hard_exit is not None and self.hard_exit == self.agree_with:
            fail("agree_with", f"an exit other than hard_exit={self.hard_exit!r}: an exit never disagrees with itself")
        shares = self.distill.values() if isinstance(self.distill, Mapping) else [self.distill]
        if isinstance(self.distill, Mapping) and not all(_is_exit_ref(k) for k in self.distill):
            fail("distill", "a share in [0, 1], or {exit layer, first or last: share in [0, 1]}")
        if not all(is_number(w) and 0.0 <= w <= 1.0 for w in shares):
            fail("distill", "a share in [0, 1], or {exit layer, first or last: share in [0, 1]}")
        if not _is_exit_ref(self.distill_from):
            fail("distill_from", "a positive layer number, first or last")
        if self.distill_target not in DISTILL_TARGETS:
            fail("distill_target", f"one of {DISTILL_TARGETS}")
        if not is_number(self.distill_temperature) or self.distill_temperature <= 0:
            fail("distill_temperature", "a number > 0")
        if self.context == "none" and any(w > 0 for w in shares):
            fail("distill", "0 with context='none' (isolated hard tokens train on the data only)")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, safe for ``torch.load(weights_only=True)`` and YAML."""
        return asdict(self)


def as_phase(value: Phase | Mapping[str, Any], index: int) -> Phase:
    """A :class:`Phase` from itself or its dict form; errors name ``phases[index]``."""
    if isinstance(value, Phase):
        value.check(f"phases[{index}]")
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"phases[{index}] must be a Phase or a mapping, got {type(value).__name__}: {value!r}")
    names = {f.name for f in fields(Phase)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ValueError(f"phases[{index}] has unknown fields {unknown}; a phase has {sorted(names)}")
    try:
        return Phase(**value)
    except ValueError as err:
        raise ValueError(str(err).replace("Phase.", f"phases[{index}].", 1)) from None


@dataclass
class ResolvedPhase:
    """A phase with everything its neighbours and the model decide filled in (what the module runs)."""

    index: int  # 0-based
    phase: Phase
    depth: int
    previous_depth: int
    exits: tuple[int, ...]  # the exits of this depth
    loss_weights: dict[int, float]
    trained: dict[Unit, float] = field(default_factory=dict)  # unit -> lr scale
    default_lr_scale: float = 1.0  # for what does not train (it gets no gradient; any rate does)
    fit_classifier: bool = False
    hard_exit: int | None = None  # the exit mined (with tokens other than "all")
    agree_with: int | None = None  # the exit hard_exit is compared with (tokens "disagree*")
    distill: dict[int, float] = field(default_factory=dict)  # exit -> share of its loss that is distillation
    distill_from: int | None = None  # the teacher exit, when some exit distils

    @property
    def mines(self) -> bool:
        """Whether the phase selects a set of training tokens when it starts."""
        return self.phase.tokens != "all"


def parse_part(spec: str, where: str, resolved: ResolvedPhase) -> list[Unit]:
    """The units a ``train`` part names, checked against the phase's depth and exits."""
    text = " ".join(spec.lower().split())
    depth, previous = resolved.depth, resolved.previous_depth
    exits = resolved.exits
    if text == "all" or (text == "new" and resolved.index == 0):
        return [("embedding",), *(("layer", i) for i in range(1, depth + 1)), *(("exit", k) for k in exits)]
    if text == "new":
        if depth == previous:
            raise ValueError(
                f"{where}: 'new' names the layers this phase grows, but it keeps {depth} layers; name the parts "
                "instead, e.g. 'layers 1-2', 'exit 2'"
            )
        new = range(previous + 1, depth + 1)
        return [*(("layer", i) for i in new), *(("exit", k) for k in exits if k in new)]
    if text == "embedding":
        return [("embedding",)]
    if text == "exits":
        return [("exit", k) for k in exits]
    if text == "classifier":
        return []
    match = _RANGE.match(text)
    if match:
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if not 1 <= first <= last <= depth:
            raise ValueError(f"{where}: {spec!r} names layers {first}-{last}; this phase has layers 1..{depth}")
        return [("layer", i) for i in range(first, last + 1)]
    match = _EXIT.match(text)
    if match:
        return [("exit", exit_layer(match.group(1), exits, f"{where}: {spec!r}"))]
    match = _ABOVE.match(text)
    if match:
        k = exit_layer(match.group(1), exits, f"{where}: {spec!r}")
        if k == depth:
            raise ValueError(f"{where}: {spec!r} names no layer: exit {k} follows the phase's last layer")
        return [("layer", i) for i in range(k + 1, depth + 1)]
    raise ValueError(
        f"{where}: {spec!r} is not a part; allowed 'all', 'new', 'embedding', 'layer K', 'layers A-B', "
        "'exit K', 'exits', 'layers above exit K', 'classifier' (K a layer, first or last)"
    )


def exit_layer(ref: ExitRef, exits: Sequence[int], where: str) -> int:
    """The layer of the exit ``ref`` names among ``exits``: a layer number, ``first`` or ``last``."""
    if ref in EXIT_NAMES:
        return exits[0] if ref == "first" else exits[-1]
    k = int(ref)
    if k not in exits:
        raise ValueError(f"{where} is not an exit of this phase; its exits follow layers {tuple(exits)}")
    return k


def _as_layer(value: Any) -> Any:
    """A layer number written as text (``"2"``) as the number; anything else as it is."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _is_exit_ref(value: Any) -> bool:
    return (is_int(value) and value >= 1) or value in EXIT_NAMES


def grown_stage_ends(phases: Sequence[Phase]) -> list[int]:
    """The last layer of each stage the plan grows (one per phase that adds layers)."""
    ends, depth = [], phases[0].layers
    for i, phase in enumerate(phases[1:], start=1):
        layers = depth if phase.layers is None else phase.layers
        if layers < depth:  # type: ignore[operator]
            raise ValueError(
                f"phases[{i}].layers={layers} is smaller than the previous phase's {depth}: a plan never shrinks "
                "the model"
            )
        if layers > depth:  # type: ignore[operator]
            ends.append(layers)
        depth = layers
    return ends  # type: ignore[return-value]


def resolve_plan(
    phases: Sequence[Phase],
    exit_layers: Sequence[int],
    first_loss_weights: Sequence[float],
    learned_confidence: bool,
    causal: bool,
    pretrained: bool = False,
) -> list[ResolvedPhase]:
    """Fill in each phase's depth, exits, loss weights, trained parts and rates; errors name the phase.

    ``pretrained``: the model starts trained, so the first phase may mine tokens too."""
    resolved: list[ResolvedPhase] = []
    previous = 0
    for i, phase in enumerate(phases):
        where = f"phases[{i}]"
        depth = phase.layers if phase.layers is not None else previous
        exits = tuple(k for k in exit_layers if k <= depth)
        if phase.loss_weights is None:
            if i == 0:
                weights = {k: float(w) for k, w in zip(exit_layers, first_loss_weights) if k <= depth}
            else:
                weights = {exits[-1]: 1.0}
        else:
            bad = sorted(k for k in phase.loss_weights if k not in exits and k not in EXIT_NAMES)
            if bad:
                raise ValueError(
                    f"{where}.loss_weights names exits {bad} that this phase does not have; its exits follow "
                    f"layers {exits}"
                )
            weights = {exit_layer(k, exits, where): float(w) for k, w in phase.loss_weights.items()}
        r = ResolvedPhase(i, phase, depth, previous, exits, {k: weights.get(k, 0.0) for k in exits})
        train = phase.train if phase.train is not None else ["all" if i == 0 else "new"]
        scales = phase.lr_scale if isinstance(phase.lr_scale, Mapping) else {}
        default = float(phase.lr_scale) if not isinstance(phase.lr_scale, Mapping) else 1.0
        r.default_lr_scale = default
        for spec in train:
            for unit in parse_part(spec, f"{where}.train", r):
                r.trained.setdefault(unit, float(scales.get(spec, default)))
            if " ".join(spec.lower().split()) == "classifier":
                if not learned_confidence:
                    raise ValueError(f"{where}.train: 'classifier' needs the module's confidence='learned'")
                r.fit_classifier = True
        if not r.trained:
            raise ValueError(f"{where}.train={train} trains nothing but the classifier; name a part of the model")
        if phase.tokens in MINED:
            _resolve_mining(r, where, resolved[-1].exits[-1] if resolved else None, causal, pretrained)
            if phase.tokens == "hard" and learned_confidence and phase.confidence is None:
                r.fit_classifier = True  # the learned measure must know the exit before it calibrates
        _resolve_distillation(r, where)
        resolved.append(r)
        previous = depth
    return resolved


def _resolve_mining(r: ResolvedPhase, where: str, previous_deepest: int | None, causal: bool, pretrained: bool) -> None:
    """The exits a mining phase compares or calibrates (``hard_exit``, ``agree_with``), checked."""
    phase, exits = r.phase, r.exits
    if previous_deepest is None and not pretrained:
        raise ValueError(
            f"{where}.tokens={phase.tokens!r} needs a trained exit to mine at; the first phase trains the model from "
            "scratch (with model.pretrained it may mine)"
        )
    if not causal:
        raise ValueError(f"{where}.tokens={phase.tokens!r} needs objective='causal'")
    disagreement = phase.tokens != "hard"
    named = phase.hard_exit
    if named is None:
        named = "first" if disagreement or previous_deepest is None else previous_deepest
    hard_exit = exit_layer(named, exits, f"{where}.hard_exit={named}")
    if phase.context == "none" and not any(k > hard_exit and w > 0 for k, w in r.loss_weights.items()):
        raise ValueError(
            f"{where}.context='none' feeds layers above hard_exit={hard_exit} without context, but no exit "
            f"above it has a loss weight: {r.loss_weights}"
        )
    r.hard_exit = hard_exit
    if disagreement:
        other = exit_layer(phase.agree_with, exits, f"{where}.agree_with={phase.agree_with}")
        if other == hard_exit:
            raise ValueError(
                f"{where}.agree_with={phase.agree_with!r} is exit {other}, the same exit as hard_exit={named!r}: an "
                "exit never disagrees with itself; compare two different exits"
            )
        r.agree_with = other


def _resolve_distillation(r: ResolvedPhase, where: str) -> None:
    """Each distilled exit's share and the teacher, checked: every student shallower than its teacher."""
    phase = r.phase
    shares = phase.distill if isinstance(phase.distill, Mapping) else None
    if shares is None and not phase.distill:
        return
    teacher = exit_layer(phase.distill_from, r.exits, f"{where}.distill_from={phase.distill_from}")
    if shares is None:  # one share for every trained exit below the teacher
        distill = {k: float(phase.distill) for k, w in r.loss_weights.items() if w > 0 and k < teacher}
        if not distill:
            raise ValueError(
                f"{where}.distill={phase.distill} distils no exit: none with a loss weight is shallower than "
                f"distill_from={phase.distill_from!r} (exit {teacher}); loss weights {r.loss_weights}"
            )
    else:
        distill = {}
        for ref, share in shares.items():
            k = exit_layer(ref, r.exits, f"{where}.distill names exit {ref!r}, which")
            if k >= teacher:
                raise ValueError(
                    f"{where}.distill names exit {k}, which is not shallower than distill_from={phase.distill_from!r} "
                    f"(exit {teacher}): an exit distils toward a deeper one"
                )
            if share > 0 and r.loss_weights.get(k, 0.0) == 0:
                raise ValueError(f"{where}.distill names exit {k}, whose loss weight is 0: give it a loss weight")
            if share > 0:
                distill[k] = float(share)
    r.distill, r.distill_from = distill, teacher
