"""``draft_exit="auto"`` and ``num_speculations="auto"``: each request's draft exit and length, chosen every round.

The best fixed setting differs with the model, the batch, the decoding and the text, and a poor one
costs most of the gain. So a request that asks ``auto`` keeps its own running estimate of how often
each exit's draft would be kept (its *acceptance*), and before every round picks the exit and K
with the most expected tokens per second:

    tokens_per_verification(a_e, K) / round_seconds[e, K]    against    1 / full_step_seconds

from the engine's round costs (:class:`DraftCosts`, measured on its own rounds once per model shape,
device, batch size and kind of decoding, and cached; then corrected by what its rounds really take,
:class:`RoundTimes`) and the bound of
:mod:`~lego_lightning.decoding.speed`. Requests that share a round
and choose both the exit and K choose together (:func:`choose_together`): a round costs what its
slowest row costs, so one exit and one K for all of them. Not drafting at all is
one of the candidates (when the exit is ``auto``), kept unless drafting promises :data:`FULL_MARGIN`
more, so a request for which no exit pays decodes at full depth, and goes on measuring the exits,
which may pay later in its text.

Where the estimates come from, all from hidden states a round computes anyway:

* the exit a request drafted from: the round itself (drafts kept, and whether one was refused,
  the maximum-likelihood estimate of a geometric acceptance);
* the other exits, every ``probe_every`` rounds (the engine's, where requests choose together): a
  *probe*, of the exits that might beat the choice, within a budget (:meth:`AutoDraft.record`). A
  self-speculative round runs every layer over the positions it keeps (the layers up to the draft
  exit while drafting, those above while verifying) and a full-depth step runs every layer over its
  one position; each probed exit's head reads its hidden state there, at a row's first
  :data:`PROBE_POSITIONS` positions. Greedy, the acceptance is whether its token is the full
  model's; sampled, it is ``sum(min(p, q))``, the probability that speculative sampling keeps its
  draft. These head reads are counted in the engine's work
  (``probe_heads``).

Requests that choose both pool what they measure in their engine (:class:`SharedAcceptance`); one at
full depth reads the exit that pool says pays on its probe turns, beyond its budget: one hard first
token, which every exit misses, would otherwise leave it at full depth for most of its text.

Output stays exact: whatever a round chooses, greedy tokens are the full model's and sampled ones
follow speculative sampling. A request that chooses only one of the two depends only on its own
tokens and the engine's costs, so it gets the same tokens whatever shares its batch or came before it
(for the same costs: pass ``draft_costs`` to the engine to fix them). Requests that choose both do
not: they choose together, and read what the engine's pool says pays. Greedy, their tokens are still
the full model's; sampled with a seed, they are drawn from the same distribution but are not the
tokens they get alone (fix the exit or K where that matters).
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from lego_lightning.decoding.request import AUTO, Request

# A running estimate forgets: each observation weighs this much of the one after it, so a request follows
# its text when it changes (prose to a code block) within some tens of observations.
DECAY = 0.95
# Before any observation an exit is credited with this acceptance, weighted as this many observations, which
# age like real ones: a request whose drafts are all refused sees its estimate fall towards 0.
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.5, 1.0
# What the engine's requests that choose both measured of each exit is pooled (SharedAcceptance), each observation
# weighing this much of the next: slower to forget than a request's own estimate, since it stands for many texts.
SHARED_DECAY = 0.99
# Drafting is chosen over full depth where it promises this much more: the estimates are noisy and their
# probes cost, so where drafting and full depth are about as fast, full depth (which costs neither) is kept.
FULL_MARGIN = 1.05
# A probe reads an exit's head at a row's first positions of the round only: each more costs a head read.
PROBE_POSITIONS = 2
# Probes may spend this share of a request's rounds, counted in draft steps (each at most a head read and
# an exit's layers), a probe reading a head at PROBE_POSITIONS positions: on a model whose exits are all about
# as good, unbounded probes cost more than any switch could win. A head read costs more in time than in
# FLOPs (a small product, and its softmax when sampled). In a one-off A/B (not a committed benchmark), where no
# exit paid a tenth kept auto below full depth and a thirtieth did not; on a model that drafts, both did as well.
PROBE_SHARE = 0.03
# What the probes know of an exit they have not read for a while counts less, round by round, so its
# optimistic estimate rises until it is read again: the text may have changed under it.
AGING = 0.97
# An engine corrects its measured cost table by the median of this many of its latest rounds of each kind
# (drafting, full depth): enough that a second of a busy machine does not move it, few enough to follow the
# context as it grows.
CALIBRATION_ROUNDS = 16


@dataclass(frozen=True)
class DraftCosts:
    """Seconds of one round at one batch size: drafting K tokens from each exit and verifying them
    (``rounds[e][K - 1]``, K up to the engine's cap), and a full-depth step (``full``).

    Measured on the engine's own rounds (:func:`~lego_lightning.decoding.engine.measure_draft_costs`),
    everything a round does included: sampling, the acceptance test, the bookkeeping."""

    rounds: dict[int, tuple[float, ...]]
    full: float

    def tokens_per_second(self, draft_exit: int | None, num_speculations: int, acceptance: float) -> float:
        """Expected tokens per second of a round drafting ``num_speculations`` at ``draft_exit`` (``None``: a
        full-depth step), each draft kept with probability ``acceptance``."""
        if draft_exit is None:
            return 1.0 / self.full
        return expected_tokens(acceptance, num_speculations) / self.seconds(draft_exit, num_speculations)

    @cached_property
    def draft_step(self) -> float:
        """Seconds of the cheapest draft step: what one more K adds to the cheapest exit's round (half a round
        of one where K cannot grow)."""
        return max(1e-9, min(r[1] - r[0] if len(r) > 1 else r[0] / 2 for r in self.rounds.values()))

    def in_draft_steps(self, draft_exit: int | None, num_speculations: int) -> float:
        """A round's cost (``None``: a full-depth step) in :attr:`draft_step` units."""
        return self.seconds(draft_exit, num_speculations) / self.draft_step

    def seconds(self, draft_exit: int | None, num_speculations: int) -> float:
        """Seconds of a round drafting ``num_speculations`` at ``draft_exit`` (``None``: a full-depth step)."""
        return self.full if draft_exit is None else self.rounds[draft_exit][num_speculations - 1]

    def scaled(self, drafting: float, full: float) -> DraftCosts:
        """These costs with every drafting round's times ``drafting`` and the full-depth step's times ``full``."""
        return DraftCosts({e: tuple(drafting * s for s in r) for e, r in self.rounds.items()}, full * self.full)


@dataclass
class RoundTimes:
    """A measured cost table corrected by what an engine's rounds really take: ``costs``.

    The table is timed once, at a short context, on rows in step (one prompt, one random stream), and fastest
    of a few tries; the engine's own rounds run at longer contexts, on rows that drift apart, at the machine's
    speed of the minute. Where drafting and full depth are about as fast, a few percent of error in their ratio
    picks the slower. So the engine reports each round it ran at one setting over every slot
    (:meth:`observe`), and drafting rounds and full-depth steps are each scaled by the median ratio of what
    their latest :data:`CALIBRATION_ROUNDS` took to what the table says (1 before any)."""

    table: DraftCosts
    drafting: deque[float] = field(default_factory=lambda: deque(maxlen=CALIBRATION_ROUNDS))
    full: deque[float] = field(default_factory=lambda: deque(maxlen=CALIBRATION_ROUNDS))
    costs: DraftCosts = field(init=False)

    def __post_init__(self) -> None:
        self.costs = self.table

    def observe(self, draft_exit: int | None, num_speculations: int, seconds: float) -> None:
        """A round over every slot drafting ``num_speculations`` at ``draft_exit`` (``None``: a full-depth step)
        took ``seconds``."""
        ratios = self.full if draft_exit is None else self.drafting
        ratios.append(seconds / self.table.seconds(draft_exit, num_speculations))
        self.costs = self.table.scaled(*(statistics.median(r) if r else 1.0 for r in (self.drafting, self.full)))


@dataclass
class SharedAcceptance:
    """What an engine's ``auto`` requests choosing both the exit and K measured of each exit, pooled (each
    observation weighs :data:`SHARED_DECAY` of the next): which exit a request at full depth reads beyond its
    probes' budget (:meth:`AutoDraft.record`)."""

    kept: dict[int, float] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)

    def observe(self, draft_exit: int, kept: float, seen: float) -> None:
        self.kept[draft_exit] = self.kept.get(draft_exit, 0.0) * SHARED_DECAY**seen + kept
        self.seen[draft_exit] = self.seen.get(draft_exit, 0.0) * SHARED_DECAY**seen + seen

    def acceptance(self, draft_exit: int) -> float | None:
        """The pooled estimate of ``draft_exit``; ``None`` where no request has read it."""
        seen = self.seen.get(draft_exit, 0.0)
        return self.kept[draft_exit] / seen if seen > 0 else None


def expected_tokens(acceptance: float, num_speculations: int) -> float:
    """:func:`~lego_lightning.decoding.speed.tokens_per_verification` in closed form, ``(1 - a^(K+1)) / (1 - a)``:
    the choice evaluates it for every exit, K and request of a round, so it must cost next to nothing."""
    if acceptance >= 1.0:
        return num_speculations + 1.0
    return (1.0 - acceptance ** (num_speculations + 1)) / (1.0 - acceptance)


def best_length(
    acceptance: list[float], room: list[int], seconds: tuple[float, ...], lengths: tuple[int, ...]
) -> tuple[float, int]:
    """The K of ``lengths`` (ascending) with the most expected tokens per second for rows that each draft K from
    one exit, row ``r`` keeping each draft with probability ``acceptance[r]`` and at most ``room[r]`` of them
    (drafts past a request's end are never kept), in a round of ``seconds[K - 1]``; that rate and K (a rate of
    -1 where every K is above ``max(1, max(room))``).

    Row ``r`` expects ``sum(a^j for j <= min(K, room[r]))`` tokens (:func:`expected_tokens`): each K adds one
    power, so the choice costs a multiplication per row and K, not a call: it runs every round."""
    top = min(lengths[-1], max(1, max(room)))
    tokens = [0.0] * top  # by K - 1: the rows' expected tokens in all
    for a, n in zip(acceptance, room):
        power = total = 1.0
        for j in range(top):
            if j < n:
                power *= a
                total += power
            tokens[j] += total
    best, best_k = -1.0, lengths[0]
    for k in lengths:
        if top < k:
            break
        rate = tokens[k - 1] / seconds[k - 1]
        if rate > best:
            best, best_k = rate, k
    return best, best_k


@dataclass
class AutoDraft:
    """One request's running acceptance per exit and its choice of draft exit and K each round.

    Args:
        exits: the exits it may draft from (one, when only K is ``auto``).
        lengths: the K it may choose from (one, when only the exit is ``auto``).
        allow_full: not drafting is a candidate (the exit is ``auto``).
        probe_every: every this many rounds, the exits that might beat the choice are read at the round's
            positions, from the first round on, as far as the probes' budget goes (:meth:`record`).
        shared: the engine's pool, where the request chooses both: it adds what it measures, and reads the exit
            the pool says pays while it decodes at full depth (:meth:`record`); ``None``: it depends on no other
            request.
    """

    exits: tuple[int, ...]
    lengths: tuple[int, ...]
    allow_full: bool
    probe_every: int = 4
    shared: SharedAcceptance | None = None
    kept: dict[int, float] = field(default_factory=dict)  # decayed sums of acceptance, by exit
    seen: dict[int, float] = field(default_factory=dict)  # decayed counts of observations, by exit
    estimate: dict[int, float] = field(default_factory=dict)  # kept / seen, by exit: read every round
    rounds: int = 0
    last_read: dict[int, int] = field(default_factory=dict)  # the round each exit was last observed, by exit
    budget: float = PROBE_POSITIONS * 3  # what probes may spend, in draft steps (PROBE_POSITIONS an exit): 3 exits
    probing: tuple[int, ...] = ()  # the exits whose acceptance this round reads
    choices: list[tuple[int | None, int]] = field(default_factory=list)  # (exit or None, K) of every round

    @classmethod
    def of(
        cls, request: Request, exits: tuple[int, ...], cap: int, shared: SharedAcceptance | None = None
    ) -> AutoDraft | None:
        """What ``request`` may choose among (``exits``: the model's before the last; ``cap``: the engine's
        ``max_speculations``; ``shared``: the engine's pool, used where it chooses both), or ``None`` where it
        asks no ``auto``."""
        if AUTO not in (request.draft_exit, request.num_speculations):
            return None
        both = request.draft_exit == AUTO and request.num_speculations == AUTO
        return cls(
            exits if request.draft_exit == AUTO else (request.draft_exit,),
            tuple(range(1, cap + 1)) if request.num_speculations == AUTO else (request.num_speculations,),
            allow_full=request.draft_exit == AUTO,
            shared=shared if both else None,
        )

    def acceptance(self, draft_exit: int) -> float:
        """The running estimate: the prior's pseudo-observations and the real ones, each decayed by its age."""
        return self.estimate.get(draft_exit, PRIOR_ACCEPTANCE)

    def observe(self, draft_exit: int, kept: float, seen: float) -> None:
        """``seen`` more observations of ``draft_exit``, ``kept`` of which were (or would have been) accepted."""
        old_kept = self.kept.get(draft_exit, PRIOR_ACCEPTANCE * PRIOR_WEIGHT)
        self.kept[draft_exit] = old_kept * DECAY**seen + kept
        self.seen[draft_exit] = self.seen.get(draft_exit, PRIOR_WEIGHT) * DECAY**seen + seen
        self.estimate[draft_exit] = self.kept[draft_exit] / self.seen[draft_exit]
        self.last_read[draft_exit] = self.rounds
        if self.shared is not None:
            self.shared.observe(draft_exit, kept, seen)

    def best_rate(self, costs: DraftCosts, draft_exit: int, acceptance: float, remaining: int) -> tuple[float, int]:
        """The most expected tokens per second drafting from ``draft_exit`` at ``acceptance``, and its K."""
        return best_length([acceptance], [max(1, remaining - 1)], costs.rounds[draft_exit], self.lengths)

    def optimistic(self, draft_exit: int) -> float:
        """An upper estimate of ``draft_exit``'s acceptance: the running one plus one standard error of it, its
        observations aged by the rounds since the last (a handful of probed positions leaves it wide, many
        recent observations narrow)."""
        a = self.acceptance(draft_exit)
        n = self.seen.get(draft_exit, PRIOR_WEIGHT) * AGING ** (self.rounds - self.last_read.get(draft_exit, 0))
        return min(1.0, a + (a * (1.0 - a) / n) ** 0.5)

    def choose(self, costs: DraftCosts, remaining: int, clock: int | None = None) -> tuple[int | None, int]:
        """This round's exit (``None``: no drafts) and K, with the most expected tokens per second; recorded
        (``clock``: as in :meth:`record`)."""
        drafting, drafting_rate = (self.exits[0], self.lengths[0]), -1.0  # the best setting that drafts
        for e in self.exits:
            rate, K = self.best_rate(costs, e, self.acceptance(e), remaining)
            if rate > drafting_rate:
                drafting, drafting_rate = (e, K), rate
        full_rate = costs.tokens_per_second(None, 0, 0.0)
        full = self.allow_full and full_rate * FULL_MARGIN >= drafting_rate
        chosen_rate = full_rate if full else drafting_rate
        return self.record((None, 0) if full else drafting, costs, remaining, chosen_rate, clock)

    def record(
        self,
        choice: tuple[int | None, int],
        costs: DraftCosts,
        remaining: int,
        chosen_rate: float,
        clock: int | None = None,
    ) -> tuple[int | None, int]:
        """``choice`` is this round's, expected to give this request ``chosen_rate`` tokens per second; which
        exits the round probes, where the exit is chosen (a fixed one is measured by its own rounds).

        Every ``probe_every``-th round of ``clock`` (the engine's rounds, so that the requests of an engine
        probe in the same rounds and one read of each probed head serves them all; ``None``: the request's
        own rounds, from the first) reads the exits that might beat the choice: those whose rate at an
        optimistic acceptance (:meth:`optimistic`) is above ``chosen_rate``, the most promising first, as far
        as the budget goes: three exits' reads at the start, then :data:`PROBE_SHARE` of the cost of the
        request's rounds (:meth:`DraftCosts.in_draft_steps`), saved up to a read of every exit.
        So an exit known to lose is not read, one that is close or little seen is read until its estimate
        settles (at the start, unseen, the cheapest are the most promising), and a model whose exits all
        draft about as well pays a few percent for probes.

        A request at full depth that chooses both reads on those turns, beyond the budget and where its own
        probes read none, the exit its engine's pool says pays (:meth:`paying_by_the_pool`). At full depth a
        probe sees one position, so a request whose first reads all missed (a hard token every exit misses)
        otherwise stayed there for most of its text, though the engine's other requests knew an exit paid."""
        self.choices.append(choice)
        self.probing = ()
        draft_exit, K = choice
        saved = self.budget + PROBE_SHARE * costs.in_draft_steps(draft_exit, K)
        self.budget = min(saved, PROBE_POSITIONS * len(self.exits))
        turn = self.rounds if clock is None else clock
        if self.allow_full and turn % self.probe_every == 0 and self.budget >= PROBE_POSITIONS:
            others = [e for e in self.exits if e != draft_exit]
            rates = {e: self.best_rate(costs, e, self.optimistic(e), remaining)[0] for e in others}
            promising = sorted((e for e in rates if rates[e] > chosen_rate), key=rates.get, reverse=True)
            self.probing = tuple(promising[: int(self.budget // PROBE_POSITIONS)])
            self.budget -= PROBE_POSITIONS * len(self.probing)
        if draft_exit is None and not self.probing and self.allow_full and turn % self.probe_every == 0:
            self.probing = self.paying_by_the_pool(costs, remaining, chosen_rate)
        self.rounds += 1
        return choice

    def paying_by_the_pool(self, costs: DraftCosts, remaining: int, chosen_rate: float) -> tuple[int, ...]:
        """The exit whose rate at the engine's pooled acceptance beats ``chosen_rate`` by :data:`FULL_MARGIN`,
        the best such; none where there is no pool or no such exit."""
        if self.shared is None:
            return ()
        rates = {}
        for e in self.exits:
            a = self.shared.acceptance(e)
            if a is not None:
                rates[e] = self.best_rate(costs, e, a, remaining)[0]
        best = max(rates, key=rates.get, default=None)
        return (best,) if best is not None and rates[best] > chosen_rate * FULL_MARGIN else ()


def choose_together(
    autos: list[AutoDraft], costs: DraftCosts, remaining: list[int], clock: int | None = None
) -> tuple[int | None, int]:
    """One exit and K for requests that choose both and share a round (recorded in each, ``clock`` as in
    :meth:`AutoDraft.record`): the most expected tokens per second of the whole round.

    A round costs what its slowest row costs: every row waits for the longest draft, and rows drafting
    from different exits split the passes. So requests in a batch choose together, from the sum of the
    tokens each expects at its own acceptance, over the batch's cost (measured at the engine's slots).
    """
    exits = sorted(set.intersection(*(set(a.exits) for a in autos)))
    lengths = tuple(sorted(set.intersection(*(set(a.lengths) for a in autos))))
    room = [max(0, r - 1) for r in remaining]
    drafting, drafting_rate = (exits[0], lengths[0]), -1.0
    for e in exits:
        rate, K = best_length([a.acceptance(e) for a in autos], room, costs.rounds[e], lengths)
        if rate > drafting_rate:
            drafting, drafting_rate = (e, K), rate
    best = (None, 0) if len(autos) / costs.full * FULL_MARGIN >= drafting_rate else drafting
    for a, r in zip(autos, remaining):  # each probes the exits that might beat what it gets from the choice
        e, K = best
        if e is None:
            mine = 1 / costs.full
        else:
            mine = expected_tokens(a.acceptance(e), min(K, max(0, r - 1))) / costs.rounds[e][K - 1]
        a.record(best, costs, r, mine, clock)
    return best
