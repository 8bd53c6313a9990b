"""Self-speculative decoding against full-depth decoding and against transformers, in one run (issue 28).

Models: the LayerSkip-trained model of ``benchmarks/layerskip.py`` and its standard-trained
control (d_model 256, 12 layers, an exit after every layer sharing the final norm and head, BPE
8K, trained on WikiText-2), read from the folders ``--keep`` wrote. If they are missing, rebuild
them with the committed command (about 45 minutes a model on 2 idle cores)::

    python -m benchmarks.layerskip --seeds 0 --methods layerskip standard --name layerskip_rebuild \\
        --keep benchmarks/checkpoints/layerskip

Prompts: the first ``--prompts`` paragraphs of WikiText-2 valid with at least ``--prompt-tokens``
tokens, cut to that many. For every draft exit, ``K`` (``num_speculations``) from 1 to 6 and
adaptive drafting (a cap of 6, drafting stopped where the exit's max-prob falls below each of
``--draft-thresholds``), at batch 1 and 8, greedy and sampled, it measures:

* the share of drafted tokens the full model kept, and the mean tokens a verification yields;
* tokens per second over our full-depth ``generate`` on the same prompts, timed just before and
  just after each draft exit's settings; every decoding runs ``--timings`` times and the fastest
  counts (a slower run met other load on the machine);
* decoding FLOPs per generated token (every layer, both heads, padding included) over full depth's;
* the speed bound (:func:`~lego_lightning.decoding.speed.speedup_bound`) from the measured
  acceptance and the measured draft, verification and full-step costs, and the realised share.

Then, in each cell, ``draft_exit="auto"`` (with ``num_speculations="auto"``, K up to the grid's largest)
beside full depth and the grid's best setting, the three timed in turns ``--auto-rounds`` times (the
grid's best is the fastest of many noisy timings, so it is re-timed there), and a picture of what auto
chose round by round. ``--resume`` adds them to a grid measured earlier.

Greedy tokens are checked equal to full depth's in every setting. At batch 1, greedy,
``transformers`` runs on the same weights in the same process: plain ``generate``,
``generate(assistant_early_exit=E)``, and assisted generation with the first E layers loaded as a
separate draft model (what transformers offers for a GPT-2 checkpoint, see the report).

    python -m benchmarks.speculative                       # about 30 minutes on 2 idle CPU cores
    python -m benchmarks.speculative --exits 4 --ks 3 --batches 1 --modes greedy --name speculative_quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_DATA, REPO, RESULTS, add_resume_arguments, index_runs, resumed_runs, write_results
from lego_lightning import ExitTransformer
from lego_lightning.decoding import Generation, Sampling, generate, measure_draft_costs
from lego_lightning.decoding.speed import (
    StepCosts,
    acceptance_needed,
    decoding_flops,
    measure_step_costs,
    round_speedup,
    speedup_bound,
)
from lego_lightning.model import flops

CHECKPOINTS = REPO / "benchmarks" / "checkpoints" / "layerskip"
MODELS = {"layerskip": CHECKPOINTS / "layerskip_seed0", "standard": CHECKPOINTS / "standard_seed0"}
SAMPLING = {"temperature": 0.8, "top_p": 0.95}
RUN_KEY = ("model", "batch", "mode", "draft_exit", "k", "draft_threshold")  # what tells two measured settings apart
# Targets of the issue for the best setting on the LayerSkip model.
TARGETS = {"batch 1 greedy": 1.5, "batch 8 greedy": 1.3, "share of bound": 0.85}


def load_prompts(folder: Path, data: Path, count: int, length: int) -> torch.Tensor:
    """``(count, length)`` token ids of WikiText-2 valid paragraphs, in the checkpoint's own tokenizer."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompts = []
    for line in (data / "valid.txt").read_text(encoding="utf-8").splitlines():
        ids = tokenizer.encode(line.strip()).ids if line.strip() and not line.strip().startswith("=") else []
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            break
    return torch.tensor(prompts)


def decode_all(model: ExitTransformer, prompts: torch.Tensor, batch: int, new: int, **kwargs: Any) -> list[Generation]:
    """Every prompt, ``batch`` at a time; per-prompt seeds so a prompt samples alike in any batch."""
    out = []
    for start in range(0, len(prompts), batch):
        rows = prompts[start : start + batch]
        seed = list(range(start, start + len(rows)))
        out.append(generate(model, rows, new, seed=seed, **kwargs))
    return out


def timed(fn: Callable[[], Any], times: int = 1) -> tuple[float, Any]:
    """The fastest of ``times`` runs of ``fn`` (what the machine can do; slower runs met other load), and its result."""
    best, result = float("inf"), None
    for _ in range(times):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def repeated_share(model: ExitTransformer, prompts: torch.Tensor, new: int, sampling: dict[str, Any]) -> float:
    """The share of 4-grams in full-depth continuations that already occurred earlier in the same one:
    repetitive text is easy to draft."""
    generations = decode_all(model, prompts, len(prompts), new, **sampling)
    return repeated_4gram_share([row for g in generations for row in g.tokens[:, prompts.shape[1] :].tolist()])


def repeated_4gram_share(outputs: list[list[int]]) -> float:
    """The share of each output's 4-grams that already occurred earlier in it, averaged over the outputs."""
    shares = []
    for row in outputs:
        grams = [tuple(row[i : i + 4]) for i in range(len(row) - 3)]
        shares.append(sum(gram in grams[:i] for i, gram in enumerate(grams)) / max(1, len(grams)))
    return sum(shares) / len(shares)


def measure_exit(
    name: str, model: ExitTransformer, prompts: torch.Tensor, batch: int, mode: str, draft_exit: int,
    settings: list[tuple[int, float | None]], args: argparse.Namespace, step_costs: dict[tuple, StepCosts],
) -> list[dict[str, Any]]:  # fmt: skip
    """Every (K, draft threshold) at one draft exit, against full depth timed before and after.

    ``step_costs`` keeps the draft, verification and full-step costs of each (model, exit, K, batch):
    greedy and sampled settings, and adaptive drafting at each threshold, share them."""
    sampling = SAMPLING if mode == "sampled" else {}
    new = args.new_tokens
    context = prompts.shape[1] + new / 2
    full_s0, full = timed(lambda: decode_all(model, prompts, batch, new, **sampling), args.timings)
    rows = []
    for k, threshold in settings:
        seconds, out = timed(
            lambda k=k, threshold=threshold: decode_all(
                model, prompts, batch, new, draft_exit=draft_exit, num_speculations=k, draft_threshold=threshold,
                **sampling,
            ),
            args.timings,
        )  # fmt: skip
        exact = all(torch.equal(a.tokens, b.tokens) for a, b in zip(out, full))
        if mode == "greedy" and not exact:
            raise SystemExit(f"{name}: draft exit {draft_exit}, K={k}: greedy tokens differ from full depth's")
        drafts = sum(int(g.drafts.sum()) for g in out)
        accepted = sum(int(g.accepted.sum()) for g in out)
        rounds = sum(int(g.verifications.sum()) for g in out)
        # A batch runs as many rounds as its slowest row: the rounds it ran over those its mean row needed.
        straggling = sum(int(g.verifications.max()) * len(g.verifications) for g in out) / rounds
        work = {key: sum(g.work[key] for g in out) for key in out[0].work}
        key = (name, draft_exit, k, batch)
        if key not in step_costs:
            step_costs[key] = measure_step_costs(model, draft_exit, k, batch, int(context), args.repeats)
        costs = step_costs[key]
        # The per-draft acceptance of the bound: kept drafts over kept drafts and refusals (a round
        # stops at its first refused draft), the estimate for drafts kept independently.
        refusals = sum(int(g.refusals.sum()) for g in out)
        acceptance = accepted / (accepted + refusals) if accepted + refusals else 0.0
        bound = (
            speedup_bound(acceptance, k, costs.draft, costs.verify, costs.full)
            if threshold is None
            else round_speedup((accepted + rounds) / rounds, drafts / rounds, costs.draft, costs.verify, costs.full)
        )
        generated = (accepted + rounds) if rounds else 1
        spent = decoding_flops(model, work, context, None if threshold is None else "max_prob")
        rows.append(
            {
                "model": name, "batch": batch, "mode": mode, "draft_exit": draft_exit, "k": k,
                "draft_threshold": threshold, "seconds": seconds, "drafts": drafts, "accepted": accepted,
                "rounds": rounds, "kept_share": accepted / drafts if drafts else 0.0, "acceptance": acceptance,
                "tokens_per_round": (accepted + rounds) / rounds, "bound": bound, "exact": exact,
                "straggling": straggling,
                "step_costs": {"draft": costs.draft, "verify": costs.verify, "full": costs.full},
                "flops_per_token": spent / generated,
            }
        )  # fmt: skip
    full_s1, _ = timed(lambda: decode_all(model, prompts, batch, new, **sampling), args.timings)
    full_s = min(full_s0, full_s1)
    full_flops = flops.full_flops(model.config, context).total
    for row in rows:
        row |= {
            "full_seconds": [full_s0, full_s1],
            "speedup": full_s / row["seconds"],
            "flops_ratio": row["flops_per_token"] / full_flops,
        }
        row["share_of_bound"] = row["speedup"] / row["bound"]
    return rows


def measure_auto(
    name: str, model: ExitTransformer, prompts: torch.Tensor, batch: int, mode: str, grid: list[dict[str, Any]],
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    """``draft_exit="auto"`` (and ``num_speculations="auto"``, K up to the grid's largest) beside full depth and
    the grid's best setting of this model, batch and decoding, timed again: the grid's best is the maximum of
    noisy timings, biased upward. The three take turns, ``--auto-rounds`` times, and compare by medians."""
    sampling = SAMPLING if mode == "sampled" else {}
    new, cap = args.new_tokens, max(args.ks)
    best = max(grid, key=lambda r: r["speedup"])
    # The round costs auto chooses by: measured once, outside the timings (its engines find them cached).
    measure_draft_costs(model, batch, cap, Sampling(**SAMPLING) if mode == "sampled" else None, prompts[0].tolist())
    settings: dict[str, dict[str, Any]] = {
        "full depth": {},
        "auto": {"draft_exit": "auto", "num_speculations": "auto", "max_speculations": cap},
        "best": {"draft_exit": best["draft_exit"], "num_speculations": best["k"],
                 "draft_threshold": best["draft_threshold"]},
    }  # fmt: skip
    times: dict[str, list[float]] = {n: [] for n in settings}
    out: dict[str, list[Generation]] = {}
    for _ in range(args.auto_rounds):  # interleaved: a slower minute of the machine slows all three alike
        for n, draft in settings.items():
            seconds, out[n] = timed(lambda draft=draft: decode_all(model, prompts, batch, new, **draft, **sampling))
            times[n].append(seconds)
    auto = out["auto"]
    exact = all(torch.equal(a.tokens, b.tokens) for a, b in zip(auto, out["full depth"]))
    if mode == "greedy" and not exact:
        raise SystemExit(f"{name}: batch {batch}: auto's greedy tokens differ from full depth's")
    medians = {n: statistics.median(t) for n, t in times.items()}
    choices = [row for g in auto for row in g.choices]
    chosen = choice_counts(choices)
    context = prompts.shape[1] + new / 2
    generated = len(prompts) * (new - 1)  # after each prompt's first token, which its prefill gives
    full_flops = flops.full_flops(model.config, context).total
    work = {key: sum(g.work[key] for g in auto) for key in auto[0].work}
    spent = decoding_flops(model, work, context)
    drafts, accepted = (sum(int(getattr(g, f).sum()) for g in auto) for f in ("drafts", "accepted"))
    return {
        "model": name, "batch": batch, "mode": mode, "cap": cap, "rounds": args.auto_rounds,
        "best_setting": {f: best[f] for f in ("draft_exit", "k", "draft_threshold")},
        "best_grid_speedup": best["speedup"],
        "seconds": times,
        "auto_speedup": medians["full depth"] / medians["auto"],
        "best_speedup": medians["full depth"] / medians["best"],
        "auto_over_best": medians["best"] / medians["auto"],
        "auto_over_best_by_round": [b / a for b, a in zip(times["best"], times["auto"])],
        "exact": exact,
        "choices": chosen,
        "acceptance": accepted / drafts if drafts else 0.0,
        "flops_ratio": spent / generated / full_flops,
        "best_flops_ratio": best["flops_ratio"],
        "probe_share": work.get("probe_heads", 0) * flops.head_flops(model.config).total / spent,
        "picture": {f"request {i}": row for i, row in enumerate(choices[:4])},
    }  # fmt: skip


def measure_transformers(name: str, folder: Path, prompts: torch.Tensor, exits: list[int], args: argparse.Namespace,
                         model: ExitTransformer) -> list[dict[str, Any]]:  # fmt: skip
    """Batch 1, greedy, on the same weights: transformers' plain generate, its early-exit assistant, a
    truncated copy as assistant, and our full depth and best self-speculation timed in between."""
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    settings = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    hf.generation_config.eos_token_id = None

    def hf_all(**kwargs: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            return [
                hf.generate(p[None], attention_mask=torch.ones_like(p[None]), **settings, **kwargs) for p in prompts
            ]

    ours = [g.tokens for g in decode_all(model, prompts, 1, args.new_tokens)]
    rows = []

    def record(setting: str, draft_exit: int | None, k: int | None, fn: Callable[[], list[torch.Tensor]]) -> None:
        row: dict[str, Any] = {"model": name, "setting": setting, "draft_exit": draft_exit, "k": k}
        reference, _ = timed(lambda: decode_all(model, prompts, 1, args.new_tokens), args.timings)
        layers = hf.config.num_hidden_layers
        try:
            seconds, out = timed(fn, args.timings)
        except Exception as error:  # reported as it is: what a user of that setting would get
            rows.append(row | {"error": f"{type(error).__name__}: {error}"})
            return
        finally:  # transformers' early exit shortens the config and does not restore it when it fails
            hf.config.num_hidden_layers = layers
        rows.append(row | {
            "seconds": seconds, "ours_full_seconds": reference, "over_ours_full": reference / seconds,
            "same_tokens_as_ours": all(torch.equal(a, b) for a, b in zip(out, ours)),
        })  # fmt: skip

    record("transformers generate", None, None, hf_all)
    for e in exits:
        for k in args.hf_ks:
            hf.generation_config.num_assistant_tokens = k
            hf.generation_config.num_assistant_tokens_schedule = "constant"
            record("transformers assistant_early_exit", e, k, lambda e=e: hf_all(assistant_early_exit=e))
            draft = transformers.AutoModelForCausalLM.from_pretrained(folder, num_hidden_layers=e).eval()
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            record("transformers assistant_model (first E layers)", e, k, lambda d=draft: hf_all(assistant_model=d))
            record("ours self-speculative", e, k,
                   lambda e=e, k=k: [g.tokens for g in decode_all(model, prompts, 1, args.new_tokens, draft_exit=e,
                                                                   num_speculations=k)])  # fmt: skip
    return rows


def cell(row: dict[str, Any]) -> str:
    return f"{row['speedup']:.2f}x ({row['kept_share']:.2f})"


def threshold_key(row: dict[str, Any]) -> float:
    """The draft threshold, -1 for none: sorts fixed K before adaptive drafting."""
    return -1.0 if row["draft_threshold"] is None else row["draft_threshold"]


def setting_label(row: dict[str, Any]) -> str:
    return f"K={row['k']}" if row["draft_threshold"] is None else f"K≤{row['k']}, max-prob ≥ {row['draft_threshold']}"


def report(
    runs: list[dict[str, Any]],
    hf_rows: list[dict[str, Any]],
    args: argparse.Namespace,
    repetition: dict[str, dict[str, float]] | None = None,
    auto_rows: list[dict[str, Any]] | None = None,
) -> str:
    repetition = repetition or {}
    out = [
        "# Self-speculative decoding: drafts from an early exit, checked by the layers above it",
        "",
        f"Models: {', '.join(f'`{m}` ({MODELS[m].relative_to(REPO)})' for m in args.models)}, trained by "
        "`benchmarks/layerskip.py` (d_model 256, 12 layers, an exit after every layer sharing the final norm and "
        "head, BPE 8K, WikiText-2; commands in `benchmarks/results/layerskip.md`). "
        f"{args.prompts} prompts of {args.prompt_tokens} tokens from WikiText-2 valid paragraphs, "
        f"{args.new_tokens} new tokens each; sampled = temperature {SAMPLING['temperature']}, "
        f"top-p {SAMPLING['top_p']}. "
        "Speed-up: full-depth `generate`'s time on the same prompts (the fastest of its timings before and after "
        "each draft exit's settings) over self-speculation's (the fastest of its timings); same process, same "
        "cores. Every greedy setting gave exactly full depth's tokens.",
        "",
        f"Each cell: speed-up (share of drafted tokens the full model kept). Adaptive: K ≤ {args.adaptive_cap} "
        "and a row stops "
        "drafting where exit E's max-prob falls below the threshold.",
    ]
    settings = sorted({(r["k"], threshold_key(r)) for r in runs})
    for model in args.models:
        for batch in args.batches:
            for mode in args.modes:
                part = [r for r in runs if (r["model"], r["batch"], r["mode"]) == (model, batch, mode)]
                if not part:
                    continue
                labels = [setting_label({"k": k, "draft_threshold": None if t < 0 else t}) for k, t in settings]
                out += ["", f"## `{model}`, batch {batch}, {mode}", "",
                        "| draft exit | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]  # fmt: skip
                for e in sorted({r["draft_exit"] for r in part}):
                    cells = []
                    for k, t in settings:
                        match = [r for r in part if (r["draft_exit"], r["k"], threshold_key(r)) == (e, k, t)]
                        cells.append(cell(match[0]) if match else "")
                    out.append(f"| {e} | " + " | ".join(cells) + " |")
    out += ["", "## The best setting of each model, batch and decoding", "",
            "| model | batch | decoding | draft exit | setting | speed-up | kept share | acceptance | tokens per "
            "verification | bound | share of bound | batch rounds over its mean row's | FLOPs per token over full "
            "depth |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for r in runs:
        key = (r["model"], r["batch"], r["mode"])
        if key not in best or r["speedup"] > best[key]["speedup"]:
            best[key] = r
    for (model, batch, mode), r in sorted(best.items()):
        out.append(
            f"| {model} | {batch} | {mode} | {r['draft_exit']} | {setting_label(r)} | {r['speedup']:.2f}x | "
            f"{r['kept_share']:.2f} | {r['acceptance']:.2f} | {r['tokens_per_round']:.2f} | {r['bound']:.2f}x | "
            f"{r['share_of_bound']:.2f} | {r['straggling']:.2f} | {r['flops_ratio']:.2f} |"
        )
    if hf_rows:
        out += ["", "## Beside transformers (batch 1, greedy, the same weights, the same process)", "",
                "Over ours at full depth (timed just before each). `assistant_early_exit=E` in transformers "
                f"{_transformers_version()} shortens the layer loop of the Llama family only: a GPT-2 checkpoint's "
                "assistant still runs all its layers, so its drafts are the full model's. Assisted generation with "
                "the first E layers loaded as their own model drafts as our exit E does, but keeps its own cache "
                "and the main model recomputes layers 1..E for every draft.", "",
                "| model | setting | draft exit | K | over our full depth | same tokens as ours |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for r in hf_rows:
            e = "" if r["draft_exit"] is None else r["draft_exit"]
            k = "" if r["k"] is None else r["k"]
            if "error" in r:
                out.append(f"| {r['model']} | {r['setting']} | {e} | {k} | fails: `{r['error'][:80]}` | |")
                continue
            out.append(f"| {r['model']} | {r['setting']} | {e} | {k} | {r['over_ours_full']:.2f}x | "
                       f"{'yes' if r['same_tokens_as_ours'] else 'no'} |")  # fmt: skip
    out += auto_report(auto_rows or [], args.name)
    out += ["", "## What it shows", "", *observations(runs, hf_rows, repetition)]
    return "\n".join(out)


def draw_choices(panels: list[tuple[str, dict[str, list[tuple[int | None, int]]]]], path: Path) -> None:
    """Auto's draft exit and K, round by round, for a few requests of each panel (title, request -> its choices);
    full depth drawn at exit 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.2 * len(panels)), squeeze=False)
    for ax, (title, picture) in zip(axes[:, 0], panels):
        for request, choices in picture.items():
            ax.step(range(len(choices)), [0 if e is None else e for e, _ in choices], where="post",
                    label=f"{request}: exit")  # fmt: skip
            ax.scatter(range(len(choices)), [k for _, k in choices], s=6, label=f"{request}: K")
        ax.set_title(f"{title}: auto's draft exit (0 = none) and K per round", fontsize=8)
        ax.set_xlabel("round", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def choice_counts(requests: list[list[tuple[int | None, int]]]) -> dict[str, int]:
    """How many rounds auto chose each setting, over ``requests`` (each its (exit or None, K) per round)."""
    chosen: dict[str, int] = {}
    for e, k in (c for choices in requests for c in choices):
        label = "full depth" if e is None else f"exit {e}, K={k}"
        chosen[label] = chosen.get(label, 0) + 1
    return chosen


def most_chosen(chosen: dict[str, int], top: int = 2) -> str:
    """The ``top`` settings auto chose most, with their shares of its rounds."""
    total = sum(chosen.values())
    return "; ".join(f"{n} {c / total:.0%}" for n, c in sorted(chosen.items(), key=lambda kv: -kv[1])[:top])


def setting_of(row: dict[str, Any]) -> str:
    """A fixed setting's name: its draft exit and K (or adaptive drafting)."""
    return f"exit {row['draft_exit']}, {setting_label(row)}"


def auto_report(auto_rows: list[dict[str, Any]], name: str) -> list[str]:
    """The section on ``draft_exit="auto"``: beside full depth and the grid's best setting, re-timed."""
    if not auto_rows:
        return []
    r0 = auto_rows[0]
    out = [
        "", '## `draft_exit="auto"` beside the grid', "",
        f'`draft_exit="auto", num_speculations="auto"` (K up to {r0["cap"]}) chooses the draft exit, or full '
        "depth, and K every round from each request's running acceptance and the measured round costs "
        "(`lego_lightning/decoding/auto.py`), on the same prompts through the same `generate`. The grid's best "
        "setting above is the fastest of many noisy timings, so it is biased upward: it is timed again here "
        f"beside auto and full depth, the three taking turns {r0['rounds']} times; speed-ups are full depth's "
        "median time over each one's. `paired`: the median over those turns of the best setting's time over "
        "auto's. `FLOPs`: per generated token over full depth's, of everything that ran (layers, heads, auto's "
        "probes); `probes`: their share of auto's. More cells (prompts of Python source, a mixed batch, "
        "continuous batching): `auto_draft.md`, `auto_draft_mixed.md`.", "",
        "| model | batch | decoding | auto | best fixed (grid) | best fixed (re-timed) | auto / best | paired | "
        "best setting | auto's most chosen | full depth rounds | acceptance | FLOPs: auto, best | probes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in auto_rows:
        total = sum(r["choices"].values())
        out.append(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['auto_speedup']:.2f}x | {r['best_grid_speedup']:.2f}x"
            f" | {r['best_speedup']:.2f}x | {r['auto_over_best']:.2f} | "
            f"{statistics.median(r['auto_over_best_by_round']):.2f} | {setting_of(r['best_setting'])} | "
            f"{most_chosen(r['choices'])} | {r['choices'].get('full depth', 0) / total:.0%} | {r['acceptance']:.2f} | "
            f"{r['flops_ratio']:.2f}x, {r['best_flops_ratio']:.2f}x | {r['probe_share']:.1%} |"
        )
    below_best = [r for r in auto_rows if r["auto_over_best"] < 0.95]
    below_full = [r for r in auto_rows if r["auto_speedup"] < 1.0]
    out += [
        "",
        f"Auto at 0.95 or more of the re-timed best setting: {len(auto_rows) - len(below_best)} of "
        f"{len(auto_rows)} cells; at full depth's speed or more: {len(auto_rows) - len(below_full)} of "
        f"{len(auto_rows)}.",
        "",
        f"![auto's choices]({name}_auto_choices.png)",
    ]
    return out


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def observations(
    runs: list[dict[str, Any]], hf_rows: list[dict[str, Any]], repetition: dict[str, dict[str, float]]
) -> list[str]:
    out = []
    for model, shares in repetition.items():
        out.append(
            f"- `{model}`'s own full-depth continuations repeat themselves: {shares['greedy']:.0%} of the 4-grams of "
            f"a greedy one already occurred earlier in it ({shares['sampled']:.0%} sampled). Repetition is easy to "
            "draft, so greedy acceptance here is higher than on varied text; the sampled rows are the harder test."
        )
    # The same setting, timed twice in this run (in the grid, and beside transformers): how far timings move.
    for r in hf_rows:
        if r["setting"] == "ours self-speculative" and "error" not in r:
            key = (r["model"], 1, "greedy", r["draft_exit"], r["k"], None)
            twin = [g for g in runs if tuple(g[f] for f in RUN_KEY) == key]
            if twin:
                out.append(
                    f"- Timed twice in this run, `{r['model']}` at exit {r['draft_exit']}, K={r['k']}, batch 1, "
                    f"greedy: {twin[0]['speedup']:.2f}x in the grid, {r['over_ours_full']:.2f}x beside transformers."
                )
    for model in sorted({r["model"] for r in runs}):
        for (batch, mode), target in (
            ((1, "greedy"), TARGETS["batch 1 greedy"]),
            ((8, "greedy"), TARGETS["batch 8 greedy"]),
        ):
            part = [r for r in runs if (r["model"], r["batch"], r["mode"]) == (model, batch, mode)]
            if not part:
                continue
            r = max(part, key=lambda r: r["speedup"])
            verdict = "meets" if r["speedup"] >= target else "misses"
            out.append(
                f"- `{model}`, batch {batch}, greedy: best {r['speedup']:.2f}x full depth at draft exit "
                f"{r['draft_exit']}, {setting_label(r)} ({verdict} the {target}x target), with "
                f"{r['kept_share']:.2f} of the drafts kept, {r['tokens_per_round']:.2f} tokens a verification, "
                f"{r['share_of_bound']:.2f} of its bound ({r['bound']:.2f}x)."
            )
        # What the targets would need: the least acceptance at which some fixed setting's bound reaches the
        # target with its measured costs (the bound is what a setting can reach at most).
        for batch, target in ((1, TARGETS["batch 1 greedy"]), (8, TARGETS["batch 8 greedy"])):
            part = [r for r in runs if (r["model"], r["batch"], r["mode"]) == (model, batch, "greedy")
                    and r["draft_threshold"] is None]  # fmt: skip
            needs = [(acceptance_needed(target, r["k"], *(r["step_costs"][c] for c in ("draft", "verify", "full"))), r)
                     for r in part]  # fmt: skip
            needs = [(a, r) for a, r in needs if a is not None]
            if not needs:
                out.append(f"- `{model}`, batch {batch}: no setting's bound reaches {target}x even with every draft "
                           "accepted, at the measured draft and verification costs.")  # fmt: skip
                continue
            a, r = min(needs, key=lambda pair: pair[0])
            out.append(
                f"- `{model}`, batch {batch}: by the bound, the {target}x target needs an acceptance of at least "
                f"{a:.2f}, at the setting that needs the least (draft exit {r['draft_exit']}, K={r['k']}); measured "
                f"there: {r['acceptance']:.2f}."
            )
    for model in sorted({r["model"] for r in hf_rows}):
        timed_rows = [r for r in hf_rows if r["model"] == model and "error" not in r]
        ours = [r for r in timed_rows if r["setting"] == "ours self-speculative"]
        theirs = [r for r in timed_rows if r["setting"].startswith("transformers assistant")]
        plain = [r for r in timed_rows if r["setting"] == "transformers generate"]
        if ours and theirs and plain:
            a, b = max(ours, key=lambda r: r["over_ours_full"]), max(theirs, key=lambda r: r["over_ours_full"])
            out.append(
                f"- `{model}` beside transformers at batch 1: our best self-speculation {a['over_ours_full']:.2f}x our "
                f"full depth (exit {a['draft_exit']}, K={a['k']}); transformers' best assisted setting "
                f"{b['over_ours_full']:.2f}x ({b['setting']}, exit {b['draft_exit']}, K={b['k']}); its plain generate "
                f"{plain[0]['over_ours_full']:.2f}x."
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--exits", type=int, nargs="+", default=list(range(1, 12)))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--draft-thresholds", type=float, nargs="*", default=[0.1, 0.3])
    parser.add_argument("--adaptive-cap", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--modes", nargs="+", choices=["greedy", "sampled"], default=["greedy", "sampled"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=20, help="timings per step cost (median)")
    parser.add_argument("--timings", type=int, default=2, help="timings of each decoding (the fastest counts)")
    parser.add_argument(
        "--auto-rounds",
        type=int,
        default=5,
        help="turns of auto, full depth and the grid's best, timed in each cell (0: no auto)",
    )
    parser.add_argument("--hf-exits", type=int, nargs="*", default=[2, 4, 6])
    parser.add_argument("--hf-ks", type=int, nargs="+", default=[4])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "speculative")
    args = parser.parse_args()
    torch.manual_seed(0)
    missing = [str(MODELS[m]) for m in args.models if not (MODELS[m] / "config.json").exists()]
    if missing:
        raise SystemExit(f"missing trained models {missing}: rebuild them as this module's docstring says")
    settings = {k: getattr(args, k) for k in ("prompts", "prompt_tokens", "new_tokens")} | {"sampling": SAMPLING}
    runs, resumed_from = resumed_runs(args, "runs", settings)
    done = index_runs(runs, lambda r: tuple(r[f] for f in RUN_KEY))
    grid = [(k, None) for k in args.ks] + [(args.adaptive_cap, t) for t in args.draft_thresholds]
    extra: dict[str, Any] = {"settings": settings, "resumed_from": resumed_from}
    # transformers' rows and auto's of an earlier invocation, kept on --resume (measured per model and per cell).
    stored = RESULTS / f"{args.name}.json"
    earlier = json.loads(stored.read_text()) if args.resume and stored.exists() else {}
    hf_rows: list[dict[str, Any]] = earlier.get("transformers", [])
    auto_rows: list[dict[str, Any]] = earlier.get("auto", [])  # auto's cells, kept on --resume like the grid's
    repetition: dict[str, dict[str, float]] = {}
    step_costs: dict[tuple, StepCosts] = {}
    for name in args.models:
        model = ExitTransformer.from_pretrained(MODELS[name]).eval()
        prompts = load_prompts(MODELS[name], args.data, args.prompts, args.prompt_tokens)
        repetition[name] = {mode: repeated_share(model, prompts, args.new_tokens, SAMPLING if mode == "sampled" else {})
                            for mode in ("greedy", "sampled")}  # fmt: skip
        for batch in args.batches:
            for mode in args.modes:
                for e in args.exits:
                    todo = [(k, t) for k, t in grid if (name, batch, mode, e, k, t) not in done]
                    if todo:
                        runs += measure_exit(name, model, prompts, batch, mode, e, todo, args, step_costs)
                        write_results(args.name, runs, report(runs, hf_rows, args, auto_rows=auto_rows),
                                      extra={**extra, "runs": runs, "auto": auto_rows})  # fmt: skip
                        print(f"{name} batch {batch} {mode} exit {e}: done", flush=True)
                cell = [r for r in runs if (r["model"], r["batch"], r["mode"]) == (name, batch, mode)]
                if (
                    args.auto_rounds
                    and cell
                    and not any((a["model"], a["batch"], a["mode"]) == (name, batch, mode) for a in auto_rows)
                ):
                    auto_rows.append(measure_auto(name, model, prompts, batch, mode, cell, args))
                    a = auto_rows[-1]
                    print(f"{name} batch {batch} {mode} auto: {a['auto_speedup']:.2f}x, re-timed best "
                          f"{a['best_speedup']:.2f}x", flush=True)  # fmt: skip
                    write_results(args.name, runs, report(runs, hf_rows, args, auto_rows=auto_rows),
                                  extra={**extra, "runs": runs, "auto": auto_rows})  # fmt: skip
        if args.hf_exits and not any(r["model"] == name for r in hf_rows):
            hf_rows += measure_transformers(name, MODELS[name], prompts, args.hf_exits, args, model)
    extra |= {"transformers": hf_rows, "repetition": repetition, "auto": auto_rows}
    if auto_rows:
        draw_choices([(f"{a['model']}, batch {a['batch']}, {a['mode']}", a["picture"]) for a in auto_rows],
                     RESULTS / f"{args.name}_auto_choices.png")  # fmt: skip
    write_results(args.name, runs, report(runs, hf_rows, args, repetition, auto_rows), extra={**extra, "runs": runs})
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
