"""What one round does to the requests in the slots: prefill, full depth, routed, self-speculative.

Each is a policy over the same cache and the same attention path (:func:`run_layers`), not a loop
of its own: the engine calls one per round for the requests that share the batch, and each
request's tokens depend only on its own state, so a request gets the same tokens whatever else
shares the round.

* :func:`prefill`: new prompts into free slots, every layer, and each one's first token.
* :func:`full_depth_step`: one token per request through every layer.
* :func:`routed_step`: one token per request, each leaving at its first exit whose confidence
  reaches the threshold; deeper layers get its keys and values from the state it carried up
  (CALM's state propagation).
* :func:`speculative_round`: LayerSkip's self-speculation, batched. Each request drafts up to its
  own K tokens with the layers up to its own draft exit and that exit's head, keeping the exit's
  hidden state at every drafted position; the layers above then verify all of them in one pass
  from those states (no lower layer runs twice for a token); the longest agreeing prefix is kept
  plus the full model's own next token. Greedy compares tokens; sampling keeps a draft with
  probability ``min(1, p / q)`` and otherwise draws from ``max(0, p - q)`` normalised (Leviathan
  et al. 2023), so the tokens follow the full model's distribution. A request without a draft
  exit rides along with no drafts: its round is a full-depth step.

Random draws: a sampled request draws a fixed number of uniforms per round (one, or ``2K + 1``
when it drafts: one per draft, one per acceptance test, one for the round's own token), from its
own generator, so its stream never depends on the batch.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor

from lego_lightning.decoding.attention import Packed, Pass, embed, run_layers, run_tapped
from lego_lightning.decoding.auto import PROBE_POSITIONS
from lego_lightning.decoding.cache import SlotCache
from lego_lightning.decoding.sampling import Sampling, draw
from lego_lightning.decoding.state import Decoding
from lego_lightning.model.confidence import ConfidenceMeasure, HiddenConfidence
from lego_lightning.model.transformer import ExitTransformer


@dataclass(frozen=True)
class Routing:
    """The engine's confidence rule: routing's threshold (``None``: no routing) and the measure that both
    routing and a draft's ``draft_threshold`` read (a learned one through ``hidden_confidence``)."""

    threshold: float | None
    measure: ConfidenceMeasure
    hidden_confidence: HiddenConfidence | None


# ---------------------------------------------------------------------------------------- choosing
def round_uniforms(rows: list[Decoding]) -> dict[int, Tensor]:
    """Each sampled row's uniforms for this round (by position in ``rows``): ``2K + 1`` when it drafts, else one."""
    out = {}
    for i, row in enumerate(rows):
        if row.generator is not None:
            count = 2 * row.num_speculations + 1 if row.draft_exit is not None else 1
            out[i] = torch.rand(count, generator=row.generator, device=row.generator.device)
    return out


def by_sampling(rows: list[Decoding], members: list[int]) -> dict[Sampling, list[int]]:
    """``members`` (positions in ``rows``) grouped by their sampling settings, in order."""
    groups: dict[Sampling, list[int]] = {}
    for k, i in enumerate(members):
        groups.setdefault(rows[i].sampling, []).append(k)
    return groups


def choose(
    rows: list[Decoding],
    members: list[int],
    logits: Tensor,
    u: Callable[[int], Tensor],
    keep: Callable[[Tensor, Tensor], None] | None = None,
) -> Tensor:
    """A token per row of ``logits`` ``(n, V)``, row ``k`` being ``rows[members[k]]``'s: its argmax, or a draw
    with the uniform ``u(members[k])``. ``keep(rows, probs)`` receives the distributions drawn from (a draft's
    ``q``, for its acceptance test), with their rows' positions in ``rows``."""
    groups = by_sampling(rows, members)
    if len(groups) == 1 and next(iter(groups)).greedy:
        return logits.argmax(-1)
    out = torch.empty(len(members), dtype=torch.long, device=logits.device)
    for sampling, ks in groups.items():
        index = torch.tensor(ks, device=logits.device)
        part = logits.index_select(0, index)
        if sampling.greedy:
            out[index] = part.argmax(-1)
            continue
        probs = sampling.probabilities(part)
        if keep is not None:
            keep(torch.tensor([members[k] for k in ks], device=logits.device), probs)
        out[index] = draw(probs, torch.stack([u(members[k]) for k in ks]))
    return out


# ----------------------------------------------------------------------------------------- passes
def ragged_layers(
    model: ExitTransformer,
    cache: SlotCache,
    x: Tensor,
    p: Pass,
    bottom: list[int],
    top: list[int],
    Q: int,
    kept: dict[int, Tensor] | None = None,
    taps: Collection[int] = (),
) -> Tensor:
    """Row ``r`` of ``x`` ``(R, Q, D)`` through layers ``bottom[r]..top[r]``: one :func:`run_layers` where
    every row runs the same layers, else one per stretch of layers where the same rows run.

    ``kept``: filled with the hidden states ``(R, Q, D)`` after each layer of ``taps`` that the pass runs;
    a row's are its own only where it ran that layer."""
    taps = taps if kept is not None else ()
    if len(set(bottom)) == 1 and len(set(top)) == 1:
        x, tapped = run_tapped(model, cache, range(bottom[0], top[0] + 1), x, p, taps)
        if kept is not None:
            kept.update(tapped)
        return x
    slots, start = p.slots.tolist(), p.columns[:, 0].tolist()
    cuts = sorted({*bottom, *(t + 1 for t in top), *(t + 1 for t in taps)})
    for a, b in itertools.pairwise(cuts):
        rows = [r for r in range(len(x)) if bottom[r] <= a and b - 1 <= top[r]]
        if rows:
            index = torch.tensor(rows, device=x.device)
            sub = Pass.of(cache, [slots[r] for r in rows], [start[r] for r in rows], Q, model.config.max_seq_len)
            x = x.index_copy(0, index, run_layers(model, cache, range(a, b), x.index_select(0, index), sub))
        if b - 1 in taps:
            kept[b - 1] = x
    return x


def _head_logits(model: ExitTransformer, h: Tensor, exits: list[int]) -> Tensor:
    """Each row of ``h`` ``(n, D)`` through the head of its exit; one product per head, however many exits
    share it."""
    heads: dict[int, list[int]] = {}
    for k, e in enumerate(exits):
        heads.setdefault(id(model.head(e)), []).append(k)
    if len(heads) == 1:
        return model.head(exits[0])(h)
    out = h.new_empty(len(h), model.config.vocab_size)
    for ks in heads.values():
        index = torch.tensor(ks, device=h.device)
        out[index] = model.head(exits[ks[0]])(h.index_select(0, index))
    return out


# ----------------------------------------------------------------------------------------- prefill
def write_prompts(cache: SlotCache, rows: list[Decoding]) -> list[int]:
    """The rows' prompts into their slots' tokens from column 0; their lengths."""
    lengths = [len(row.request.prompt) for row in rows]
    prompts = torch.zeros(len(rows), max(lengths), dtype=torch.long, device=cache.tokens.device)
    for i, row in enumerate(rows):
        prompts[i, : lengths[i]] = torch.as_tensor(list(row.request.prompt), device=prompts.device)
    cache.tokens[torch.tensor([row.slot for row in rows], device=prompts.device), : max(lengths)] = prompts
    return lengths


def prefill(
    model: ExitTransformer, cache: SlotCache, rows: list[Decoding], routing: Routing
) -> tuple[Tensor, Tensor | None]:
    """Write the rows' prompts into their slots from column 0, run every layer over them, and give each its
    first token (routed: from its first exit whose confidence reaches the threshold). Returns the tokens and,
    routed, the exit each came from."""
    dev = cache.tokens.device
    lengths = write_prompts(cache, rows)
    Q = max(lengths)
    p = Pass.of(cache, [row.slot for row in rows], [0] * len(rows), Q, model.config.max_seq_len)
    x = embed(model, cache, p)
    last = torch.tensor(lengths, device=dev) - 1
    batch = torch.arange(len(rows), device=dev)
    at_exits = {}
    for stage in model.config.stages:
        first, exit_layer = stage.layers
        x = run_layers(model, cache, range(first, exit_layer + 1), x, p)
        at_exits[exit_layer] = x[batch, last]  # (n, D): each prompt's last token
    for row, n in zip(rows, lengths):
        row.length = n
    u = round_uniforms(rows)
    if routing.threshold is not None:
        decisions = ExitDecisions(model, rows, routing, lambda i: u[i][-1])
        for s, exit_layer in enumerate(model.exit_layers):  # the prompt ran every layer: each exit decides in turn
            waiting = decisions.undecided()
            if len(waiting):
                decisions.take(s, waiting, at_exits[exit_layer].index_select(0, waiting))
        return decisions.settle(), decisions.exit_position
    final = model.exit_layers[-1]
    logits = model.head(final)(at_exits[final])
    return choose(rows, list(range(len(rows))), logits, lambda i: u[i][-1]), None


# ------------------------------------------------------------------------------------- full depth
def full_depth_step(
    model: ExitTransformer, cache: SlotCache, rows: list[Decoding], work: Counter, new: list[Decoding] | None = None
) -> Tensor:
    """Every row's last token through every layer and the final head: its next token. ``new`` requests ride
    along in the same pass, their prompts prefilled (a packed pass), each taking its first token; the tokens
    of ``rows`` come first, then those of ``new``. Rows of ``draft_exit="auto"`` that probe this round read
    the heads of the exits they probe at their position (:mod:`~lego_lightning.decoding.auto`)."""
    new = new or []
    cfg, R = model.config, len(rows)
    probes = probing(rows)
    taps = probed_exits(rows, probes)
    if not new:
        p = Pass.of(cache, [row.slot for row in rows], [row.length for row in rows], 1, cfg.max_seq_len)
        x, tapped = run_tapped(model, cache, range(1, cfg.n_layers + 1), embed(model, cache, p), p, taps)
        x, tapped = x[:, 0], {e: h[:, 0] for e, h in tapped.items()}
    else:
        lengths = write_prompts(cache, new)
        p = Packed.of(cache, [row.slot for row in rows + new], [row.length for row in rows] + [0] * len(new),
                      [1] * R + lengths, cfg.max_seq_len)  # fmt: skip
        x, tapped = run_tapped(model, cache, range(1, cfg.n_layers + 1), embed(model, cache, p), p, taps)
        x, tapped = x.index_select(0, p.last), {e: h.index_select(0, p.last[:R]) for e, h in tapped.items()}
        for row, n in zip(new, lengths):
            row.length = n
    logits = model.head(model.exit_layers[-1])(x)
    u = round_uniforms(rows + new)
    tokens = choose(rows + new, list(range(R + len(new))), logits, lambda i: u[i][-1])
    if probes:  # the probed exits' acceptance at the one position, against the full model's token
        zero = [0] * len(probes)
        probe_exits(model, rows, probes, zero, lambda e, i, k: tapped[e].index_select(0, i),
                    tokens[:R, None], logits, lambda i, k: i, work)  # fmt: skip
    return tokens


# ----------------------------------------------------------------------------------------- routed
class ExitDecisions:
    """One routed step's choices: each row takes its token at its first exit whose confidence reaches the
    threshold (the last exit takes the rest).

    Decoding a batch is bound by reading weights, the head's the largest. With a learned classifier
    a row that leaves needs its exit's logits only for its token, which nothing reads before the step
    ends; where its exit shares the final projection (LayerSkip's shared head) its logits wait and join
    the final exit's in one product (:meth:`settle`): one read of the head per step.
    """

    def __init__(
        self, model: ExitTransformer, rows: list[Decoding], routing: Routing, u: Callable[[int], Tensor]
    ) -> None:
        self.model, self.rows, self.routing, self.u = model, rows, routing, u
        dev = next(model.parameters()).device
        self.active = torch.ones(len(rows), dtype=torch.bool, device=dev)  # rows without a token yet
        self.tokens = torch.zeros(len(rows), dtype=torch.long, device=dev)
        self.exit_position = torch.zeros(len(rows), dtype=torch.long, device=dev)
        exits = model.exit_layers
        self.final_proj = model.head(exits[-1]).proj
        threshold = routing.threshold
        self.waits = [
            routing.hidden_confidence is not None
            and threshold is not None
            and threshold < 1  # nobody leaves early (as exit_decision decides)
            and model.head(e).proj.weight is self.final_proj.weight
            for e in exits[:-1]
        ]
        self.waiting: list[tuple[Tensor, int, Tensor]] = []  # (rows, exit index, normed hidden states)

    def undecided(self) -> Tensor:
        return self.active.nonzero(as_tuple=True)[0]

    def emit(self, s: int, rows: Tensor, logits: Tensor) -> None:
        self.tokens[rows] = choose(self.rows, rows.tolist(), logits, self.u)
        self.exit_position[rows] = s
        self.active[rows] = False

    def take(self, s: int, rows: Tensor, h: Tensor) -> None:
        """``rows`` at exit ``s`` with hidden states ``h``: those that leave take their token there."""
        model, routing, exits = self.model, self.routing, self.model.exit_layers
        last = len(exits) - 1
        if s < last and self.waits[s]:
            leave = routing.hidden_confidence(exits[s], h) >= routing.threshold
            if leave.any():
                self.waiting.append((rows[leave], s, model.head(exits[s]).norm(h[leave])))
                self.active[rows[leave]] = False
        elif s == last and self.waiting:
            self.waiting.append((rows, s, model.head(exits[s]).norm(h)))
        else:
            leave, logits = exit_decision(model, exits[s], h, s == last, routing)
            if leave.any():
                self.emit(s, rows[leave], logits)

    def settle(self) -> Tensor:
        """The waiting rows (and those at the final exit) take their tokens from one product; every row's token."""
        if self.waiting:
            logits = self.final_proj(torch.cat([normed for _, _, normed in self.waiting]))
            for (rows, s, _), part in zip(self.waiting, logits.split([len(rows) for rows, _, _ in self.waiting])):
                self.emit(s, rows, part)
            self.waiting.clear()
        return self.tokens


def exit_decision(
    model: ExitTransformer, exit_layer: int, h: Tensor, final: bool, routing: Routing
) -> tuple[Tensor, Tensor]:
    """Which rows leave at this exit, and the logits of those that do (only they run the head)."""
    head = model.head(exit_layer)
    everyone = torch.ones(len(h), dtype=torch.bool, device=h.device)
    if final:
        return everyone, head(h)
    threshold = routing.threshold
    if threshold is None or threshold >= 1:
        return ~everyone, h.new_zeros(0, model.config.vocab_size)
    if routing.hidden_confidence is not None:
        leave = routing.hidden_confidence(exit_layer, h) >= threshold
        return leave, head(h[leave]) if leave.any() else h.new_zeros(0, model.config.vocab_size)
    logits = head(h)
    leave = routing.measure(logits) >= threshold
    return leave, logits[leave]


def routed_step(
    model: ExitTransformer, cache: SlotCache, rows: list[Decoding], routing: Routing
) -> tuple[Tensor, Tensor]:
    """One token per row, each from its first exit whose confidence reaches the threshold: the tokens and exits.

    A row that left still gives the deeper layers its key and value at this position, computed from
    the hidden state it carried up; only the rows without a token attend and run the MLP.
    """
    p = Pass.of(cache, [row.slot for row in rows], [row.length for row in rows], 1, model.config.max_seq_len)
    x = embed(model, cache, p)
    u = round_uniforms(rows)
    decisions = ExitDecisions(model, rows, routing, lambda i: u[i][-1])
    for s, stage in enumerate(model.config.stages):
        attending = decisions.undecided()  # fixed within a stage: rows leave only at exits
        layers = range(stage.layers[0], stage.layers[1] + 1)
        x = run_layers(model, cache, layers, x, p, None if len(attending) == len(rows) else attending)
        if len(attending):
            decisions.take(s, attending, x.index_select(0, attending)[:, 0])
    return decisions.settle(), decisions.exit_position


# ------------------------------------------------------------------------------------ speculative
@dataclass
class Round:
    """What a self-speculative round gave each row: drafts made, drafts kept, and the kept tokens
    (the kept drafts, then the full model's own token), ``(R, Q)`` with ``kept[r, :accepted[r] + 1]`` real;
    and the first token of each request that was prefilled in it."""

    drafts: list[int]
    accepted: Tensor  # (R,)
    kept: Tensor  # (R, Q)
    first_tokens: Tensor | None = None  # (new,)


def speculative_round(
    model: ExitTransformer,
    cache: SlotCache,
    rows: list[Decoding],
    routing: Routing,
    work: Counter,
    new: list[Decoding] | None = None,
) -> Round:
    """Draft, verify, accept, for every row at once; rows without drafts this round take a full-depth step
    inside the verification. The caller keeps the tokens and moves each row's length.

    ``new`` requests (every row and they with one draft exit, or none) are prefilled in the same passes:
    their prompts run the lower layers beside the rows' first draft step and the upper ones beside the
    verification (packed passes), and each takes its first token from the final head; they draft from the
    next round on."""
    new = new or []
    cfg, dev = model.config, cache.tokens.device
    L, R = cfg.n_layers, len(rows)
    caps = [row.draft_cap() for row in rows]
    # A row without a draft exit runs the lower layers with the most common draft exit's rows and the upper
    # ones in the verification: a full-depth step that shares their weight reads.
    common = Counter(row.draft_exit for row in rows if row.draft_exit is not None).most_common(1)[0][0]
    exits = [common if row.draft_exit is None else row.draft_exit for row in rows]
    slots, start = [row.slot for row in rows], [row.length for row in rows]
    u = round_uniforms(rows)
    K_max = max(caps)
    hidden = torch.zeros(R, K_max + 1, cfg.d_model, device=dev, dtype=cache.keys.dtype)
    n_drafts = [0] * R
    sampled = any(row.generator is not None for row in rows)
    # The drafts' distributions, by row and draft; only what a row drafted is ever read.
    q_probs = torch.empty(R, K_max, cfg.vocab_size, device=dev) if sampled else None
    thresholds = [row.request.draft_threshold for row in rows]
    probes = probing(rows)
    taps = probed_exits(rows, probes)
    low: dict[int, Tensor] = {}  # probing: each exit's hidden states in the draft steps, (R, K_max + 1, D)

    prompts = write_prompts(cache, new) if new else []
    new_slots = [row.slot for row in new]
    drafting = list(range(R))  # rows whose token at column start + j runs the lower layers this step
    for j in range(K_max + 1):
        if j == 0 and new:  # the new prompts' lower layers beside everybody's last token
            pk = Packed.of(cache, slots + new_slots, start + [0] * len(new), [1] * R + prompts, cfg.max_seq_len)
            lower, tapped = run_tapped(model, cache, range(1, common + 1), embed(model, cache, pk), pk, taps)
            x, prompt_hidden = lower[:R, None], lower[R:]
            tapped = {e: h[:R, None] for e, h in tapped.items()}
        else:
            p = Pass.of(cache, [slots[i] for i in drafting], [start[i] + j for i in drafting], 1, cfg.max_seq_len)
            x = embed(model, cache, p)
            tapped = {} if probes else None
            x = ragged_layers(model, cache, x, p, [1] * len(drafting), [exits[i] for i in drafting], 1, tapped, taps)
        at = torch.tensor(drafting, device=dev)
        hidden[at, j] = x[:, 0]
        for e, h in (tapped or {}).items():
            low.setdefault(e, torch.zeros_like(hidden))[at, j] = h[:, 0]
        work["draft_layer_tokens"] += len(drafting)
        work["draft_layers"] += sum(exits[i] for i in drafting)
        going = [k for k, i in enumerate(drafting) if caps[i] > j]  # rows whose draft may grow by one token
        if not going:
            break
        h = x[going, 0] if len(going) < len(drafting) else x[:, 0]
        members = [drafting[k] for k in going]
        logits = _head_logits(model, h, [exits[i] for i in members])
        work["draft_heads"] += len(members)
        unsure = [k for k, i in enumerate(members) if thresholds[i] is not None]
        if unsure:  # a row unsure of its next draft stops before it
            sure = _draft_confidence(model, routing, h, logits, [exits[i] for i in members]).tolist()
            keep = [k for k, i in enumerate(members) if thresholds[i] is None or sure[k] >= thresholds[i]]
            if not keep:
                break
            if len(keep) < len(members):
                index = torch.tensor(keep, device=dev)
                logits, members = logits.index_select(0, index), [members[k] for k in keep]
        draft = choose(rows, members, logits, lambda i, j=j: u[i][j], _keep_at(q_probs, j))
        cols = torch.tensor([start[i] + j + 1 for i in members], device=dev)
        cache.tokens[torch.tensor([slots[i] for i in members], device=dev), cols] = draft
        for i in members:
            n_drafts[i] = j + 1
        drafting = members

    # Verify: the layers above each row's exit over its last token and drafts, in one pass.
    Q = max(n_drafts) + 1
    real = [i * Q + k for i in range(R) for k in range(n_drafts[i] + 1)]  # row after row
    final_head = model.head(cfg.exit_layers[-1])
    first_tokens = None
    if new:  # packed: each row's own positions, then the new prompts (only their last position reads the head)
        pk = Packed.of(cache, slots + new_slots, start + [0] * len(new), [n + 1 for n in n_drafts] + prompts,
                       cfg.max_seq_len)  # fmt: skip
        upper_input = torch.cat([*(hidden[i, : n_drafts[i] + 1] for i in range(R)), prompt_hidden])
        upper, high = run_tapped(model, cache, range(common + 1, L + 1), upper_input, pk, taps)
        work["verify_layer_tokens"] += len(real)
        work["verify_layers"] += len(real) * (L - common)
        logits = final_head(upper[: len(real)])
        for row, n in zip(new, prompts):
            row.length = n
        u_new = round_uniforms(new)
        first_tokens = choose(new, list(range(len(new))), final_head(upper.index_select(0, pk.last[R:])),
                              lambda i: u_new[i][-1])  # fmt: skip
        cache.tokens[torch.tensor(new_slots, device=dev), torch.tensor(prompts, device=dev)] = first_tokens
    else:
        p = Pass.of(cache, slots, start, Q, cfg.max_seq_len)
        high = {} if probes else None
        x = ragged_layers(model, cache, hidden[:, :Q], p, [e + 1 for e in exits], [L] * R, Q, high, taps)
        high = {e: h.reshape(R * Q, -1) for e, h in (high or {}).items()}
        work["verify_layer_tokens"] += R * Q
        work["verify_layers"] += Q * sum(L - e for e in exits)
        flat = x.reshape(R * Q, -1)
        if len(real) < R * Q:  # the final head only where a row has a position, not over the padding
            flat = flat.index_select(0, torch.tensor(real, device=dev))
        logits = final_head(flat)  # (N, V): the full model's next token after each position
    work["final_heads"] += len(real)
    slots_t, start_t = torch.tensor(slots, device=dev), torch.tensor(start, device=dev)
    offsets = torch.arange(Q, device=dev)
    proposed = cache.tokens[slots_t[:, None], start_t[:, None] + 1 + offsets[: Q - 1]]  # (R, Q - 1) the drafts
    within = offsets[: Q - 1] < torch.tensor(n_drafts, device=dev)[:, None]
    accepted, next_token = _accept(rows, n_drafts, logits, proposed, within, q_probs, u)
    cache.tokens[slots_t, start_t + accepted + 1] = next_token
    kept = cache.tokens[slots_t[:, None], start_t[:, None] + 1 + offsets]
    if probes:  # the probed exits' acceptance at the kept positions, from hidden states this round computed
        first = torch.tensor([0, *itertools.accumulate(n + 1 for n in n_drafts)][:-1], device=dev)
        exits_t = torch.tensor(exits, device=dev)

        def logit_index(i: Tensor, k: Tensor) -> Tensor:  # a position's row among the final head's logits
            return first[i] + k

        def hidden_at(e: int, i: Tensor, k: Tensor) -> Tensor:  # below a row's exit: its draft steps; above: verify
            out = hidden.new_empty(len(i), cfg.d_model)
            here = exits_t[i]
            for where, take in (
                (here > e, lambda m: low[e][i[m], k[m]]),
                (here == e, lambda m: hidden[i[m], k[m]]),
                (here < e, lambda m: high[e].index_select(0, (first[i[m]] + k[m]) if new else i[m] * Q + k[m])),
            ):
                if where.any():
                    out[where] = take(where)
            return out

        drafted = {i: rows[i].draft_exit for i in range(R) if n_drafts[i] > 0}  # measured by the round itself
        probe_exits(model, rows, probes, [int(n) for n in accepted[probes].tolist()], hidden_at, kept, logits,
                    logit_index, work, skip=drafted)  # fmt: skip
    return Round(n_drafts, accepted, kept, first_tokens)


def probing(rows: list[Decoding]) -> list[int]:
    """Positions in ``rows`` of the ``auto`` requests that read some exits' acceptance this round."""
    return [i for i, row in enumerate(rows) if row.auto is not None and row.auto.probing]


def probed_exits(rows: list[Decoding], probes: list[int]) -> list[int]:
    """The exits whose hidden states this round must keep: those the probing rows read."""
    return sorted({e for i in probes for e in rows[i].auto.probing})


def probe_exits(
    model: ExitTransformer,
    rows: list[Decoding],
    probes: list[int],
    last: list[int],
    hidden_at: Callable[[int, Tensor, Tensor], Tensor],
    targets: Tensor,
    logits: Tensor,
    logit_index: Callable[[Tensor, Tensor], Tensor],
    work: Counter,
    skip: dict[int, int] | None = None,
) -> None:
    """Each probing row's acceptance at the exits it probes this round, over its positions ``0..last``, into its
    :class:`~lego_lightning.decoding.auto.AutoDraft`.

    ``hidden_at(e, i, k)``: the hidden states after exit layer ``e`` of rows ``i`` at positions ``k``;
    ``targets[i, k]``: the full model's token after them; ``logits[logit_index(i, k)]``: its logits there.
    Greedy, an exit's acceptance at a position is whether its token is the full model's; sampled, the
    probability ``sum(min(p, q))`` that speculative sampling keeps its draft, from the distributions at the
    request's temperature before top-k and top-p cut them (a softmax instead of a nucleus per exit: nearly
    the same sum at a fraction of the cost). At most :data:`PROBE_POSITIONS` positions of a row are read.
    ``skip[i]``: an exit whose acceptance row ``i``'s round measured itself."""
    dev, skip = logits.device, skip or {}
    last = [min(n, PROBE_POSITIONS - 1) for n in last]
    pair_rows = [i for n, i in zip(last, probes) for _ in range(n + 1)]
    pair_positions = [k for n in last for k in range(n + 1)]
    every_i, every_k = torch.tensor(pair_rows, device=dev), torch.tensor(pair_positions, device=dev)
    # The full model's distribution at each sampled row's positions: once, whatever the exits read.
    sampled = any(not rows[i].sampling.greedy for i in probes)
    p_full = logits.new_empty(len(pair_rows) if sampled else 0, logits.shape[-1])
    for sampling, members in by_sampling(rows, pair_rows).items():
        if not sampling.greedy:
            m = torch.tensor(members, device=dev)
            p_full[m] = torch.softmax(logits.index_select(0, logit_index(every_i[m], every_k[m])).float()
                                      / sampling.temperature, -1)  # fmt: skip
    for e in model.exit_layers[:-1]:
        chosen = [j for j, i in enumerate(pair_rows) if e in rows[i].auto.probing and skip.get(i) != e]
        if not chosen:
            continue
        index = torch.tensor(chosen, device=dev)
        i, k = every_i[index], every_k[index]
        q_logits = model.head(e)(hidden_at(e, i, k))
        work["probe_heads"] += len(chosen)
        acceptance = torch.empty(len(chosen), device=dev)
        for sampling, members in by_sampling(rows, i.tolist()).items():
            m = torch.tensor(members, device=dev)
            if sampling.greedy:
                acceptance[m] = (q_logits[m].argmax(-1) == targets[i[m], k[m]]).float()
            else:
                p = p_full.index_select(0, index[m])
                q = torch.softmax(q_logits[m].float() / sampling.temperature, -1)
                acceptance[m] = torch.minimum(p, q).sum(-1)
        sums = torch.zeros(len(rows), device=dev).index_add_(0, i, acceptance).tolist()
        counts = torch.bincount(i, minlength=len(rows)).tolist()
        for r in sorted(set(i.tolist())):
            rows[r].auto.observe(e, sums[r], counts[r])


def _draft_confidence(model: ExitTransformer, routing: Routing, h: Tensor, logits: Tensor, exits: list[int]) -> Tensor:
    if not routing.measure.reads_hidden:
        return routing.measure(logits)
    out = torch.empty(len(h), device=h.device)
    for e in sorted(set(exits)):
        index = torch.tensor([k for k, x in enumerate(exits) if x == e], device=h.device)
        out[index] = routing.hidden_confidence(e, h.index_select(0, index)).float()
    return out


def _keep_at(q_probs: Tensor | None, j: int) -> Callable[[Tensor, Tensor], None]:
    """Where ``choose`` keeps the ``j``-th drafts' distributions, for their acceptance tests."""

    def keep(rows: Tensor, probs: Tensor) -> None:
        q_probs[rows, j] = probs

    return keep


def _accept(
    rows: list[Decoding], n_drafts: list[int], logits: Tensor, proposed: Tensor, within: Tensor,
    q_probs: Tensor | None, u: dict[int, Tensor],
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """How many drafts each row keeps, and its next token, from the full model's ``logits`` ``(N, V)``: row
    ``r``'s positions ``0..n_drafts[r]`` one after the other, row after row."""
    R, dev = len(rows), logits.device
    accepted = torch.zeros(R, dtype=torch.long, device=dev)
    next_token = torch.zeros(R, dtype=torch.long, device=dev)
    first = [0]  # where each row's positions start among the logits
    for n in n_drafts[:-1]:
        first.append(first[-1] + n + 1)
    groups = by_sampling(rows, list(range(R)))
    for sampling, members in groups.items():
        index = torch.tensor(members, device=dev)
        part = logits
        starts = torch.tensor([first[i] for i in members], device=dev)
        if len(groups) > 1:  # this group's positions only
            picked = torch.tensor([first[i] + k for i in members for k in range(n_drafts[i] + 1)], device=dev)
            part = logits.index_select(0, picked)
            starts = torch.tensor([0, *itertools.accumulate(n_drafts[i] + 1 for i in members)][:-1], device=dev)
        n = torch.tensor([n_drafts[i] for i in members], device=dev)
        K = max(n_drafts[i] for i in members)
        offsets = torch.arange(K + 1, device=dev)
        at = (starts[:, None] + offsets).clamp(max=len(part) - 1)  # (S, K + 1) each position's row in part
        d = proposed.index_select(0, index)[:, :K]
        if sampling.greedy:
            full = part.argmax(-1)[at]  # (S, K + 1): the full model's token after each position
            agree = (d == full[:, :K]) & within.index_select(0, index)[:, :K]
            n_ok = agree.long().cumprod(1).sum(1)
            accepted[index] = n_ok
            next_token[index] = full.gather(1, n_ok[:, None])[:, 0]
            continue
        p = sampling.probabilities(part)  # the full model's distributions where they are needed, once each
        n_ok = torch.zeros(len(members), dtype=torch.long, device=dev)
        if K > 0:
            q = q_probs.index_select(0, index)  # (S, K_max, V)
            draft = torch.arange(K, device=dev)
            ratio = p[at[:, :K], d] / q[torch.arange(len(members), device=dev)[:, None], draft, d]
            keep = (_acceptance_uniforms(rows, members, u, K) < ratio) & (draft < n[:, None])
            n_ok = keep.long().cumprod(1).sum(1)
        p_next = p.index_select(0, (starts + n_ok).clamp(max=len(part) - 1))  # (S, V)
        if K > 0:  # at a refused draft the token comes from max(0, p - q)
            refused = (n_ok < n)[:, None]
            q_next = q[torch.arange(len(members), device=dev), n_ok.clamp(max=K - 1)]
            residual = torch.where(refused, (p_next - q_next).clamp(min=0), p_next)
            # p == q up to rounding leaves nothing to draw from; p itself is then the distribution.
            p_next = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
        accepted[index] = n_ok
        next_token[index] = draw(p_next, torch.stack([u[i][-1] for i in members]))
    return accepted, next_token


def _acceptance_uniforms(rows: list[Decoding], members: list[int], u: dict[int, Tensor], K: int) -> Tensor:
    """``(S, K)``: each sampled row's uniforms for its acceptance tests (the second K of its round's draws)."""
    out = []
    for i in members:
        k = rows[i].num_speculations if rows[i].draft_exit is not None else 0
        tests = u[i][k : 2 * k][:K]
        out.append(torch.cat([tests, tests.new_ones(K - len(tests))]))  # past a row's drafts: never read
    return torch.stack(out)
