"""What full depth pays per token when a batch's rows stand at different lengths, against rows in step.

``auto_draft``'s full-depth baseline decodes requests of one length that start together: at full
depth every row gains one token a round, so the rows stay in step, end together and the next ones
are admitted together. Once a batch drafts, its rows gain different numbers of tokens a round and
fall out of step for good: they end apart, and newcomers are prefilled one or two at a time beside the
others' round instead of a batch's worth together.
Auto is judged against the baseline in step, while every round it runs, its full-depth steps
included, is at rows out of step. This times full depth both ways on the same prompts, in turns:
every request of ``--new-tokens`` (in step), and each request's length varied by up to
``--spread`` tokens around it (out of step after the first requests end), per generated token.
The defaults (80 +- 16) keep the longest request within the benchmark models' context of 128 after
a prompt of 32, at the mean context of both ways alike.

    python -m benchmarks.full_depth_stagger       # both models, batch 8, greedy and sampled, ~8 minutes
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.auto_draft import prompts_of
from benchmarks.common import DEFAULT_DATA, add_resume_arguments, index_runs, resumed_runs, write_results
from benchmarks.speculative import MODELS, SAMPLING
from lego_lightning import ExitTransformer
from lego_lightning.decoding import Engine, Request


def lengths_of(count: int, new: int, spread: int) -> list[int]:
    """Each request's ``max_new_tokens``: ``new`` for all (``spread`` 0), or lengths from ``new - spread`` to
    ``new + spread`` in steps of a quarter of ``spread`` (mean about ``new``), in an order where neighbours end
    apart."""
    if spread == 0:
        return [new] * count
    steps = [new + d for d in range(-spread, spread + 1, max(1, spread // 4))]
    return [steps[(i * 2) % len(steps)] for i in range(count)]


def seconds_per_token(
    model: ExitTransformer, prompts: torch.Tensor, slots: int, lengths: list[int], sampled: bool
) -> float:
    """Full depth over ``prompts`` through ``slots`` slots, request ``i`` to ``lengths[i]`` tokens: seconds a token."""
    engine = Engine(model, slots)
    sampling = SAMPLING if sampled else {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add(Request(p.tolist(), max_new_tokens=n, seed=i if sampled else None, **sampling))
    start = time.perf_counter()
    done = engine.run()
    seconds = time.perf_counter() - start
    return seconds / sum(len(c.tokens) for c in done.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sampled"], default=["greedy", "sampled"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=80)
    parser.add_argument("--spread", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "full_depth_stagger")
    args = parser.parse_args()
    keys = ("batch", "prompts", "prompt_tokens", "new_tokens", "spread", "rounds")
    settings = {k: getattr(args, k) for k in keys}
    runs, earlier = resumed_runs(args, "rows", settings)

    def key(r: dict[str, Any]) -> tuple:
        return (r["model"], r["mode"])

    done = index_runs(runs, key)
    for name in args.models:
        model = ExitTransformer.from_pretrained(MODELS[name]).eval()
        prompts = prompts_of("mixed", MODELS[name], args.data, args.prompts, args.prompt_tokens)
        ways = {"in step": 0, "out of step": args.spread}
        for mode in args.modes:
            if (name, mode) in done:
                continue
            times: dict[str, list[float]] = {w: [] for w in ways}
            with torch.no_grad():
                for _ in range(args.rounds):  # in turns: a slower minute of the machine slows both alike
                    for way, spread in ways.items():
                        lengths = lengths_of(len(prompts), args.new_tokens, spread)
                        times[way].append(seconds_per_token(model, prompts, args.batch, lengths, mode == "sampled"))
            paired = [o / s for o, s in zip(times["out of step"], times["in step"])]
            ratio = statistics.median(times["out of step"]) / statistics.median(times["in step"])
            done[(name, mode)] = r = {"model": name, "mode": mode, "seconds_per_token": times, "ratio": ratio,
                                      "paired": statistics.median(paired)}  # fmt: skip
            print(f"{name} {mode}: out of step / in step {r['ratio']:.3f} (paired {r['paired']:.3f})", flush=True)
            rows = sorted(done.values(), key=key)
            write_results(args.name, rows, report(rows, args), extra={"settings": settings, "resumed_from": earlier})


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        "# Full depth with a batch's rows in step and out of step",
        "",
        f"{args.prompts} mixed prompts (WikiText-2 and Python, {args.prompt_tokens} tokens each) at full depth through "
        f"{args.batch} slots, continuous batching; sampled = temperature {SAMPLING['temperature']}, top-p "
        f"{SAMPLING['top_p']}, a seed per prompt. In step: every request {args.new_tokens} new tokens; out of step: "
        f"{args.new_tokens} +- up to {args.spread}. Seconds per generated token, medians of {args.rounds} timings "
        "taken in turns; `paired`: the median of the per-turn ratios.",
        "",
        "| model | decoding | in step (ms/token) | out of step (ms/token) | out of step / in step | paired |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["seconds_per_token"]
        out.append(
            f"| {r['model']} | {r['mode']} | {statistics.median(t['in step']) * 1e3:.3f} | "
            f"{statistics.median(t['out of step']) * 1e3:.3f} | {r['ratio']:.3f} | {r['paired']:.3f} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    main()
