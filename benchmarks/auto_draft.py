"""``draft_exit="auto"`` against the fixed settings it replaces: the oracle, the median and full depth.

For each cell (model, batch, greedy or sampled, kind of prompt) this decodes the same prompts
with every fixed setting of a grid (each draft exit before the last, K in ``--ks``), full depth and
auto (``draft_exit`` and ``num_speculations`` ``"auto"``, K up to the grid's largest), once each,
and finds the best fixed setting after the fact (the *oracle*) and the median one. The maximum of
noisy timings is biased upward, so the oracle, the median setting, auto and full depth are then
timed again, ``--rounds`` times each, interleaved in one loop, and compared by their medians there.

Prompts of two kinds, ``--prompt-tokens`` each, in the checkpoint's own tokenizer: WikiText-2 valid
paragraphs, and source files of Python's standard library cut to the same length; ``mixed`` puts
half of each in one batch, where no single static setting is best for both. Each output's share
of repeated 4-grams is reported (greedy continuations repeat themselves, which flatters them).

The models are ``benchmarks/speculative.py``'s seed-0 checkpoints (``layerskip`` and
``standard``; ``python -m benchmarks.layerskip`` builds them). ``--resume`` keeps the cells
already in the results. The picture ``auto_draft_choices.png`` draws what auto chose, round by
round, for a few requests of the mixed cells.

    python -m benchmarks.auto_draft            # all cells, ~40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_DATA, RESULTS, add_resume_arguments, index_runs, resumed_runs, write_results
from benchmarks.speculative import MODELS, SAMPLING, choice_counts, load_prompts, most_chosen, repeated_4gram_share
from benchmarks.speculative import draw_choices as draw_panels
from lego_lightning import ExitTransformer
from lego_lightning.decoding import Engine, Request, Sampling, measure_draft_costs
from lego_lightning.decoding.speed import decoding_flops
from lego_lightning.model import flops

KINDS = ("wikitext", "python", "mixed")
TARGETS = {"auto / oracle": 0.95, "auto / full depth": 1.0}


def python_prompts(folder: Path, count: int, length: int) -> torch.Tensor:
    """``(count, length)`` token ids: the start of Python standard-library files (sorted by name, docstrings
    and all), in the checkpoint's tokenizer; every machine with Python has them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        # Past the licence and module docstring of the first lines: code.
        ids = tokenizer.encode(text[len(text) // 4 :]).ids
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            break
    return torch.tensor(prompts)


def prompts_of(kind: str, folder: Path, data: Path, count: int, length: int) -> torch.Tensor:
    if kind == "wikitext":
        return load_prompts(folder, data, count, length)
    if kind == "python":
        return python_prompts(folder, count, length)
    wiki, code = load_prompts(folder, data, count, length), python_prompts(folder, count, length)
    return torch.stack([(wiki if i % 2 == 0 else code)[i // 2] for i in range(count)])  # alternating


def prompt_count(args: argparse.Namespace, batch: int) -> int:
    """Prompts decoded in a cell of ``batch`` slots: enough that the cell lasts long enough to time."""
    return max(args.prompts, args.prompts_per_slot * batch)


def decode(
    model: ExitTransformer, prompts: torch.Tensor, batch: int, new: int, sampled: bool, **draft: Any
) -> tuple[float, dict[int, Any], dict[str, int]]:
    """Every prompt through one engine of ``batch`` slots (continuous batching); seconds, completions, and the
    engine's work (what its rounds ran, :data:`~lego_lightning.decoding.speed.WORK`)."""
    engine = Engine(model, batch, max_speculations=8)
    sampling = SAMPLING if sampled else {}
    ids = [
        engine.add(Request(p.tolist(), max_new_tokens=new, seed=i if sampled else None, **sampling, **draft))
        for i, p in enumerate(prompts)
    ]
    start = time.perf_counter()
    done = engine.run()
    return time.perf_counter() - start, {i: done[request_id] for i, request_id in enumerate(ids)}, dict(engine.work)


def decoded_flops(model: ExitTransformer, work: dict[str, int], prompts: torch.Tensor, new: int) -> float:
    """FLOPs of everything the engine ran (layers, heads, auto's probes), at the mean context of a new token."""
    return decoding_flops(model, work, prompts.shape[1] + new / 2)


def run_cell(model: ExitTransformer, prompts: torch.Tensor, batch: int, sampled: bool, args: Any) -> dict[str, Any]:
    new = args.new_tokens
    tokens = len(prompts) * new
    # Once (the engines' cap of 8), outside every timing; the engines' auto requests find them cached.
    measure_draft_costs(model, batch, 8, Sampling(**SAMPLING) if sampled else None, prompts[0].tolist())
    settings: dict[str, dict[str, Any]] = {"full depth": {}}
    for e in model.exit_layers[:-1]:
        for k in args.ks:
            settings[f"exit {e}, K={k}"] = {"draft_exit": e, "num_speculations": k}
    auto = {"draft_exit": "auto", "num_speculations": "auto"}
    grid = {}
    full_seconds, full, _ = decode(model, prompts, batch, new, sampled)
    for name, draft in settings.items():
        seconds, out, _ = decode(model, prompts, batch, new, sampled, **draft)
        if not sampled:
            assert all(out[i].tokens == full[i].tokens for i in out), f"{name}: greedy tokens differ from full depth's"
        grid[name] = seconds
    fixed = {n: s for n, s in grid.items() if n != "full depth"}
    oracle = min(fixed, key=fixed.get)
    ranked = sorted(fixed, key=fixed.get)
    median = ranked[len(ranked) // 2]
    timed = {"full depth": {}, "auto": auto, f"oracle ({oracle})": settings[oracle],
             f"median ({median})": settings[median]}  # fmt: skip
    times: dict[str, list[float]] = {n: [] for n in timed}
    outputs, works = {}, {}
    for _ in range(args.rounds):  # interleaved: a slower minute of the machine slows every setting alike
        for name, draft in timed.items():
            seconds, outputs[name], works[name] = decode(model, prompts, batch, new, sampled, **draft)
            times[name].append(seconds)
    if not sampled:
        assert all(outputs["auto"][i].tokens == full[i].tokens for i in full), "auto's greedy tokens differ"
    medians = {n: statistics.median(t) for n, t in times.items()}
    spent = {n: decoded_flops(model, w, prompts, new) for n, w in works.items()}
    auto_out = outputs["auto"]
    chosen = choice_counts([c.choices for c in auto_out.values()])
    oracle_name, median_name = f"oracle ({oracle})", f"median ({median})"
    return {
        "oracle": oracle,
        "median_setting": median,
        "grid_seconds": grid,
        "grid_full_seconds": full_seconds,
        "seconds": medians,
        "tokens_per_s": {n: tokens / s for n, s in medians.items()},
        "auto_over_full": medians["full depth"] / medians["auto"],
        "oracle_over_full": medians["full depth"] / medians[oracle_name],
        "median_over_full": medians["full depth"] / medians[median_name],
        "auto_over_oracle": medians[oracle_name] / medians["auto"],
        "auto_over_oracle_by_round": [o / a for o, a in zip(times[oracle_name], times["auto"])],
        # Per token after each prompt's first (which its prefill gives, outside the work counted).
        "flops_per_token": {n: f / (len(prompts) * (new - 1)) for n, f in spent.items()},
        "auto_probe_share": works["auto"].get("probe_heads", 0) * flops.head_flops(model.config).total / spent["auto"],
        "auto_choices": chosen,
        "auto_acceptance": sum(c.accepted for c in auto_out.values())
        / max(1, sum(c.drafts for c in auto_out.values())),
        "repeated_4grams": repeated_4gram_share([c.tokens for c in full.values()]),
        "picture": {i: auto_out[i].choices for i in list(auto_out)[:4]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sampled"], default=["greedy", "sampled"])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument(
        "--prompts-per-slot",
        type=int,
        default=0,
        help="at least this many prompts per slot: a cell of 8 slots with 4 decodes 32 (default: off)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 6])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "auto_draft")
    args = parser.parse_args()
    settings = {k: getattr(args, k) for k in ("prompts", "prompt_tokens", "new_tokens", "ks", "rounds")}
    if args.prompts_per_slot:  # only where given: results written without it keep resuming
        settings["prompts_per_slot"] = args.prompts_per_slot
    runs, earlier = resumed_runs(args, "rows", settings)

    def key(r: dict[str, Any]) -> tuple:
        return (r["model"], r["batch"], r["mode"], r["kind"])

    done = index_runs(runs, key)
    torch.manual_seed(0)
    for name in args.models:
        model = ExitTransformer.from_pretrained(MODELS[name]).eval()
        for kind in args.kinds:
            every = prompts_of(kind, MODELS[name], args.data, prompt_count(args, max(args.batches)), args.prompt_tokens)
            for batch in args.batches:
                prompts = every[: prompt_count(args, batch)]  # a prefix: mixed prompts alternate, so it stays half-half
                for mode in args.modes:
                    cell = {"model": name, "batch": batch, "mode": mode, "kind": kind}
                    if key(cell) in done:
                        continue
                    with torch.no_grad():
                        done[key(cell)] = cell | run_cell(model, prompts, batch, mode == "sampled", args)
                    r = done[key(cell)]
                    print(f"{name} b{batch} {mode} {kind}: auto {r['auto_over_full']:.2f}x, oracle "
                          f"{r['oracle_over_full']:.2f}x ({r['oracle']}), auto/oracle {r['auto_over_oracle']:.2f}",
                          flush=True)  # fmt: skip
                    rows = sorted(done.values(), key=key)
                    write_results(args.name, rows, report(rows, args), extra={"settings": settings,
                                                                               "resumed_from": earlier})  # fmt: skip
    rows = sorted(done.values(), key=key)
    draw_choices(rows, RESULTS / f"{args.name}_choices.png")
    write_results(args.name, rows, report(rows, args), extra={"settings": settings, "resumed_from": earlier})


def draw_choices(rows: list[dict[str, Any]], path: Path) -> None:
    """Auto's exit and K, round by round, for the first requests of each mixed cell (mixed prompts alternate:
    even requests are WikiText, odd ones Python)."""
    cells = [r for r in rows if r["kind"] == "mixed"] or rows
    panels = [
        (f"{r['model']}, batch {r['batch']}, {r['mode']}",
         {f"request {i} ({'wikitext' if int(i) % 2 == 0 else 'python'})": c for i, c in r["picture"].items()})
        for r in cells
    ]  # fmt: skip
    draw_panels(panels, path)


def flops_cells(r: dict[str, Any]) -> str:
    """Auto's and the oracle's FLOPs per token over full depth's, and the probes' share of auto's (runs
    measured before the FLOPs were counted: n/a)."""
    if "flops_per_token" not in r:
        return "n/a | n/a"
    spent = r["flops_per_token"]
    oracle = spent[f"oracle ({r['oracle']})"]
    return (
        f"{spent['auto'] / spent['full depth']:.2f}x, {oracle / spent['full depth']:.2f}x | {r['auto_probe_share']:.1%}"
    )


def target_met(
    rows: list[dict[str, Any]], field: str, target: float, value: Callable[[dict[str, Any]], str], noun: str = ""
) -> str:
    """``"M of N"`` (then ``noun``) cells whose ``field`` is at least ``target``, and the others named with
    ``value`` of each: ``" (missed: layerskip b1 greedy <value>, ...)"``."""
    missed = [r for r in rows if r[field] < target]
    named = ", ".join(f"{r['model']} b{r['batch']} {r['mode']} {value(r)}" for r in missed)
    return f"{len(rows) - len(missed)} of {len(rows)}{' ' + noun if noun else ''}" + (
        f" (missed: {named})" if missed else ""
    )


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    out = [
        '# `draft_exit="auto"`: the draft exit and K chosen while decoding',
        "",
        f"{', '.join(f'{prompt_count(args, b)} prompts at batch {b}' for b in args.batches)} of "
        f"{args.prompt_tokens} tokens per cell, {args.new_tokens} new tokens each, "
        f"continuous batching at `batch` slots; sampled = temperature {SAMPLING['temperature']}, top-p "
        f"{SAMPLING['top_p']}, a seed per prompt. Grid: every draft exit before the last x K in {args.ks}; the "
        f"oracle is its fastest setting after the fact, the median its middle one. Speed-ups are full depth's "
        f"time over each, medians of {args.rounds} interleaved timings in the same run (not the grid's single "
        "timings). `paired`: the median over those rounds of the oracle's time over auto's in the same round "
        "(one next to the other, so a slower minute of the machine cancels out; the targets are judged on the "
        "ratio of medians beside it). `repeated 4-grams`: full depth's outputs. `FLOPs`: per generated token, "
        "of everything the engine ran (layers, heads, auto's probes and its full-depth rounds), over full "
        "depth's; `probes`: the share of auto's FLOPs its probes read.",
        "",
        "| model | batch | decoding | prompts | auto | oracle (re-timed) | median setting | auto / oracle | "
        "paired | oracle setting | auto's most chosen | acceptance | repeated 4-grams | FLOPs: auto, oracle | "
        "probes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        most = most_chosen(r["auto_choices"])
        out.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['kind']} | {r['auto_over_full']:.2f}x | "
            f"{r['oracle_over_full']:.2f}x | {r['median_over_full']:.2f}x | {r['auto_over_oracle']:.2f} | "
            f"{statistics.median(r['auto_over_oracle_by_round']):.2f} | {r['oracle']} | {most} | "
            f"{r['auto_acceptance']:.2f} | {r['repeated_4grams']:.0%} | {flops_cells(r)} |"
        )
    mixed_wins = [r for r in rows if r["kind"] == "mixed" and r["auto_over_oracle"] > 1]
    out += [
        "",
        f"Targets: auto >= {TARGETS['auto / oracle']} of the oracle in every cell: met in "
        + target_met(rows, "auto_over_oracle", TARGETS["auto / oracle"],
                     lambda r: f"{r['kind']} {r['auto_over_oracle']:.2f}")
        + ". Auto >= full depth in every cell: met in "
        + target_met(rows, "auto_over_full", TARGETS["auto / full depth"],
                     lambda r: f"{r['kind']} {r['auto_over_full']:.2f}x")
        + f". Auto above the oracle on mixed prompts: {len(mixed_wins)} of "
        f"{sum(r['kind'] == 'mixed' for r in rows)} mixed cells.",
        "",
        f"![auto's choices]({args.name}_choices.png)",
    ]  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
