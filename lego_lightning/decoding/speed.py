"""How fast self-speculative decoding can be: the speed bound, and the step costs it is computed from."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from lego_lightning.decoding.attention import Pass, embed, run_layers
from lego_lightning.decoding.cache import SlotCache
from lego_lightning.decoding.compiled import FixedShapePasses
from lego_lightning.decoding.request import check_draft
from lego_lightning.model import flops
from lego_lightning.model.transformer import ExitTransformer

# What an engine counts of the work its rounds ran (``Engine.work``), and :func:`decoding_flops` prices:
WORK = (
    "draft_layer_tokens",  # rows through a draft step's embedding and lower layers
    "draft_layers",  # the same, summed over each row's layers (its draft exit)
    "draft_heads",  # rows through a draft exit's head
    "verify_layer_tokens",  # positions through a verification's upper layers
    "verify_layers",  # the same, summed over each position's layers (those above its row's exit)
    "final_heads",  # positions through the final head in a verification
    "probe_heads",  # head reads of auto's probes (lego_lightning.decoding.auto)
    "full_steps",  # rows through a full-depth step: embedding, every layer, the final head
)


def decoding_flops(
    model: ExitTransformer, work: Mapping[str, int], context: float, confidence: str | None = None
) -> float:
    """FLOPs of everything that ``work`` (an engine's :data:`WORK` counts) ran after the prompts: layers at a mean
    ``context``, heads (drafts, verifications, auto's probes), embeddings, and the ``confidence`` measure of
    adaptive drafting read at each draft head."""
    cfg = model.config
    layer = flops.layer_flops(cfg, context).total
    head = flops.head_flops(cfg).total
    embed = flops.embedding_flops(cfg).total
    read = flops.confidence_flops(cfg, confidence).total if confidence is not None else 0.0
    return (
        work.get("draft_layer_tokens", 0) * embed
        + (work.get("draft_layers", 0) + work.get("verify_layers", 0)) * layer
        + work.get("draft_heads", 0) * (head + read)
        + (work.get("final_heads", 0) + work.get("probe_heads", 0)) * head
        + work.get("full_steps", 0) * flops.full_flops(cfg, context).total
    )


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


def seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The median of ``repeats`` timings of ``fn`` after one warm-up (the device synchronised around each)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def step_functions(
    model: ExitTransformer,
    draft_exit: int,
    num_speculations: int,
    batch_size: int = 1,
    context: int = 64,
    compile_backend: str | None = None,
    spread: bool = False,
) -> dict[str, Callable[[], None]]:
    """The three steps of :func:`speedup_bound` as the engine runs them, with ``context`` tokens already cached
    in each of ``batch_size`` slots: ``draft`` (layers 1..E and exit E's head), ``verify`` (layers 1..E for the
    last draft, the layers above over the K + 1 positions, the final head) and ``full`` (every layer and the
    final head), each choosing its tokens greedily; with ``compile_backend``, through the compiled passes.

    ``spread``: the slots hold from half to one and a half times ``context`` tokens, as requests that
    joined at different times do under continuous batching (each query then has its own mask), instead
    of ``context`` each, as a static batch of equal prompts does."""
    check_draft(model, draft_exit, num_speculations)
    cfg = model.config
    ref = next(model.parameters())
    K, E, L = num_speculations, draft_exit, cfg.n_layers
    context = min(context, (cfg.max_seq_len - K - 1) * 2 // 3 if spread else cfg.max_seq_len - K - 1)
    lengths = [context] * batch_size
    if spread and batch_size > 1:
        lengths = [context // 2 + (context * r) // (batch_size - 1) for r in range(batch_size)]
    cache = SlotCache(cfg, batch_size, max(lengths) + K + 1, ref.device, ref.dtype)
    cache.keys.normal_()
    cache.values.normal_()
    if compile_backend is not None:
        cache.compiled = FixedShapePasses(model, cache, K + 1, compile_backend)
    slots = list(range(batch_size))
    draft_head, final_head = model.head(E), model.head(cfg.exit_layers[-1])

    def lower(ahead: int) -> torch.Tensor:
        p = Pass.of(cache, slots, [n + ahead for n in lengths], 1, cfg.max_seq_len)
        return run_layers(model, cache, range(1, E + 1), embed(model, cache, p), p)

    @torch.no_grad()
    def draft() -> None:
        draft_head(lower(0)[:, 0]).argmax(-1)

    @torch.no_grad()
    def verify() -> None:
        lower(K)
        many = Pass.of(cache, slots, lengths, K + 1, cfg.max_seq_len)
        x = torch.zeros(batch_size, K + 1, cfg.d_model, device=ref.device, dtype=ref.dtype)
        final_head(run_layers(model, cache, range(E + 1, L + 1), x, many)).argmax(-1)

    @torch.no_grad()
    def full() -> None:
        p = Pass.of(cache, slots, lengths, 1, cfg.max_seq_len)
        x = run_layers(model, cache, range(1, L + 1), embed(model, cache, p), p)
        final_head(x[:, 0]).argmax(-1)

    return {"draft": draft, "verify": verify, "full": full}


def measure_step_costs(
    model: ExitTransformer,
    draft_exit: int,
    num_speculations: int,
    batch_size: int = 1,
    context: int = 64,
    repeats: int = 20,
    spread: bool = False,
) -> StepCosts:
    """Time the three pieces of :func:`speedup_bound` on this model and machine (median of ``repeats``),
    through the engine's own passes (:func:`step_functions`, whose ``spread`` says how full the slots are)."""
    steps = step_functions(model, draft_exit, num_speculations, batch_size, context, spread=spread)
    device = next(model.parameters()).device
    return StepCosts(*(seconds(steps[name], repeats, device) for name in ("draft", "verify", "full")))
