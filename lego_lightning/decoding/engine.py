"""The decoding engine: requests in a fixed number of slots, decoded together with continuous batching.

A program adds requests (:class:`Request`: a prompt and its own settings), calls :meth:`Engine.step`
and reads what each step verified. Each step first fills free slots with waiting requests
(prefilling their prompts and giving each its first token), then runs one round over every
request in a slot: a full-depth step, a routed step, or a self-speculative round where some
request drafts. A request that ends (its end token or its token limit) leaves its slot at the
end of the step, and the next waiting one takes it in the next, while the others go on decoding.

A request gets exactly the tokens it gets alone: every computation of a round is per request
(its own cache slot, its own positions, its own random stream), so what shares the batch, and
when the request joined, changes nothing but the speed. Memory is the slots' caches, whatever
the number of requests waiting.

Plain PyTorch, inference only; the model in eval mode. Nothing here imports Lightning.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence

import torch

from lego_lightning.decoding.auto import AutoDraft, DraftCosts, RoundTimes, SharedAcceptance, choose_together
from lego_lightning.decoding.cache import SlotCache, check_slots_fit
from lego_lightning.decoding.compiled import FixedShapePasses
from lego_lightning.decoding.policies import Routing, full_depth_step, prefill, routed_step, speculative_round
from lego_lightning.decoding.request import Completion, Event, Request
from lego_lightning.decoding.sampling import Sampling
from lego_lightning.decoding.state import Decoding
from lego_lightning.model.confidence import HiddenConfidence, confidence_measure
from lego_lightning.model.routing import check_threshold
from lego_lightning.model.transformer import ExitTransformer


class Engine:
    """Continuous batching over ``slots`` cache slots.

    Args:
        model: the model, in eval mode.
        slots: requests decoded at once; the cache holds this many.
        threshold: route every request (a token leaves at its first exit whose ``confidence``
            reaches it); ``None``: full depth, or self-speculative for requests with a draft exit.
        confidence: the measure of routing and of a request's ``draft_threshold``.
        hidden_confidence: a trained exit classifier, for ``confidence="learned"``.
        max_speculations: the most drafts any request may ask for a round (the cache keeps room
            for them past a request's last token).
        max_context: the most prompt and new tokens a request may have (default: the model's
            context); a smaller one makes a smaller cache.
        compile_backend: run the layers through ``torch.compile`` with this backend (``"inductor"``)
            at fixed shapes over every slot (:mod:`~lego_lightning.decoding.compiled`): one graph per
            kind of pass, none recompiled as requests come and go. ``None``: eager.
        draft_costs: the round costs that requests of ``draft_exit`` or ``num_speculations`` ``"auto"``
            choose by (:mod:`~lego_lightning.decoding.auto`), greedy and sampled alike, as they are;
            ``None``: measured on this engine's kind of rounds (:func:`measure_draft_costs`) the first time
            such a request comes, greedy or sampled as it decodes (once per model shape, device, slots and
            kind in a process), then corrected by what the engine's own rounds take
            (:class:`~lego_lightning.decoding.auto.RoundTimes`).

    ``add`` a request, ``step`` until ``busy`` is false, or ``run`` to do both::

        engine = Engine(model, slots=8)
        ids = [engine.add(Request(prompt, max_new_tokens=64, draft_exit=4)) for prompt in prompts]
        for event in engine.events():   # as the steps verify them
            print(event.id, event.tokens, event.finished)
    """

    def __init__(
        self,
        model: ExitTransformer,
        slots: int = 8,
        *,
        threshold: float | None = None,
        confidence: str = "max_prob",
        hidden_confidence: HiddenConfidence | None = None,
        max_speculations: int = 8,
        max_context: int | None = None,
        compile_backend: str | None = None,
        draft_costs: DraftCosts | None = None,
    ) -> None:
        cfg = model.config
        if not cfg.causal:
            raise ValueError("generate() needs a causal model; this one attends both ways (the masked objective)")
        if threshold is not None:
            check_threshold(threshold, "threshold")
        if not isinstance(max_speculations, int) or max_speculations < 0:
            raise ValueError(f"max_speculations={max_speculations!r}: allowed an integer >= 0")
        context = cfg.max_seq_len if max_context is None else max_context
        if not isinstance(context, int) or not 1 <= context <= cfg.max_seq_len:
            raise ValueError(f"max_context={max_context!r}: allowed 1..max_seq_len={cfg.max_seq_len}")
        self.model = model
        self.routing = Routing(threshold, confidence_measure(confidence, hidden_confidence), hidden_confidence)
        self.max_speculations = max_speculations
        self.max_context = context
        self._draft_costs = {False: draft_costs, True: draft_costs} if draft_costs is not None else {}
        self.round_times: dict[bool, RoundTimes] = {}  # measured costs, corrected as rounds run: by sampled
        self._steps = 0  # steps so far: requests choosing together probe by it, all in the same rounds
        # What its auto requests choosing both measured of each exit, greedy and sampled apart: the exit such a
        # request reads while at full depth (auto.SharedAcceptance).
        self.shared_acceptance = {False: SharedAcceptance(), True: SharedAcceptance()}
        ref = next(model.parameters())
        width = context + max_speculations + 1  # a round's drafts (or its padding) past a request's last token
        check_slots_fit(cfg, slots, width, ref.device, ref.dtype)
        self.cache = SlotCache(cfg, slots, width, ref.device, ref.dtype)
        if compile_backend is not None:
            self.cache.compiled = FixedShapePasses(model, self.cache, max_speculations + 1, compile_backend)
        self.slots: list[Decoding | None] = [None] * slots
        self.waiting: deque[tuple[int, Request]] = deque()
        self._ids = itertools.count()
        # What ran, summed over every round (the keys of speed.WORK; speed.decoding_flops counts their FLOPs).
        self.work: Counter = Counter()

    # ------------------------------------------------------------------------------------ requests
    def add(self, request: Request) -> int:
        """Queue ``request`` (checked first: a bad setting raises here, naming the field) and return its id."""
        request.check(self.model, self.routing.threshold is not None, self.max_speculations)
        if len(request.prompt) + request.max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) exceeds this engine's "
                f"max_context={self.max_context}"
            )
        request_id = next(self._ids)
        self.waiting.append((request_id, request))
        return request_id

    def cancel(self, request_id: int) -> Completion | None:
        """Stop a request, waiting or decoding; its slot is free for the next step. ``None`` if it is not here."""
        for entry in self.waiting:
            if entry[0] == request_id:
                self.waiting.remove(entry)
                return Completion(request_id, len(entry[1].prompt), [], [], "cancelled")
        for slot, row in enumerate(self.slots):
            if row is not None and row.id == request_id:
                self.slots[slot] = None
                return row.completion()
        return None

    @property
    def busy(self) -> bool:
        """Requests are waiting or decoding."""
        return bool(self.waiting) or any(row is not None for row in self.slots)

    @property
    def active(self) -> int:
        """Requests in a slot."""
        return sum(row is not None for row in self.slots)

    # ---------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def step(self) -> list[Event]:
        """Fill free slots with waiting requests, then one round over every request in a slot.

        At full depth the new prompts' prefill and everybody's next token are one pass (the weights
        are read once for both); otherwise the prompts are prefilled first, each with its first token,
        and the round then runs over every request. Returns one event per request that got tokens (in
        order), or ended, in this step.
        """
        events: dict[int, Event] = {}
        self._steps += 1
        rows = [row for row in self.slots if row is not None]
        self._choose_drafts(rows)
        if self.waiting and None in self.slots and self._one_pass(rows):
            new = self._take_waiting()
            self._round(rows, events, new)
            return list(events.values())
        while self.waiting and None in self.slots:
            self._admit(events)
        admitted = [row for row in self.slots if row is not None and row not in rows]
        self._choose_drafts(admitted)
        rows = [row for row in self.slots if row is not None]
        if rows:
            start = time.perf_counter()
            self._round(rows, events)  # it ends reading its tokens: on a GPU, synchronised
            self._time_round(rows, time.perf_counter() - start)
        return list(events.values())

    def _one_pass(self, rows: list[Decoding]) -> bool:
        """Whether this step's prefills run inside the round's passes: requests are decoding (a prefill with
        nothing beside it is a pass of its own anyway), nobody routes, and the rows draft from one exit at
        most this round (the new prompts run the layers below it beside the first draft step)."""
        exits = {row.draft_exit for row in rows} - {None}
        return bool(rows) and self.routing.threshold is None and len(exits) <= 1

    def draft_costs(self, row: Decoding) -> DraftCosts:
        """The round costs that ``row``, an ``auto`` request, chooses by: the engine's ``draft_costs``, or greedy
        or sampled ones measured the first time on its own prompt and sampling (sampling's work depends on how
        peaked the text's distributions are), corrected by the engine's rounds since (:meth:`_time_round`)."""
        sampled = row.generator is not None
        if sampled in self._draft_costs:
            return self._draft_costs[sampled]
        if sampled not in self.round_times:
            self.round_times[sampled] = RoundTimes(measure_draft_costs(
                self.model, len(self.slots), max(1, self.max_speculations), row.sampling if sampled else None,
                row.request.prompt,
            ))  # fmt: skip
        return self.round_times[sampled].costs

    def _time_round(self, rows: list[Decoding], seconds: float) -> None:
        """A round of ``auto`` requests in every slot, at one setting and one kind of decoding, took ``seconds``:
        into that kind's measured costs (a round of fewer rows, or of rows drafting apart, is not the table's)."""
        if len(rows) < len(self.slots) or any(row.auto is None for row in rows):
            return
        settings = {(row.draft_exit, row.num_speculations if row.draft_exit is not None else 0) for row in rows}
        sampled = rows[0].generator is not None
        times = self.round_times.get(sampled)
        if times is not None and len(settings) == 1 and all((row.generator is not None) == sampled for row in rows):
            times.observe(*settings.pop(), seconds)

    def _choose_drafts(self, rows: list[Decoding]) -> None:
        """Each ``auto`` request's draft exit and K for this round: together for those choosing both."""
        together = [row for row in rows if row.auto is not None and row.auto.allow_full and len(row.auto.lengths) > 1]
        if len(together) > 1:
            costs = self.draft_costs(next((r for r in together if r.generator is not None), together[0]))
            choice = choose_together(
                [row.auto for row in together], costs, [r.remaining for r in together], self._steps
            )
            for row in together:
                row.draft_exit, row.num_speculations = choice
        chosen = {id(row) for row in together} if len(together) > 1 else set()
        for row in rows:
            if row.auto is not None and id(row) not in chosen:
                costs = self.draft_costs(row)
                row.draft_exit, row.num_speculations = row.auto.choose(costs, row.remaining)

    def _take_waiting(self) -> list[Decoding]:
        """Waiting requests into the free slots (nothing run yet)."""
        free = [slot for slot, row in enumerate(self.slots) if row is None]
        rows = []
        for slot in free[: len(self.waiting)]:
            request_id, request = self.waiting.popleft()
            rows.append(Decoding.start(request_id, request, slot, self.cache.tokens.device))
            rows[-1].auto = AutoDraft.of(
                request, tuple(self.model.exit_layers[:-1]), self.max_speculations,
                self.shared_acceptance[rows[-1].generator is not None],
            )  # fmt: skip
            self.slots[slot] = rows[-1]
        return rows

    def events(self) -> Iterator[Event]:
        """Every event of every step until no request is left."""
        while self.busy:
            yield from self.step()

    def run(self) -> dict[int, Completion]:
        """Step until every request has ended; each one's completion by id."""
        return {event.id: event.completion for event in self.events() if event.completion is not None}

    def _admit(self, events: dict[int, Event]) -> None:
        """Waiting requests into the free slots: their prompts prefilled, each its first token."""
        rows = self._take_waiting()
        tokens, exit_position = prefill(self.model, self.cache, rows, self.routing)
        self._keep(rows, [[t] for t in self._write_next(rows, tokens, [0] * len(rows))], exit_position, events)

    def _round(self, rows: list[Decoding], events: dict[int, Event], new: list[Decoding] | None = None) -> None:
        """One round over ``rows``; ``new`` requests (taken from the queue, not prefilled) are prefilled in its
        passes and take their first token."""
        model, cache, new = self.model, self.cache, new or []
        if self.routing.threshold is not None:
            tokens, exit_position = routed_step(model, cache, rows, self.routing)
            self._keep(rows, [[t] for t in self._write_next(rows, tokens, [1] * len(rows))], exit_position, events)
            return
        if all(row.draft_exit is None for row in rows):  # new requests draft from their next round on
            tokens = full_depth_step(model, cache, rows, self.work, new)
            self.work["full_steps"] += len(rows)
            advance = [1] * len(rows) + [0] * len(new)  # a new request's length is its prompt's, set in the pass
            self._keep(rows + new, [[t] for t in self._write_next(rows + new, tokens, advance)], None, events)
            return
        result = speculative_round(model, cache, rows, self.routing, self.work, new)
        accepted = result.accepted.tolist()
        kept = result.kept.tolist()
        for row, n, made in zip(rows, accepted, result.drafts):
            row.drafts += made
            row.accepted += n
            row.refusals += n < made
            row.verifications += 1
            row.length += n + 1  # through the last kept draft; the round's own token is next
            if row.auto is not None and made:  # its exit's acceptance: n kept, then one refused or none
                row.auto.observe(row.draft_exit, n, n + (n < made))
        firsts = [] if result.first_tokens is None else [[t] for t in result.first_tokens.tolist()]
        self._keep(rows + new, [tokens[: n + 1] for tokens, n in zip(kept, accepted)] + firsts, None, events)

    def _write_next(self, rows: list[Decoding], tokens: torch.Tensor, advance: list[int]) -> list[int]:
        """Each row's new token at its next column (after moving its length by ``advance``); the tokens."""
        for row, step in zip(rows, advance):
            row.length += step
        dev = self.cache.tokens.device
        slots = torch.tensor([row.slot for row in rows], device=dev)
        self.cache.tokens[slots, torch.tensor([row.length for row in rows], device=dev)] = tokens
        return tokens.tolist()

    def _keep(
        self,
        rows: list[Decoding],
        tokens: list[list[int]],
        exit_position: torch.Tensor | None,
        events: dict[int, Event],
    ) -> None:
        """Each row keeps its new tokens (up to its end); events for them; rows that ended leave their slots."""
        last = len(self.model.exit_layers) - 1
        exits = [last] * len(rows) if exit_position is None else exit_position.tolist()
        for row, new, exit_index in zip(rows, tokens, exits):
            kept = row.take(new, exit_index)
            event = events.setdefault(row.id, Event(row.id, []))
            event.tokens += kept
            if row.finish_reason is not None:
                event.completion = row.completion()
                self.slots[row.slot] = None


_MEASURED: dict[tuple, DraftCosts] = {}


@torch.no_grad()
def measure_draft_costs(
    model: ExitTransformer,
    slots: int,
    cap: int,
    sampling: Sampling | None = None,
    prompt: Sequence[int] | None = None,
    repeats: int = 7,
) -> DraftCosts:
    """:class:`~lego_lightning.decoding.auto.DraftCosts` of real rounds on an engine of ``slots`` slots, every
    one continuing ``prompt`` (repeated or cut to at most 32 tokens; default: random tokens), greedy or with
    ``sampling``: drafting K = 1 and K = ``cap`` tokens from each exit before the last (a round grows linearly
    with K in between: K draft steps and K + 1 positions verified) and a full-depth step.

    Every setting is timed once per pass, ``repeats`` passes, each round rolled back after it (the rows'
    lengths set back), so all are timed at the same context and a slower second of the machine does not fall
    on one setting; the fastest of each counts. Timed the first time, then from this process's cache, once
    for greedy and once for sampled decoding: costs depend on the shapes, the device and the threads, not on
    the weights."""
    sampled = sampling is not None and not sampling.greedy
    ref = next(model.parameters())
    key = (repr(model.config), str(ref.device), ref.dtype, slots, cap, sampled, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    room = cap + 4  # a first token, a full-depth step, the longest round timed, and one more: nobody ends
    context = min(32, model.config.max_seq_len - room)
    if context < 1:
        raise ValueError(
            f"max_seq_len={model.config.max_seq_len} leaves no room to time a round of {cap} drafts after a "
            "prompt; give the engine draft_costs"
        )
    if prompt is None:
        prompt = torch.randint(0, model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    tokens = list(itertools.islice(itertools.cycle(int(t) for t in prompt), context))
    settings = {}
    if sampled:
        settings = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p, "seed": 0}
    engine = Engine(model, slots, max_speculations=cap, max_context=context + room)
    for _ in range(slots):
        engine.add(Request(tokens, max_new_tokens=room, **settings))
    engine.step()  # the prefill and a first full-depth step
    rows = [row for row in engine.slots if row is not None]
    kept = [(row.length, len(row.tokens)) for row in rows]
    settings_timed = [(e, K) for e in model.exit_layers[:-1] for K in sorted({1, cap})] + [(None, 0)]
    fastest = dict.fromkeys(settings_timed, float("inf"))
    for _ in range(repeats):
        for draft_exit, K in settings_timed:
            for row in rows:
                row.draft_exit, row.num_speculations = draft_exit, K
            if ref.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.step()  # a step ends reading its tokens: synchronised
            fastest[draft_exit, K] = min(fastest[draft_exit, K], time.perf_counter() - start)
            for row, (length, made) in zip(rows, kept):  # rolled back: the next round runs at the same context
                row.length = length
                del row.tokens[made:], row.exit_positions[made:]
    rounds = {}
    for e in model.exit_layers[:-1]:
        slope = (fastest[e, cap] - fastest[e, 1]) / (cap - 1) if cap > 1 else 0.0
        rounds[e] = tuple(fastest[e, 1] + slope * (K - 1) for K in range(1, cap + 1))
    _MEASURED[key] = DraftCosts(rounds, fastest[None, 0])
    return _MEASURED[key]
