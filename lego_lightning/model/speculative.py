"""Self-speculative decoding: the first E layers and exit E's head draft, the layers above verify.

LayerSkip's decoding (Elhoushi et al. 2024), made batched. Each round, for every sequence still
decoding:

1. *Draft.* Layers 1..E and exit E's head run on one token at a time and propose up to ``K``
   tokens (``num_speculations``); a row stops early when its exit's confidence falls below
   ``draft_threshold``. Exit E's hidden state at every drafted position is kept.
2. *Verify.* Layers E+1..L run once over the row's last verified token and its drafts, starting
   from those kept hidden states (no layer 1..E runs twice for a token), and the final exit
   reads every position: the full model's token after each prefix.
3. *Accept.* The longest prefix of drafts that the full model agrees with is kept, plus the
   full model's own next token (a correction, or one more token when every draft agreed).
   Greedy decoding compares tokens; sampling accepts a draft with probability
   ``min(1, p / q)`` and otherwise draws from ``max(0, p - q)`` normalised (speculative
   sampling, Leviathan et al. 2023), so each row's tokens follow the full model's distribution.

The KV cache has a column per token, the same column as in the output. A row's keys and values
are valid up to its last verified token; whatever a rejected draft wrote beyond it is never
attended (each query sees only columns up to its own) and is overwritten when the row gets
there: rolling back costs nothing and copies nothing. Rows keep their own lengths and
positions, and a row that has ended, or has its tokens, runs nothing.

Plain PyTorch, inference only, the model in eval mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lego_lightning.model.confidence import ConfidenceMeasure
from lego_lightning.model.early_exit import Generation, HiddenConfidence, Sampling, _attend_cached, _prefill
from lego_lightning.model.transformer import ExitTransformer


def check_draft(model: ExitTransformer, draft_exit: int, num_speculations: int) -> None:
    """Errors that name the setting, raised before any work."""
    exits = model.exit_layers
    if draft_exit not in exits[:-1]:
        raise ValueError(
            f"draft_exit={draft_exit} is not an exit before the last: this model's exits are after layers "
            f"{exits}, so allowed {exits[:-1] or 'none (it has one exit)'}"
        )
    if not isinstance(num_speculations, int) or num_speculations < 1:
        raise ValueError(
            f"num_speculations={num_speculations!r}: allowed a positive integer (the most tokens a round drafts)"
        )


def _run_layers(
    model: ExitTransformer,
    layers: range,
    x: Tensor,
    caches: list[tuple[Tensor, Tensor]],
    rows: Tensor | None,
    columns: Tensor,
    first_key: Tensor,
) -> Tensor:
    """``layers`` (1-based) for ``x`` ``(R, Q, D)`` of batch ``rows`` (``None``: all) at cache ``columns`` ``(R, Q)``.

    Each position writes its key and value at its column and attends to its row's columns from
    ``first_key`` ``(R,)`` (the first real prompt token) up to its own.
    """
    R = len(x)
    span = int(columns.max()) + 1
    keys = torch.arange(span, device=x.device)
    mask = ((keys >= first_key[:, None, None]) & (keys <= columns[:, :, None])).unsqueeze(1)  # (R, 1, Q, span)
    positions = (columns - first_key[:, None]).clamp(max=model.config.max_seq_len - 1)
    row = torch.arange(R, device=x.device) if rows is None else rows
    for layer in layers:
        block = model.blocks[layer - 1]
        attn = block.attn
        q, k, v = (attn.to_heads(t) for t in attn.project(block.ln1(x)))  # (R, H, Q, hd)
        if model.rotary is not None:
            q, k = model.rotary(q, positions), model.rotary(k, positions)
        cache_k, cache_v = caches[layer - 1]
        cache_k[row[:, None], :, columns] = k.transpose(1, 2)
        cache_v[row[:, None], :, columns] = v.transpose(1, 2)
        if rows is None:  # every row: a view of the cache, no copy
            k, v = cache_k[:, :, :span], cache_v[:, :, :span]
        else:
            k, v = cache_k[rows, :, :span], cache_v[rows, :, :span]
        y = attn.attend(q, k, v, attn_mask=mask)
        x = block.after_attention(x, attn.proj(attn.from_heads(y)))
    return x


@torch.no_grad()
def decode_speculatively(
    model: ExitTransformer,
    prompt: Tensor,
    kept: Tensor,
    max_new_tokens: int,
    draft_exit: int,
    num_speculations: int,
    sampling: Sampling,
    generators: list[torch.Generator],
    pad: int,
    eos_token_id: int | None,
    draft_threshold: float | None,
    measure: ConfidenceMeasure,
    hidden_confidence: HiddenConfidence | None,
) -> Generation:
    """:func:`~lego_lightning.model.early_exit.generate` with ``draft_exit``, its settings checked there.

    ``kept`` marks the prompt's real tokens, ``pad`` fills what follows a row's end. Greedy
    tokens equal full depth's. ``num_speculations`` caps the drafts of a round; with
    ``draft_threshold`` a row stops drafting as soon as the draft exit's confidence (``measure``,
    or ``hidden_confidence`` for a learned one) falls below it. The result's ``drafts``,
    ``accepted``, ``refusals`` and ``verifications`` count, per row, the tokens drafted, those the
    full model kept, the rounds that refused one, and the verifying passes (rounds).
    """
    cfg, dev = model.config, prompt.device
    B, P = prompt.shape
    K, E, L = num_speculations, draft_exit, cfg.n_layers
    first_key = P - kept.sum(1)  # each row's first real column
    # Room for a round's drafts past the last token kept: they may be written, never kept.
    width = P + max_new_tokens + K + 1
    ref = next(model.parameters())
    caches = [
        tuple(torch.zeros(B, cfg.n_kv_heads, width, cfg.head_dim, device=dev, dtype=ref.dtype) for _ in "kv")
        for _ in range(L)
    ]
    tokens = torch.full((B, width), pad, dtype=prompt.dtype, device=dev)
    tokens[:, :P] = prompt
    draft_head, final_head = model.head(E), model.head(cfg.exit_layers[-1])

    at_exits = _prefill(model, prompt, None if bool(kept.all()) else kept, caches)
    tokens[:, P] = sampling.pick(final_head(at_exits[L]), generators).to(tokens.dtype)
    made = torch.ones(B, dtype=torch.long, device=dev)  # tokens generated per row
    ended = torch.zeros(B, dtype=torch.bool, device=dev)
    if eos_token_id is not None:
        ended |= tokens[:, P] == eos_token_id
    drafts, accepted, refusals, verifications = (torch.zeros(B, dtype=torch.long, device=dev) for _ in range(4))
    # What ran after the prompt, summed over rows (padding included): the FLOPs count reads it.
    work = {"draft_layer_tokens": 0, "draft_heads": 0, "verify_layer_tokens": 0, "final_heads": 0}

    while True:
        rows = (~ended & (made < max_new_tokens)).nonzero(as_tuple=True)[0]
        if len(rows) == 0:
            break
        R = len(rows)
        subset = None if R == B else rows
        start = P + made[rows] - 1  # each row's last token: known, not yet through any layer
        cap = (max_new_tokens - made[rows] - 1).clamp(max=K)  # more drafts than tokens left would be wasted
        # Exit E's state per column; zeros where a row drafted less (finite: masked keys must not hold NaN).
        hidden = torch.zeros(R, K + 1, cfg.d_model, device=dev, dtype=ref.dtype)
        n_drafts = torch.zeros(R, dtype=torch.long, device=dev)
        q_probs = None if sampling.greedy else torch.zeros(R, K, cfg.vocab_size, device=dev)
        drafting = torch.arange(R, device=dev)  # positions in ``rows`` of the rows still drafting
        for k in range(K + 1):
            column = start[drafting] + k
            batch_rows = rows[drafting]
            x = model.embed(
                tokens[batch_rows, column].unsqueeze(1),
                positions=(column - first_key[batch_rows]).unsqueeze(1),
            )
            x = _run_layers(
                model, range(1, E + 1), x, caches, None if len(drafting) == B else batch_rows, column[:, None],
                first_key[batch_rows],
            )[:, 0]  # fmt: skip
            hidden[drafting, k] = x
            work["draft_layer_tokens"] += len(drafting)
            more = cap[drafting] > k  # rows whose draft may grow by one token
            drafting, x = drafting[more], x[more]
            if len(drafting) == 0:
                break
            logits = draft_head(x)
            work["draft_heads"] += len(drafting)
            if draft_threshold is not None:
                sure = (
                    hidden_confidence(E, x) if measure.reads_hidden else measure(logits)
                ) >= draft_threshold  # a row unsure of its next draft stops before it
                drafting, logits = drafting[sure], logits[sure]
                if len(drafting) == 0:
                    break
            if sampling.greedy:
                draft = logits.argmax(-1)
            else:
                q = sampling.probabilities(logits)
                q_probs[drafting, k] = q
                draft = torch.cat([torch.multinomial(q[i], 1, generator=generators[int(r)])
                                   for i, r in enumerate(rows[drafting])])  # fmt: skip
            tokens[rows[drafting], start[drafting] + k + 1] = draft.to(tokens.dtype)
            n_drafts[drafting] = k + 1

        # Verify: the layers above E over each row's last token and drafts, in one pass.
        Q = int(n_drafts.max()) + 1
        columns = start[:, None] + torch.arange(Q, device=dev)
        x = _run_layers(model, range(E + 1, L + 1), hidden[:, :Q], caches, subset, columns, first_key[rows])
        logits = final_head(x)  # (R, Q, V): the full model's next token after each column
        work["verify_layer_tokens"] += R * Q
        work["final_heads"] += R * Q
        proposed = tokens[rows[:, None], columns[:, 1:]] if Q > 1 else tokens.new_zeros(R, 0)
        within = torch.arange(Q - 1, device=dev) < n_drafts[:, None]
        if sampling.greedy:
            full = logits.argmax(-1)
            agree = (proposed == full[:, :-1]) & within
            n_ok = agree.long().cumprod(1).sum(1)
            next_token = full.gather(1, n_ok[:, None])[:, 0]
        else:
            n_ok, next_token = _speculative_sampling(
                sampling.probabilities(logits), q_probs, proposed, n_drafts, rows, generators
            )
        tokens[rows, start + n_ok + 1] = next_token.to(tokens.dtype)
        new = n_ok + 1
        if eos_token_id is not None:  # a row ends at its first end token among those it just kept
            kept_now = tokens[rows[:, None], start[:, None] + 1 + torch.arange(Q, device=dev)]
            is_end = (kept_now == eos_token_id) & (torch.arange(Q, device=dev) < new[:, None])
            has_end = is_end.any(1)
            new = torch.where(has_end, is_end.long().argmax(1) + 1, new)
            ended[rows] = has_end
        made[rows] += new
        drafts[rows] += n_drafts
        accepted[rows] += n_ok
        refusals[rows] += (n_ok < n_drafts).long()
        verifications[rows] += 1

    N = max_new_tokens
    out = tokens[:, : P + N].clone()
    past = torch.arange(N, device=dev)[None, :] >= made[:, None]  # drafts written but never kept, or nothing
    out[:, P:][past] = pad
    exit_position = torch.full((B, N), len(cfg.exit_layers) - 1, dtype=torch.long, device=dev)
    exit_position[past] = -1
    return Generation(
        out, exit_position, drafts=drafts, accepted=accepted, refusals=refusals, verifications=verifications, work=work
    )


def _speculative_sampling(
    p: Tensor, q: Tensor, proposed: Tensor, n_drafts: Tensor, rows: Tensor, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """How many drafts each row keeps, and its next token: ``p`` ``(R, Q, V)`` the full model's
    distributions, ``q`` ``(R, K, V)`` the drafts', ``proposed`` ``(R, Q - 1)`` the drafts.

    Draft ``i`` is kept with probability ``min(1, p_i(d) / q_i(d))``; at the first refusal the
    next token comes from ``max(0, p_i - q_i)`` normalised, and after ``n`` kept drafts from
    ``p_n``. Every draw comes from the row's own generator.
    """
    n_ok, next_token = [], []
    for i, row in enumerate(rows.tolist()):
        g, n = generators[row], int(n_drafts[i])
        kept = 0
        while kept < n:
            d = int(proposed[i, kept])
            ratio = p[i, kept, d] / q[i, kept, d]
            if float(torch.rand((), generator=g, device=p.device)) < float(ratio):
                kept += 1
            else:
                break
        if kept < n:
            residual = (p[i, kept] - q[i, kept]).clamp(min=0)
            # p == q up to rounding leaves nothing to draw from; p itself is then the distribution.
            dist = residual if float(residual.sum()) > 0 else p[i, kept]
        else:
            dist = p[i, kept]
        n_ok.append(kept)
        next_token.append(torch.multinomial(dist, 1, generator=g))
    return torch.tensor(n_ok, device=p.device), torch.cat(next_token)


# ------------------------------------------------------------------------------------ speed bound
def tokens_per_verification(acceptance: float, num_speculations: int) -> float:
    """Expected tokens a round yields when each draft is accepted with probability ``acceptance``
    independently of the others: ``1 + a + a^2 + ... + a^K`` (the kept drafts and the full model's own)."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance={acceptance}: allowed 0..1")
    return sum(acceptance**i for i in range(num_speculations + 1))


def speedup_bound(
    acceptance: float, num_speculations: int, draft_cost: float, verify_cost: float, full_cost: float
) -> float:
    """The most self-speculation can gain over full-depth decoding, as a ratio of tokens per second.

    ``draft_cost`` is one draft step (layers 1..E and exit E's head, one token per row),
    ``verify_cost`` one verification of ``num_speculations`` drafts (layers 1..E for the last
    draft, the layers above over the K + 1 positions, the final head over them), ``full_cost``
    one full-depth step: all measured in the same units (:func:`measure_step_costs`). A round
    costs K drafts and one verification and yields :func:`tokens_per_verification` tokens; the
    bound leaves out everything else a round does (bookkeeping, the comparison, sampling).
    """
    tokens = tokens_per_verification(acceptance, num_speculations)
    return round_speedup(tokens, num_speculations, draft_cost, verify_cost, full_cost)


def round_speedup(
    tokens_per_round: float, drafts_per_round: float, draft_cost: float, verify_cost: float, full_cost: float
) -> float:
    """:func:`speedup_bound` for rounds that yield ``tokens_per_round`` tokens from ``drafts_per_round``
    drafts on average (as measured, e.g. with adaptive drafting, whose drafts vary)."""
    return tokens_per_round * full_cost / (drafts_per_round * draft_cost + verify_cost)


def acceptance_needed(
    speedup: float, num_speculations: int, draft_cost: float, verify_cost: float, full_cost: float
) -> float | None:
    """The least acceptance at which :func:`speedup_bound` reaches ``speedup`` with these costs, or ``None``
    where even every draft accepted falls short (the bound rises with the acceptance)."""

    def bound(acceptance: float) -> float:
        return speedup_bound(acceptance, num_speculations, draft_cost, verify_cost, full_cost)

    if bound(1.0) < speedup:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if bound(middle) < speedup else (low, middle)
    return high


@dataclass
class StepCosts:
    """Seconds of one draft step, one verification of ``num_speculations`` drafts and one full-depth step."""

    draft: float
    verify: float
    full: float


@torch.no_grad()
def measure_step_costs(
    model: ExitTransformer,
    draft_exit: int,
    num_speculations: int,
    batch_size: int = 1,
    context: int = 64,
    repeats: int = 20,
) -> StepCosts:
    """Time the three pieces of :func:`speedup_bound` on this model and machine (median of ``repeats``),
    with ``context`` tokens already cached, through the code that decoding runs: the draft and the
    verification as self-speculation runs them, the full step as full-depth ``generate`` does."""
    check_draft(model, draft_exit, num_speculations)
    cfg = model.config
    ref = next(model.parameters())
    dev = ref.device
    K, E, L = num_speculations, draft_exit, cfg.n_layers
    context = min(context, cfg.max_seq_len - K - 1)
    width = context + K + 1
    caches = [
        tuple(torch.randn(batch_size, cfg.n_kv_heads, width, cfg.head_dim, device=dev, dtype=ref.dtype) for _ in "kv")
        for _ in range(L)
    ]
    first_key = torch.zeros(batch_size, dtype=torch.long, device=dev)
    one = torch.full((batch_size, 1), context, device=dev)
    many = context + torch.arange(K + 1, device=dev).repeat(batch_size, 1)
    token = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)

    def lower(columns: Tensor) -> Tensor:
        x = model.embed(token, positions=columns[:, -1:])
        return _run_layers(model, range(1, E + 1), x, caches, None, columns[:, -1:], first_key)

    def draft() -> None:
        model.head(E)(lower(one)[:, 0]).argmax(-1)

    def verify() -> None:
        lower(many)
        x = torch.zeros(batch_size, K + 1, cfg.d_model, device=dev, dtype=ref.dtype)
        model.head(cfg.exit_layers[-1])(_run_layers(model, range(E + 1, L + 1), x, caches, None, many, first_key))

    every_row = torch.arange(batch_size, device=dev)

    def full() -> None:  # a step of full-depth decoding (generate without a draft exit), as it runs there
        x = model.embed(token, positions=one)
        for layer in range(1, L + 1):
            x = _attend_cached(model, model.blocks[layer - 1], x, caches[layer - 1], context, one, None, every_row)
        model.head(cfg.exit_layers[-1])(x[:, 0]).argmax(-1)

    def seconds(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return StepCosts(draft=seconds(draft), verify=seconds(verify), full=seconds(full))
