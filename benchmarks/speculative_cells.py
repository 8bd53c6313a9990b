"""The speculative benchmark's best cells timed again, and where sampled self-speculation spends its time.

``benchmarks/results/speculative.md`` found the best draft exit and K of the LayerSkip model for
batch 1 and 8, greedy and sampled. This times those four cells and full depth on the same prompts
(8 WikiText-2 valid prompts of 32 tokens, 48 new tokens, sampled at temperature 0.8, top-p 0.95;
full depth timed before and after each cell, the fastest of ``--timings`` runs of each), and
profiles sampled self-speculation at batch 8 by operation, grouped into layers, heads, sampling
and the rest. It uses nothing but ``generate``, so it runs at a commit older than itself too (copy
it there, as ``benchmarks/greedy_hashes.py`` says) and the two commits compare on one machine,
one after the other::

    python -m benchmarks.speculative_cells --name speculative_cells_b19f5bb      # at b19f5bb
    python -m benchmarks.speculative_cells --against speculative_cells_b19f5bb   # here; ~5 minutes each
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_DATA, RESULTS, write_results
from benchmarks.speculative import MODELS, SAMPLING, decode_all, load_prompts, timed
from lego_lightning import ExitTransformer

# aten operations by what they do in a decoding step (self CPU time); anything else is "other operations".
GROUPS = {
    "layers: matrix products": ("aten::addmm", "aten::mm", "aten::bmm"),
    "layers: attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                          "aten::_scaled_dot_product_attention_math"),
    "layers: norms and activations": ("aten::native_layer_norm", "aten::gelu", "aten::silu", "aten::rsqrt"),
    "sampling: sort, top-k, nucleus": ("aten::sort", "aten::topk", "aten::scatter_add_", "aten::cumsum", "aten::log",
                                       "aten::searchsorted", "aten::multinomial", "aten::_softmax", "aten::softmax",
                                       "aten::masked_fill", "aten::masked_fill_", "aten::div", "aten::uniform_",
                                       "aten::exponential_"),
}  # fmt: skip


def best_cells(model: str) -> list[dict[str, Any]]:
    """The committed speculative benchmark's best fixed setting of ``model`` per batch and decoding."""
    rows = json.loads((RESULTS / "speculative.json").read_text())["runs"]
    best: dict[tuple[int, str], dict[str, Any]] = {}
    for r in rows:
        if r["model"] == model and r["draft_threshold"] is None:
            key = (r["batch"], r["mode"])
            if key not in best or r["speedup"] > best[key]["speedup"]:
                best[key] = r
    return [
        {"batch": b, "mode": m, "draft_exit": r["draft_exit"], "k": r["k"], "committed_speedup": r["speedup"]}
        for (b, m), r in sorted(best.items())
    ]


def profile(fn: Any) -> dict[str, float]:
    """Self CPU seconds of one call of ``fn`` by group, and the wall time left to Python between operations."""
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile() as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    groups: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        name = next((g for g, ops in GROUPS.items() if event.key in ops), "other operations")
        groups[name] += event.self_cpu_time_total / 1e6
    groups["Python and dispatch between operations"] = max(0.0, wall - sum(groups.values()))
    return {"wall": wall, **groups}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="layerskip")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--timings", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--name", default="speculative_cells")
    parser.add_argument("--against", default=None, help="results name of another commit's run, for the comparison")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ExitTransformer.from_pretrained(MODELS[args.model]).eval()
    prompts = load_prompts(MODELS[args.model], args.data, args.prompts, args.prompt_tokens)
    new = args.new_tokens
    tokens = args.prompts * new
    rows = []
    for cell in best_cells(args.model):
        sampling = SAMPLING if cell["mode"] == "sampled" else {}
        batch = cell["batch"]
        spec = {"draft_exit": cell["draft_exit"], "num_speculations": cell["k"]}

        def decode(batch: int = batch, **kwargs: Any) -> list[Any]:
            return decode_all(model, prompts, batch, new, **kwargs)

        full_before, full = timed(lambda: decode(**sampling), args.timings)  # noqa: B023  (called here, at once)
        seconds, out = timed(lambda: decode(**sampling, **spec), args.timings)  # noqa: B023
        full_after, _ = timed(lambda: decode(**sampling), args.timings)  # noqa: B023
        if cell["mode"] == "greedy":
            assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(out, full)), "greedy tokens differ"
        full_s = min(full_before, full_after)
        rows.append(cell | {"seconds": seconds, "full_seconds": full_s, "speedup": full_s / seconds,
                            "tokens_per_s": tokens / seconds, "full_tokens_per_s": tokens / full_s})  # fmt: skip
        print(f"batch {batch} {cell['mode']}: {full_s / seconds:.2f}x", flush=True)
    sampled_8 = next(c for c in rows if (c["batch"], c["mode"]) == (8, "sampled"))
    spec = {"draft_exit": sampled_8["draft_exit"], "num_speculations": sampled_8["k"]}
    profiles = {
        "full depth": profile(lambda: decode_all(model, prompts, 8, new, **SAMPLING)),
        f"self-speculative (exit {spec['draft_exit']}, K={spec['num_speculations']})": profile(
            lambda: decode_all(model, prompts, 8, new, **SAMPLING, **spec)
        ),
    }
    theirs = json.loads((RESULTS / f"{args.against}.json").read_text()) if args.against else None
    write_results(args.name, rows, report(rows, profiles, args, theirs), extra={"profiles": profiles})


def report(
    rows: list[dict[str, Any]], profiles: dict[str, dict[str, float]], args: argparse.Namespace,
    theirs: dict[str, Any] | None,
) -> str:  # fmt: skip
    out = [
        "# The speculative benchmark's best cells timed again; where sampled self-speculation spends its time",
        "",
        f"Model `{args.model}`; {args.prompts} WikiText-2 valid prompts of {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens each; sampled = temperature {SAMPLING['temperature']}, top-p "
        f"{SAMPLING['top_p']}. Speed-up: full depth's time (the faster of its timings just before and just after) "
        f"over self-speculation's, the fastest of {args.timings} timings each, in this run.",
        "",
        "| batch | decoding | draft exit | K | speed-up | tokens/s | full depth tokens/s | committed speed-up |"
        + (f" `{args.against}` speed-up | `{args.against}` tokens/s |" if theirs else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if theirs else ""),
    ]
    for r in rows:
        line = (
            f"| {r['batch']} | {r['mode']} | {r['draft_exit']} | {r['k']} | {r['speedup']:.2f}x | "
            f"{r['tokens_per_s']:.0f} | {r['full_tokens_per_s']:.0f} | {r['committed_speedup']:.2f}x |"
        )
        if theirs:
            match = [t for t in theirs["rows"] if (t["batch"], t["mode"]) == (r["batch"], r["mode"])]
            line += f" {match[0]['speedup']:.2f}x | {match[0]['tokens_per_s']:.0f} |" if match else " | |"
        out.append(line)
    out += ["", "## Where the time goes: sampled, batch 8, the whole decoding of the prompts (seconds)", ""]
    names = list(profiles)
    out += ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    groups = [*GROUPS, "other operations", "Python and dispatch between operations", "wall"]
    for g in groups:
        out.append(f"| {g} | " + " | ".join(f"{profiles[n].get(g, 0.0):.3f}" for n in names) + " |")
    if theirs:
        out += ["", f"`{args.against}` on the same machine (its own run):", ""]
        names = list(theirs["profiles"])
        out += ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for g in groups:
            out.append(f"| {g} | " + " | ".join(f"{theirs['profiles'][n].get(g, 0.0):.3f}" for n in names) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
