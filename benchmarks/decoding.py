"""The decoding engine measured (issue 34): every step against its roofline, continuous against static
batches, sampled self-speculation at batch 8, compiled against eager, and the memory of 1,000 prompts.

Parts (``--parts``, all by default), each written to ``benchmarks/results/decoding.{md,json}`` as it ends
(``--resume`` keeps the parts already there):

* ``roofline``: a model of d_model 256, 8 layers, a 2,048-token vocabulary (random weights, seed 0),
  64 tokens cached, batch 1 and 8. The full-depth step, a draft step (layers 1-2) and a verification of
  4 drafts, as the engine runs them, against bare matrix-vector products over the same weights in
  eager PyTorch and against the weights' bytes at the memory bandwidth measured here, with the share
  of the matrix-product peak measured here; each step timed by operation (torch's profiler) to say
  where the rest of the time goes. Eager and compiled (``torch.compile`` at fixed shapes) alike.
* ``sampled``: the LayerSkip model of ``benchmarks/speculative.py`` (8 WikiText-2 valid prompts of 32
  tokens, 48 new, temperature 0.8, top-p 0.95, batch 8 as one static batch): every draft exit 1-6 and
  K 1-6 against full depth timed just before and after each exit's settings.
* ``continuous``: 64 WikiText-2 valid prompts of 16 tokens on that model, each with its own
  ``max_new_tokens`` drawn from 16-112 (seed 0; the model's context is 128), 8 slots; static batches
  (8 prompts at a time, the next 8 when all have ended) against continuous batching, at full depth
  and self-speculative (greedy: exit 1, K=4, the speculative benchmark's best at batch 8; sampled: the
  best cell of ``sampled``), greedy and sampled, in ``--continuous-rounds`` rounds that run every configuration
  once, in turn (the median over the rounds counts; a ratio, the median of the rounds' own ratios):
  tokens per second, time to first token and per-request latency (p50, p99; every request arrives at
  the start), and self-speculation's speed-up against its bound
  (:func:`~lego_lightning.decoding.speedup_bound` from the acceptance and the step costs measured at the
  start of each round, with the slots at different lengths, as continuous batching keeps them); and
  the cost of a full-depth step against its number of rows, which says what continuous batching can
  gain at most here.
* ``compile``: continuous batching of those prompts, eager against compiled (inductor, fixed shapes),
  at full depth and self-speculative, greedy; the compile time apart.
* ``memory``: the peak resident memory of a process that decodes 8 prompts through 8 slots, and of one
  that decodes 1,000, against the cache one per prompt would hold.

    python -m benchmarks.decoding                   # about 30 minutes on 2 idle CPU cores
    python -m benchmarks.decoding --parts roofline --name decoding_quick
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import DEFAULT_DATA, REPO, RESULTS, alternating_step_times, write_results
from benchmarks.speculative import MODELS, SAMPLING, decode_all, load_prompts, timed
from lego_lightning import ExitTransformer, Stage, TransformerConfig
from lego_lightning.decoding import Engine, Request, measure_step_costs, speedup_bound
from lego_lightning.decoding.cache import SlotCache
from lego_lightning.decoding.speed import step_functions
from lego_lightning.model import flops

PARTS = ("memory", "roofline", "sampled", "continuous", "compile")  # memory first: before other parts' allocations
# Targets of the issue.
TARGETS = {"step over bare products": 2.4, "sampled batch 8": 1.2, "continuous over static": 1.3, "share of bound": 0.9}
# aten operations of a step, by what they do; the rest is "other operations", the wall time they leave "Python".
OPERATIONS = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "norms": ("aten::native_layer_norm",),
    "activation": ("aten::gelu", "aten::silu"),
    "cache writes": ("aten::index_copy_", "aten::copy_"),
    "embedding and indexing": ("aten::index", "aten::index_select", "aten::embedding", "aten::index_put_",
                               "aten::_index_put_impl_"),
    "residual adds": ("aten::add",),
    "argmax": ("aten::argmax",),
}  # fmt: skip


# ------------------------------------------------------------------------------------------ roofline
def roofline_model() -> ExitTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=2048, n_layers=8, d_model=256, n_heads=4, max_seq_len=128,
                            head_sharing="shared", stages=[Stage((1, 2)), Stage((3, 8))])  # fmt: skip
    return ExitTransformer(cfg).eval()


def bare_products(model: ExitTransformer, layers: range, heads: int, batch: int, positions: int = 1) -> Callable:
    """The matrix products of ``layers`` (and ``heads`` head products) on ``batch * positions`` rows, nothing
    else: what a step cannot do without."""
    weights = [w for layer in layers for w in (lambda b: (b.attn.qkv.weight, b.attn.proj.weight, b.mlp.fc.weight,
                                                          b.mlp.proj.weight))(model.blocks[layer - 1])]  # fmt: skip
    weights += [model.heads[0].proj.weight] * heads
    inputs = {w.shape[1]: torch.randn(batch * positions, w.shape[1]) for w in weights}

    @torch.no_grad()
    def products() -> None:
        for w in weights:
            F.linear(inputs[w.shape[1]], w)

    products.bytes = sum(w.numel() * w.element_size() for w in weights)  # type: ignore[attr-defined]
    return products


def memory_bandwidth() -> float:
    """Bytes per second reading a 256 MB tensor (the median of 5 sums), this machine's streaming read rate."""
    x = torch.ones(64 * 2**20)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / statistics.median(times[1:])


def matmul_peak() -> float:
    """FLOP/s of a 1024 x 1024 by 1024 x 1024 product in float32 (the median of 5)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 1024**3 / statistics.median(times)


def by_operation(fn: Callable[[], None], calls: int = 20) -> dict[str, float]:
    """Seconds per call of ``fn`` by kind of operation (self CPU time, torch's profiler), and the wall time per
    call that the operations leave to Python and dispatch."""
    from torch.profiler import profile

    fn()
    with profile() as prof:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - start) / calls
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        kind = next((k for k, ops in OPERATIONS.items() if event.key in ops), "other operations")
        out[kind] += event.self_cpu_time_total / 1e6 / calls
    out["Python and dispatch"] = max(0.0, wall - sum(out.values()))
    out["wall (profiled)"] = wall
    return dict(out)


def measure_roofline(args: argparse.Namespace) -> list[dict[str, Any]]:
    model = roofline_model()
    cfg = model.config
    E, K, context = 2, 4, 64
    bandwidth, peak = memory_bandwidth(), matmul_peak()
    rows = []
    for batch in (1, 8):
        eager = step_functions(model, E, K, batch, context)
        compiled = step_functions(model, E, K, batch, context, compile_backend="inductor")
        bare = {
            "full": bare_products(model, range(1, cfg.n_layers + 1), 1, batch),
            "draft": bare_products(model, range(1, E + 1), 1, batch),
            # a verification: the lower layers for the last draft, the upper ones and the head over K + 1 positions
            "verify": _both(
                bare_products(model, range(1, E + 1), 0, batch),
                bare_products(model, range(E + 1, cfg.n_layers + 1), 1, batch, K + 1),
            ),
        }
        steps = {
            f"{kind} {mode}": fns[kind] for kind in bare for mode, fns in (("eager", eager), ("compiled", compiled))
        }
        steps |= {f"{kind} bare": fn for kind, fn in bare.items()}
        times = alternating_step_times(steps, rounds=args.rounds, per_round=args.per_round)
        layer = flops.layer_flops(cfg, context).total
        head = flops.head_flops(cfg).total
        work = {
            "full": batch * (cfg.n_layers * layer + head),
            "draft": batch * (E * layer + head),
            "verify": batch * (E * layer + (K + 1) * ((cfg.n_layers - E) * layer + head)),
        }
        for kind, products in bare.items():
            bare_s = statistics.median(times[f"{kind} bare"])
            for mode in ("eager", "compiled"):
                seconds = statistics.median(times[f"{kind} {mode}"])
                rows.append({
                    "part": "roofline", "step": kind, "mode": mode, "batch": batch, "seconds": seconds,
                    "bare_seconds": bare_s, "over_bare": seconds / bare_s,
                    "over_bandwidth": seconds / (products.bytes / bandwidth), "weight_bytes": products.bytes,
                    "flops": work[kind], "share_of_peak": work[kind] / seconds / peak,
                    "operations": by_operation((eager if mode == "eager" else compiled)[kind]),
                    "bandwidth": bandwidth, "matmul_peak": peak,
                })  # fmt: skip
        print(f"roofline batch {batch}: done", flush=True)
    return rows


def _both(a: Callable, b: Callable) -> Callable:
    def both() -> None:
        a()
        b()

    both.bytes = a.bytes + b.bytes  # type: ignore[attr-defined]
    return both


# ------------------------------------------------------------------------------------------- sampled
def measure_sampled(args: argparse.Namespace, model: ExitTransformer) -> list[dict[str, Any]]:
    prompts = load_prompts(MODELS["layerskip"], args.data, 8, 32)
    rows = []
    for e in args.exits:
        full_before, _ = timed(lambda: decode_all(model, prompts, 8, 48, **SAMPLING), args.timings)
        cells = []
        for k in args.ks:
            seconds, out = timed(
                lambda k=k, e=e: decode_all(model, prompts, 8, 48, draft_exit=e, num_speculations=k, **SAMPLING),
                args.timings,
            )
            drafts, accepted = (sum(int(getattr(g, f).sum()) for g in out) for f in ("drafts", "accepted"))
            cells.append({"part": "sampled", "draft_exit": e, "k": k, "seconds": seconds,
                          "kept_share": accepted / drafts if drafts else 0.0})  # fmt: skip
        full_after, _ = timed(lambda: decode_all(model, prompts, 8, 48, **SAMPLING), args.timings)
        for cell in cells:
            cell |= {"full_seconds": min(full_before, full_after),
                     "speedup": min(full_before, full_after) / cell["seconds"]}  # fmt: skip
        rows += cells
        print(f"sampled exit {e}: best {max(c['speedup'] for c in cells):.2f}x", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- continuous
def continuous_prompts(args: argparse.Namespace) -> tuple[list[list[int]], list[int]]:
    prompts = load_prompts(MODELS["layerskip"], args.data, args.requests, args.request_prompt_tokens).tolist()
    draw = random.Random(0)
    budget = 128 - args.request_prompt_tokens
    return prompts, [draw.randint(16, min(112, budget)) for _ in prompts]


def serve(
    model: ExitTransformer, prompts: list[list[int]], new: list[int], settings: dict[str, Any], static: bool,
    slots: int = 8, compile_backend: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every request arrives at the start; ``static``: 8 at a time, the next 8 when all have ended."""
    engine = Engine(model, slots, max_speculations=8, compile_backend=compile_backend)
    start = time.perf_counter()
    first: dict[int, float] = {}
    ended: dict[int, float] = {}
    tokens: dict[int, list[int]] = {}
    stats = {"drafts": 0, "accepted": 0, "refusals": 0, "rounds": 0}
    chunks = [range(i, min(i + slots, len(prompts))) for i in range(0, len(prompts), slots)] if static else [
        range(len(prompts))]  # fmt: skip
    for chunk in chunks:
        ids = {engine.add(Request(prompts[i], max_new_tokens=new[i], seed=i, **settings)): i for i in chunk}
        while engine.busy:
            for event in engine.step():
                now = time.perf_counter() - start
                if event.tokens:
                    first.setdefault(ids[event.id], now)
                if event.completion is not None:
                    i = ids[event.id]
                    ended[i], tokens[i] = now, event.completion.tokens
                    for key, value in (("drafts", event.completion.drafts), ("accepted", event.completion.accepted),
                                       ("refusals", event.completion.refusals),
                                       ("rounds", event.completion.verifications)):  # fmt: skip
                        stats[key] += value
    seconds = time.perf_counter() - start
    latencies = sorted(ended.values())
    firsts = sorted(first.values())
    made = sum(len(t) for t in tokens.values())
    return {
        "seconds": seconds, "tokens": made, "tokens_per_s": made / seconds,
        "ttft_p50": _percentile(firsts, 50), "ttft_p99": _percentile(firsts, 99),
        "latency_p50": _percentile(latencies, 50), "latency_p99": _percentile(latencies, 99),
        "outputs": [tokens[i] for i in range(len(prompts))], **stats,
    }  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def measure_continuous(
    args: argparse.Namespace, model: ExitTransformer, rows_so_far: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every configuration once per round, the rounds in turn; each figure the median over the rounds, each
    ratio the median of the rounds' own ratios (a machine slower one minute than the next moves both sides)."""
    prompts, new = continuous_prompts(args)
    rows = []
    context = args.request_prompt_tokens + statistics.fmean(new) / 2
    sampled_grid = [r for r in rows_so_far if r["part"] == "sampled"]
    for mode, sampling in (("greedy", {}), ("sampled", SAMPLING)):
        exit_, k = args.greedy_setting if mode == "greedy" else args.sampled_setting
        if mode == "sampled" and sampled_grid:  # the best cell of the sampled part, at batch 8 as here
            best = max(sampled_grid, key=lambda r: r["speedup"])
            exit_, k = best["draft_exit"], best["k"]
        speculative = f"self-speculative (exit {exit_}, K={k})"
        settings = {"full depth": sampling, speculative: sampling | {"draft_exit": exit_, "num_speculations": k}}
        rounds = []
        for _ in range(args.continuous_rounds):
            # The bound's step costs, with the slots at different lengths as continuous batching keeps them.
            costs = measure_step_costs(model, exit_, k, 8, int(context), repeats=args.repeats, spread=True)
            runs = {(d, b): serve(model, prompts, new, settings[d], b == "static")
                    for d in settings for b in ("static", "continuous")}  # fmt: skip
            rounds.append((costs, runs))
        for decoding in settings:
            for batching in ("static", "continuous"):
                runs_here = [runs[(decoding, batching)] for _, runs in rounds]
                row: dict[str, Any] = {"part": "continuous", "mode": mode, "decoding": decoding, "batching": batching}
                for key in ("tokens_per_s", "ttft_p50", "ttft_p99", "latency_p50", "latency_p99"):
                    row[key] = statistics.median(r[key] for r in runs_here)
                row["over_static"] = statistics.median(
                    runs[(decoding, batching)]["tokens_per_s"] / runs[(decoding, "static")]["tokens_per_s"]
                    for _, runs in rounds
                )
                # Greedy self-speculation must give full depth's tokens; sampled, it draws its own (same law).
                if mode == "greedy":
                    row["same_as_full_depth"] = all(
                        runs[(decoding, batching)]["outputs"] == runs[("full depth", batching)]["outputs"]
                        for _, runs in rounds
                    )
                if decoding == speculative:
                    speedups, bounds = [], []
                    for costs, runs in rounds:
                        r = runs[(decoding, batching)]
                        acceptance = r["accepted"] / max(1, r["accepted"] + r["refusals"])
                        bounds.append(speedup_bound(acceptance, k, costs.draft, costs.verify, costs.full))
                        speedups.append(r["tokens_per_s"] / runs[("full depth", batching)]["tokens_per_s"])
                    row |= {
                        "acceptance": statistics.median(
                            r["accepted"] / max(1, r["accepted"] + r["refusals"]) for r in runs_here
                        ),
                        "over_full_depth": statistics.median(speedups),
                        "bound": statistics.median(bounds),
                        "share_of_bound": statistics.median(x / b for x, b in zip(speedups, bounds)),
                        "rounds": [{"speedup": x, "bound": b} for x, b in zip(speedups, bounds)],
                    }
                rows.append(row)
        full = next(r for r in rows if (r["mode"], r["decoding"], r["batching"]) == (mode, "full depth", "continuous"))
        print(f"continuous {mode}: continuous over static at full depth {full['over_static']:.2f}x", flush=True)
    return [*rows, batching_ceiling(args, model, new, context)]


def batching_ceiling(args: argparse.Namespace, model: ExitTransformer, new: list[int], context: float) -> dict:
    """What continuous batching can gain at most at full depth: a step's cost against its number of rows
    (fitted as fixed + per row), then static batches' steps (each as long as its longest request, its rows
    leaving as they end) against continuous batching's (every slot busy), at those costs."""
    widths = (1, 2, 4, 8)
    steps = {r: step_functions(model, 1, 1, r, int(context), spread=True)["full"] for r in widths}
    times = alternating_step_times(steps, rounds=args.rounds, per_round=args.per_round)
    cost = {r: statistics.median(times[r]) for r in widths}
    per_row, fixed = statistics.linear_regression(widths, [cost[r] for r in widths])
    static = sum(
        fixed + per_row * sum(n > t for n in new[i : i + 8])
        for i in range(0, len(new), 8)
        for t in range(max(new[i : i + 8]))
    )
    continuous = sum(new) / 8 * (fixed + 8 * per_row)
    return {"part": "ceiling", "step_seconds": cost, "fixed": fixed, "per_row": per_row, "static_seconds": static,
            "continuous_seconds": continuous, "ceiling": static / continuous}  # fmt: skip


# ------------------------------------------------------------------------------------------- compile
def measure_compile(args: argparse.Namespace, model: ExitTransformer) -> list[dict[str, Any]]:
    prompts, new = continuous_prompts(args)
    prompts, new = prompts[:16], new[:16]
    exit_, k = args.greedy_setting
    rows = []
    for decoding, settings in (("full depth", {}), (f"self-speculative (exit {exit_}, K={k})",
                                                    {"draft_exit": exit_, "num_speculations": k})):  # fmt: skip
        for slots in (1, 8):
            start = time.perf_counter()
            serve(model, prompts[:2], new[:2], settings, False, slots, "inductor")  # compiles every kind of pass
            compile_s = time.perf_counter() - start
            eager_runs, compiled_runs = [], []
            for _ in range(args.timings):  # in turn: whatever else loads the machine loads both
                eager_runs.append(serve(model, prompts, new, settings, False, slots))
                compiled_runs.append(serve(model, prompts, new, settings, False, slots, "inductor"))
            eager = max(eager_runs, key=lambda r: r["tokens_per_s"])
            compiled = max(compiled_runs, key=lambda r: r["tokens_per_s"])
            rows.append({
                "part": "compile", "decoding": decoding, "slots": slots, "eager_tokens_per_s": eager["tokens_per_s"],
                "compiled_tokens_per_s": compiled["tokens_per_s"],
                "compiled_over_eager": compiled["tokens_per_s"] / eager["tokens_per_s"], "compile_seconds": compile_s,
                "same_tokens": eager["outputs"] == compiled["outputs"],
            })  # fmt: skip
            print(f"compile {decoding} slots {slots}: {rows[-1]['compiled_over_eager']:.2f}x", flush=True)
    return rows


# -------------------------------------------------------------------------------------------- memory
def measure_memory(args: argparse.Namespace, model: ExitTransformer) -> list[dict[str, Any]]:
    """The peak resident memory of a process that loads the model and decodes 8, then 1,000 prompts through
    8 slots (each its own process, so neither inherits the other's peak): what 992 more prompts cost."""
    rows = []
    for count in (8, 1000):
        cmd = [sys.executable, "-m", "benchmarks.decoding", "--memory-probe", str(count),
               "--request-prompt-tokens", str(args.request_prompt_tokens), "--data", str(args.data)]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
        rows.append({"part": "memory", "prompts": count, "slots": 8, **json.loads(done.stdout.splitlines()[-1])})
        print(f"memory {count} prompts: peak {rows[-1]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    return rows


def memory_probe(args: argparse.Namespace) -> None:
    """``--memory-probe N``: load the model, decode N prompts (16 new tokens each) through 8 slots, print the
    process's peak resident memory and the slots' cache as a JSON line."""
    model = ExitTransformer.from_pretrained(MODELS["layerskip"]).eval()
    base, _ = continuous_prompts(args)
    new = 16
    engine = Engine(model, 8, max_speculations=0, max_context=args.request_prompt_tokens + new)
    for i in range(args.memory_probe):
        engine.add(Request(base[i % len(base)], max_new_tokens=new))
    done = engine.run()
    assert len(done) == args.memory_probe
    per_slot = SlotCache.bytes_per_slot(model.config, engine.cache.width, engine.cache.keys.dtype)
    peak = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))  # fmt: skip
    print(json.dumps({"peak_bytes": peak, "cache_bytes": 8 * per_slot, "new_tokens": new,
                      "one_cache_per_prompt_bytes": args.memory_probe * per_slot}))  # fmt: skip


# -------------------------------------------------------------------------------------------- report
def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = ["# The decoding engine: steps against the hardware, continuous batching, sampled self-speculation", ""]
    roof = [r for r in rows if r["part"] == "roofline"]
    if roof:
        r0 = roof[0]
        out += [
            "## Each step against its roofline",
            "",
            f"d_model 256, 8 layers, a 2,048-token vocabulary, 64 tokens cached; draft = layers 1-2 and the head, "
            f"verify = 4 drafts. This machine: {r0['bandwidth'] / 1e9:.1f} GB/s reading memory, "
            f"{r0['matmul_peak'] / 1e9:.0f} GFLOP/s in a 1024-cube matrix product. Bare products: the step's "
            "matrix products alone, timed in turn with it (median). Bandwidth bound: the weights' bytes at that rate.",
            "",
            "| step | batch | mode | ms | bare products ms | over bare | over bandwidth bound | share of matmul peak |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in roof:
            out.append(
                f"| {r['step']} | {r['batch']} | {r['mode']} | {r['seconds'] * 1e3:.2f} | "
                f"{r['bare_seconds'] * 1e3:.2f} | {r['over_bare']:.2f}x | {r['over_bandwidth']:.1f}x | "
                f"{r['share_of_peak']:.1%} |"
            )
        kinds = [*OPERATIONS, "other operations", "Python and dispatch", "wall (profiled)"]
        out += ["", "Where a step's time goes, by operation (ms per step, eager, torch's profiler, which slows "
                "each operation a little):", "",
                "| step | batch | " + " | ".join(kinds) + " |", "|---|---" + "|---" * len(kinds) + "|"]  # fmt: skip
        for r in roof:
            if r["mode"] == "eager":
                ops = r["operations"]
                out.append(f"| {r['step']} | {r['batch']} | " + " | ".join(f"{ops.get(k, 0) * 1e3:.2f}" for k in kinds)
                           + " |")  # fmt: skip
    sampled = [r for r in rows if r["part"] == "sampled"]
    if sampled:
        best = max(sampled, key=lambda r: r["speedup"])
        median = statistics.median(r["speedup"] for r in sampled)
        out += [
            "",
            "## Sampled self-speculation at batch 8 (the LayerSkip model)",
            "",
            "| draft exit | " + " | ".join(f"K={k}" for k in args.ks) + " |",
            "|---" * (len(args.ks) + 1) + "|",
        ]
        for e in sorted({r["draft_exit"] for r in sampled}):
            cells = {r["k"]: r for r in sampled if r["draft_exit"] == e}
            out.append(f"| {e} | " + " | ".join(f"{cells[k]['speedup']:.2f}x ({cells[k]['kept_share']:.2f})"
                                               if k in cells else "" for k in args.ks) + " |")  # fmt: skip
        target = TARGETS["sampled batch 8"]
        out += ["", f"Best: exit {best['draft_exit']}, K={best['k']}, {best['speedup']:.2f}x full depth "
                f"({'meets' if best['speedup'] >= target else 'misses'} the {target}x target); median cell "
                f"{median:.2f}x. Each cell: speed-up (share of drafts kept)."]  # fmt: skip
    cont = [r for r in rows if r["part"] == "continuous"]
    if cont:
        out += ["", "## Static batches against continuous batching (64 requests, 8 slots)", "",
                f"{args.continuous_rounds} rounds, each running every configuration once, in turn; each figure "
                "is the median over the rounds, each ratio the median of the rounds' own ratios. Bound: the "
                "speed bound from the run's acceptance and the step costs measured at the start of its round "
                "(slots at different lengths); share of bound: a round's speed-up over its own bound. Every "
                "request arrives at the start, so time to first token includes the wait for a slot.", "",
                "| decoding | sampling | batching | tokens/s | over static | TTFT p50 s | TTFT p99 s | latency p50 s | "
                "latency p99 s | over full depth | bound | share of bound | greedy = full depth |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in cont:
            spec = "over_full_depth" in r
            out.append(
                f"| {r['decoding']} | {r['mode']} | {r['batching']} | {r['tokens_per_s']:.0f} | "
                f"{r['over_static']:.2f}x | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['latency_p50']:.2f} | "
                f"{r['latency_p99']:.2f} | " + (f"{r['over_full_depth']:.2f}x | {r['bound']:.2f}x | "
                                              f"{r['share_of_bound']:.2f} |" if spec else " | | |")
                + {True: " yes |", False: " no |", None: " |"}[r.get("same_as_full_depth")]
            )  # fmt: skip
    ceiling = [r for r in rows if r["part"] == "ceiling"]
    if ceiling:
        c = ceiling[0]
        target = TARGETS["continuous over static"]
        out += ["", f"A full-depth step costs {c['fixed'] * 1e3:.1f} ms plus {c['per_row'] * 1e3:.2f} ms a row here "
                f"(fitted to 1, 2, 4 and 8 rows). Continuous batching saves only the first part: at these costs "
                f"these requests' static batches take {c['ceiling']:.2f}x the steps' time of continuous batching "
                f"(before prefills and the last requests' tail), the most it can gain over them here, against the "
                f"issue's target of {target}x."]  # fmt: skip
    comp = [r for r in rows if r["part"] == "compile"]
    if comp:
        out += ["", "## Compiled (inductor, fixed shapes) against eager: 16 requests, continuous batching, greedy", "",
                "| decoding | slots | eager tokens/s | compiled tokens/s | compiled over eager | compile s | "
                "same tokens |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in comp:
            out.append(f"| {r['decoding']} | {r['slots']} | {r['eager_tokens_per_s']:.0f} | "
                       f"{r['compiled_tokens_per_s']:.0f} | {r['compiled_over_eager']:.2f}x | "
                       f"{r['compile_seconds']:.0f} | {'yes' if r['same_tokens'] else 'no'} |")  # fmt: skip
    mem = [r for r in rows if r["part"] == "memory"]
    if len(mem) == 2:
        few, many = mem
        out += ["", "## Memory", "",
                f"A process that loads the model and decodes {few['prompts']} prompts through 8 slots "
                f"({few['new_tokens']} new tokens each) peaks at {few['peak_bytes'] / 2**20:.0f} MiB resident; one "
                f"that decodes {many['prompts']} peaks at {many['peak_bytes'] / 2**20:.0f} MiB "
                f"({(many['peak_bytes'] - few['peak_bytes']) / 2**20:+.0f} MiB for {many['prompts'] - few['prompts']} "
                f"more prompts). The slots' cache is {many['cache_bytes'] / 2**20:.2f} MiB; one cache per prompt would "
                f"be {many['one_cache_per_prompt_bytes'] / 2**20:.0f} MiB."]  # fmt: skip
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--exits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--greedy-setting", type=int, nargs=2, default=[1, 4], metavar=("EXIT", "K"))
    parser.add_argument("--sampled-setting", type=int, nargs=2, default=[4, 1], metavar=("EXIT", "K"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--request-prompt-tokens", type=int, default=16)
    parser.add_argument("--timings", type=int, default=3, help="timings of each decoding (the fastest counts)")
    parser.add_argument("--continuous-rounds", type=int, default=5, help="continuous: rounds (the median counts)")
    parser.add_argument("--rounds", type=int, default=15, help="roofline: rounds of steps timed in turn")
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20, help="timings per step cost (median)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--name", default="decoding")
    parser.add_argument("--resume", action="store_true", help="keep the parts already in the results JSON")
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe is not None:
        return memory_probe(args)
    stored = RESULTS / f"{args.name}.json"
    rows: list[dict[str, Any]] = json.loads(stored.read_text())["rows"] if args.resume and stored.exists() else []
    done = {r["part"] for r in rows}
    model = ExitTransformer.from_pretrained(MODELS["layerskip"]).eval()
    measure = {
        "roofline": lambda: measure_roofline(args),
        "sampled": lambda: measure_sampled(args, model),
        "continuous": lambda: measure_continuous(args, model, rows),
        "compile": lambda: measure_compile(args, model),
        "memory": lambda: measure_memory(args, model),
    }
    for part in args.parts:
        if part in done:
            continue
        rows += measure[part]()
        write_results(args.name, rows, report(rows, args))
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
