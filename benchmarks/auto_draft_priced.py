"""How good auto's choices are, without timing noise: every round priced by one measured cost table.

``benchmarks/auto_draft.py`` times auto, the oracle and full depth on a 2-core machine whose speed
drifts by 10-30% between runs of the same decoding, so a gap of a few percent there may be the
choices or the minute. Here one engine's cost table (:func:`~lego_lightning.decoding.measure_draft_costs`,
timed once per cell) is given to every engine as ``draft_costs``, so auto chooses by fixed costs, and
each decoding is priced as the sum over its rounds of what the table says its setting costs (a round
costs its slowest row's). The same prompts are decoded as in ``auto_draft``, greedy to the same
tokens; only the clock is replaced. The grid (every draft exit before the last x ``--ks``), full
depth and auto are priced alike and the oracle is the grid's cheapest: its price is not biased
upward the way the fastest of noisy timings is.

What the table cannot see is not here: prefills (priced at nothing, alike for all), the probes'
head reads (counted, ``probe heads``, not priced), and how rounds really cost at longer contexts and
with rows at different lengths. The table itself is one timing of the machine: another process
measures another, and the prices move with it.

    python -m benchmarks.auto_draft_priced      # the 8 mixed cells, ~45 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.auto_draft import TARGETS, prompt_count, prompts_of, target_met
from benchmarks.common import DEFAULT_DATA, add_resume_arguments, index_runs, resumed_runs, write_results
from benchmarks.speculative import MODELS, SAMPLING, choice_counts, most_chosen
from lego_lightning import ExitTransformer
from lego_lightning.decoding import DraftCosts, Engine, Request, Sampling, measure_draft_costs


class PricedEngine(Engine):
    """An engine whose ``draft_costs`` are fixed to ``table`` (K up to the table's longest), summing in ``priced``
    what its rounds cost by it."""

    def __init__(self, model: ExitTransformer, slots: int, table: DraftCosts) -> None:
        cap = len(next(iter(table.rounds.values())))
        super().__init__(model, slots, max_speculations=cap, draft_costs=table)
        self.table, self.priced = table, 0.0

    def _round(self, rows: list, events: dict, new: list | None = None) -> None:
        # Every round of an engine runs through _round, at the rows' settings: a round beside which newcomers are
        # prefilled is priced as the round alone, so prefills are priced at nothing, as the docstring says.
        if rows:  # every row waits for the slowest: its setting's cost
            self.priced += max(
                self.table.seconds(r.draft_exit, r.num_speculations if r.draft_exit is not None else 0) for r in rows
            )
        super()._round(rows, events, new)


def priced(
    model: ExitTransformer, prompts: torch.Tensor, batch: int, new: int, sampled: bool, table: DraftCosts, **draft: Any
) -> tuple[float, dict[int, Any], dict[str, int]]:
    """Every prompt through one priced engine of ``batch`` slots; its price, completions and work."""
    engine = PricedEngine(model, batch, table)
    sampling = SAMPLING if sampled else {}
    ids = [
        engine.add(Request(p.tolist(), max_new_tokens=new, seed=i if sampled else None, **sampling, **draft))
        for i, p in enumerate(prompts)
    ]
    done = engine.run()
    return engine.priced, {i: done[request_id] for i, request_id in enumerate(ids)}, dict(engine.work)


def run_cell(model: ExitTransformer, prompts: torch.Tensor, batch: int, sampled: bool, args: Any) -> dict[str, Any]:
    new = args.new_tokens
    table = measure_draft_costs(model, batch, 8, Sampling(**SAMPLING) if sampled else None, prompts[0].tolist())
    full, full_out, _ = priced(model, prompts, batch, new, sampled, table)
    grid = {}
    for e in model.exit_layers[:-1]:
        for k in args.ks:
            grid[f"exit {e}, K={k}"] = priced(model, prompts, batch, new, sampled, table, draft_exit=e,
                                              num_speculations=k)[0]  # fmt: skip
    auto, out, work = priced(model, prompts, batch, new, sampled, table, draft_exit="auto", num_speculations="auto")
    if not sampled:
        assert all(out[i].tokens == full_out[i].tokens for i in out), "auto's greedy tokens differ from full depth's"
    oracle = min(grid, key=grid.get)
    ranked = sorted(grid.values())
    chosen = choice_counts([c.choices for c in out.values()])
    return {
        "table": {"rounds": {str(e): list(r) for e, r in table.rounds.items()}, "full": table.full},
        "full_seconds": full,
        "grid_seconds": grid,
        "auto_seconds": auto,
        "oracle": oracle,
        "auto_over_full": full / auto,
        "oracle_over_full": full / grid[oracle],
        "median_over_full": full / ranked[len(ranked) // 2],
        "auto_over_oracle": grid[oracle] / auto,
        "auto_choices": chosen,
        "full_depth_share": chosen.get("full depth", 0) / max(1, sum(chosen.values())),
        "probe_heads": work.get("probe_heads", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sampled"], default=["greedy", "sampled"])
    parser.add_argument("--kind", choices=["wikitext", "python", "mixed"], default="mixed")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompts-per-slot", type=int, default=4, help="at least this many prompts per slot")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 6])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "auto_draft_priced")
    args = parser.parse_args()
    settings = {
        k: getattr(args, k) for k in ("kind", "prompts", "prompts_per_slot", "prompt_tokens", "new_tokens", "ks")
    }
    runs, earlier = resumed_runs(args, "rows", settings)

    def key(r: dict[str, Any]) -> tuple:
        return (r["model"], r["batch"], r["mode"])

    done = index_runs(runs, key)
    torch.manual_seed(0)
    for name in args.models:
        model = ExitTransformer.from_pretrained(MODELS[name]).eval()
        every = prompts_of(
            args.kind, MODELS[name], args.data, prompt_count(args, max(args.batches)), args.prompt_tokens
        )
        for batch in args.batches:
            prompts = every[: prompt_count(args, batch)]
            for mode in args.modes:
                cell = {"model": name, "batch": batch, "mode": mode, "kind": args.kind}
                if key(cell) in done:
                    continue
                with torch.no_grad():
                    done[key(cell)] = r = cell | run_cell(model, prompts, batch, mode == "sampled", args)
                print(f"{name} b{batch} {mode}: auto {r['auto_over_full']:.2f}x, oracle {r['oracle_over_full']:.2f}x "
                      f"({r['oracle']}), auto/oracle {r['auto_over_oracle']:.3f}", flush=True)  # fmt: skip
                rows = sorted(done.values(), key=key)
                write_results(
                    args.name, rows, report(rows, args), extra={"settings": settings, "resumed_from": earlier}
                )


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    counts = ", ".join(f"{prompt_count(args, b)} at batch {b}" for b in args.batches)
    out = [
        "# Auto's choices priced by one cost table (no timing noise)",
        "",
        f"The `auto_draft` cells of {args.kind} prompts ({counts}, "
        f"{args.prompt_tokens} tokens each, {args.new_tokens} new tokens, continuous batching at `batch` slots; "
        f"sampled = temperature {SAMPLING['temperature']}, top-p {SAMPLING['top_p']}, a seed per prompt), each "
        "decoding priced as the sum over its rounds of one measured cost table's seconds for the round's setting "
        "(the table is also auto's `draft_costs`, so it chooses by the prices it is judged by). Oracle: the "
        f"grid's cheapest (every draft exit before the last x K in {args.ks}). Prefills are not priced, the "
        "probes' head reads are counted but not priced. Speed-ups are full depth's price over each.",
        "",
        "| model | batch | decoding | auto | oracle | median setting | auto / oracle | oracle setting | "
        "auto's most chosen | full depth | probe heads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['auto_over_full']:.2f}x | "
            f"{r['oracle_over_full']:.2f}x | {r['median_over_full']:.2f}x | {r['auto_over_oracle']:.3f} | "
            f"{r['oracle']} | "
            f"{most_chosen(r['auto_choices'])} | {r['full_depth_share']:.0%} | {r['probe_heads']} |"
        )
    out += [
        "",
        f"Priced, auto >= {TARGETS['auto / oracle']} of the oracle in "
        + target_met(rows, "auto_over_oracle", TARGETS["auto / oracle"],
                     lambda r: f"{r['auto_over_oracle']:.3f}", "cells")
        + ", >= full depth in "
        + target_met(rows, "auto_over_full", TARGETS["auto / full depth"], lambda r: f"{r['auto_over_full']:.2f}x")
        + f"; the median over cells of auto / oracle is {statistics.median(r['auto_over_oracle'] for r in rows):.3f}.",
    ]  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
