"""The research's proposed next experiments in progressive growth (issue 16, part 9), each a phase plan.

SEEDS.md section 3 proposes growing beyond one layer, unfreezing old layers later, and separate
learning rates for new and unfrozen old layers. Each is a ``PhasedExitLM`` plan here, with
standard training (one exit at the deepest layer of each phase):

* ``grow_3_to_4``: ``configs/progressive_standard.yaml`` (3 layers, then a 4th at 0.1x the lr);
* ``grow_3_to_6``: ``configs/progressive_3_to_6.yaml`` (then one more layer per phase up to 6);
* ``unfreeze``: 3 -> 4 as above, then layer 3 unfrozen beside layer 4, then every layer, all at
  0.1x the lr;
* ``unfreeze_split_lr``: ``configs/progressive_unfreeze.yaml`` (as ``unfreeze``, with the new
  layer at 1e-3 and the unfrozen layer 3 at 1e-5 in the third phase).

Each plan runs against a model of its final depth trained from scratch on all data for the same
training FLOPs (every phase's tokens times its per-token cost, frozen layers without backward;
:func:`~lego_lightning.model.flops.training_flops_per_token`), keeping its best validation.
Every phase ends after patience 1 (or ``--max-epochs``). Word-level WikiText-2 with the
vocabulary cap that ``progressive.md`` uses (8,192), 3 seeds.

    python -m benchmarks.growth_plans                    # hours on 2 CPU cores
    python -m benchmarks.growth_plans --resume           # after an interruption
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    DEFAULT_DATA,
    REPO,
    ValidationHistory,
    add_resume_arguments,
    config_cli,
    direction,
    fmt,
    index_runs,
    quiet_trainer,
    resumed_runs,
    summary,
    versus,
    write_results,
)
from lego_lightning import SupervisedExitLM
from lego_lightning.callbacks import PerplexityEarlyStopping
from lego_lightning.model import flops

UNFREEZE_SAME_LR = [
    {"layers": 3, "max_epochs": 50, "patience": 1},
    {"layers": 4, "grow_init": "random", "train": ["new"], "lr_scale": 0.1, "max_epochs": 50, "patience": 1},
    {"train": ["layer 4", "exit 4", "layer 3"], "lr_scale": 0.1, "max_epochs": 50, "patience": 1},
    {"train": ["all"], "lr_scale": 0.1, "max_epochs": 50, "patience": 1},
]
PLANS: dict[str, tuple[str, list[dict[str, Any]] | None]] = {
    "grow_3_to_4": ("progressive_standard", None),
    "grow_3_to_6": ("progressive_3_to_6", None),
    "unfreeze": ("progressive_unfreeze", UNFREEZE_SAME_LR),
    "unfreeze_split_lr": ("progressive_unfreeze", None),
}
SEEDS = (0, 1, 2)  # the study's; the report is complete when every plan and its baseline ran at each


class TokensPerPhase(Callback):
    """Training tokens seen in each phase."""

    def __init__(self) -> None:
        self.tokens: dict[int, int] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        phase = int(getattr(pl_module, "phase", 1))
        self.tokens[phase] = self.tokens.get(phase, 0) + batch["input_ids"].numel()


def phase_flops_per_token(module: Any, number: int, context: float) -> float:
    """One training token's FLOPs in phase ``number``: no backward below the lowest trained part."""
    r = module.plan[number - 1]
    trained_layers = sorted(u[1] for u in r.trained if u[0] == "layer")
    frozen = 0 if ("embedding",) in r.trained else trained_layers[0] - 1
    exits_trained = {u[1] for u in r.trained if u[0] == "exit"}
    if module.config.head_sharing == "shared" and exits_trained:
        frozen_heads = []  # the one head trains
    else:
        frozen_heads = [i for i, k in enumerate(module.config.exit_layers) if k not in exits_trained]
    weights = module.phase_loss_weights(number)
    return flops.training_flops_per_token(module.config, weights, context, frozen, frozen_heads).total


def run_plan(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    config, phases = PLANS[name]
    history, tokens = ValidationHistory(), TokensPerPhase()
    with tempfile.TemporaryDirectory() as work:
        overrides = ["--data.max_vocab_size", str(args.vocab_cap)] if args.vocab_cap else []
        plan = phases
        if plan is None:
            plan = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())["model"]["init_args"].get("phases")
        if plan is not None:  # a PhasedExitLM config: its plan, with this run's epoch limit
            limited = [{**p, "max_epochs": min(p.get("max_epochs", 50), args.max_epochs)} for p in plan]
            overrides += ["--model.phases", json.dumps(limited)]
        else:
            overrides += ["--model.phase1_max_epochs", str(args.max_epochs)]
            overrides += ["--model.phase2_max_epochs", str(args.max_epochs)]
        cli = config_cli(config, args.data, seed, work, *overrides)
        cli.trainer.callbacks.extend([history, tokens])
        start = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)
        wall = time.perf_counter() - start
    module = cli.model
    context = flops.mean_context(cli.datamodule.seq_len)
    per_phase = []
    for number in range(1, module.num_phases + 1):
        entries = history.phase(number)
        if not entries:
            continue
        per_token = phase_flops_per_token(module, number, context)
        per_phase.append(
            {
                "phase": number,
                "best_ppl": min(h["ppl"] for h in entries),
                "epochs": len(entries),
                "tokens": tokens.tokens.get(number, 0),
                "flops_per_token": per_token,
                "train_flops": per_token * tokens.tokens.get(number, 0),
            }
        )
    return {
        "kind": "plan",
        "name": name,
        "seed": seed,
        "depth": module.config.n_layers,
        "phases": per_phase,
        "final_ppl": per_phase[-1]["best_ppl"],
        "train_flops": sum(p["train_flops"] for p in per_phase),
        "wall_s": wall,
        "vocab_size": module.data_vocab_size,
    }


def run_scratch(plan_row: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A model of the plan's final depth from scratch, on all data, for the plan's training FLOPs."""
    seed, depth = plan_row["seed"], plan_row["depth"]
    with tempfile.TemporaryDirectory() as work:
        overrides = ["--data.max_vocab_size", str(args.vocab_cap)] if args.vocab_cap else []
        cli = config_cli("standard", args.data, seed, work, *overrides)  # its data settings
        dm = cli.datamodule
        dm.setup("fit")
        L.seed_everything(seed, verbose=False)
        module = SupervisedExitLM(
            vocab_size=dm.vocab_size, n_layers=depth, d_model=64, n_heads=4, max_seq_len=32, dropout=0.1
        )
        per_token = flops.training_flops_per_token(module.config, [1.0], flops.mean_context(dm.seq_len)).total
        steps = max(1, int(plan_row["train_flops"] / (per_token * dm.batch_size * dm.seq_len)))
        keep_best = PerplexityEarlyStopping(patience=10**9, restore_best_weights=True)
        history = ValidationHistory()
        trainer = quiet_trainer(max_steps=steps, max_epochs=-1, default_root_dir=work, callbacks=[keep_best, history])
        start = time.perf_counter()
        trainer.fit(module, dm)
        wall = time.perf_counter() - start
    return {
        "kind": "scratch",
        "name": f"scratch_for_{plan_row['name']}",
        "plan": plan_row["name"],
        "seed": seed,
        "depth": depth,
        "steps": steps,
        "final_ppl": min(h["ppl"] for h in history.history),
        "train_flops": per_token * steps * dm.batch_size * dm.seq_len,
        "wall_s": wall,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| plan | final depth | seeds | PPL after the plan | from scratch, same FLOPs | plan - scratch | "
        "training TFLOPs | per-phase best PPL (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in PLANS:
        plans = [r for r in rows if r["kind"] == "plan" and r["name"] == name]
        scratch = {r["seed"]: r for r in rows if r["kind"] == "scratch" and r["plan"] == name}
        if not plans:
            continue
        paired = [r for r in plans if r["seed"] in scratch]
        a = [r["final_ppl"] for r in paired]
        b = [scratch[r["seed"]]["final_ppl"] for r in paired]
        phases = max(len(r["phases"]) for r in plans)
        per_phase = [
            statistics.fmean(r["phases"][i]["best_ppl"] for r in plans if len(r["phases"]) > i) for i in range(phases)
        ]
        lines.append(
            f"| {name} | {plans[0]['depth']} | {len(plans)} | {fmt(summary([r['final_ppl'] for r in plans]))} | "
            f"{fmt(summary(b)) if b else ''} | {versus(a, b) if b else ''} | "
            f"{statistics.fmean(r['train_flops'] for r in plans) / 1e12:.1f} | "
            f"{', '.join(f'{p:.1f}' for p in per_phase)} |"
        )
    return "\n".join(lines)


# What :func:`~benchmarks.common.direction` says of a plan's PPL against its from-scratch baseline, in words.
VERDICTS = {
    "lower": "helps (lower PPL beyond the seed spread)",
    "higher": "hurts (higher PPL beyond the seed spread)",
    "not told apart": "neither helps nor hurts (within the seed spread)",
    "one seed": "has no verdict yet (one seed)",
}


def observations(rows: list[dict[str, Any]]) -> str:
    said = []
    for name in PLANS:
        plans = {r["seed"]: r for r in rows if r["kind"] == "plan" and r["name"] == name}
        scratch = {r["seed"]: r for r in rows if r["kind"] == "scratch" and r["plan"] == name}
        seeds = sorted(set(plans) & set(scratch))
        if not seeds:
            continue
        grown, fresh = [plans[s]["final_ppl"] for s in seeds], [scratch[s]["final_ppl"] for s in seeds]
        diffs = [a - b for a, b in zip(grown, fresh)]
        better = sum(d < 0 for d in diffs)
        verdict = VERDICTS[direction(grown, fresh)]
        said.append(
            f"- `{name}` {verdict}: below the from-scratch model at the same FLOPs in {better} of {len(seeds)} "
            f"seeds (differences {', '.join(f'{d:+.2f}' for d in diffs)})."
        )
    return "\n".join(said) or "No paired runs yet."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--plans", nargs="*", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--vocab-cap", type=int, default=8192)
    parser.add_argument("--max-epochs", type=int, default=50, help="each phase's epoch limit")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "growth_plans")
    args = parser.parse_args()
    args.settings = {k: getattr(args, k) for k in ("vocab_cap", "max_epochs")}
    rows, args.resumed_from = resumed_runs(args, "rows", args.settings)
    done = index_runs(rows, lambda r: (r["kind"], r["name"], r["seed"]))

    def keep(row: dict[str, Any]) -> dict[str, Any]:
        rows.append(row)
        done[row["kind"], row["name"], row["seed"]] = row
        report(rows, args, complete=False)
        return row

    for seed in args.seeds:
        for name in args.plans:
            plan_row = done.get(("plan", name, seed)) or keep(run_plan(name, seed, args))
            if ("scratch", f"scratch_for_{name}", seed) not in done:
                keep(run_scratch(plan_row, args))
    # A lane (some seeds or plans) leaves the study partial until a merge holds every run.
    grid = {(kind, f"{prefix}{name}", seed) for seed in SEEDS for name in PLANS
            for kind, prefix in (("plan", ""), ("scratch", "scratch_for_"))}  # fmt: skip
    report(rows, args, complete=grid <= set(done))


def report(rows: list[dict[str, Any]], args: argparse.Namespace, complete: bool) -> None:
    vocab = "the full vocabulary" if not args.vocab_cap else f"the vocabulary capped at {args.vocab_cap}"
    markdown = "\n\n".join(
        [
            "# Growth plans (issue 16, part 9)" + ("" if complete else " (partial)"),
            f"Word-level WikiText-2 (10,000 training blocks of 32 tokens, 2,000 validation blocks), {vocab}, "
            "d_model 64, 4 heads, batch 64, lr 1e-3, dropout 0.1; every phase ends after 1 validation without "
            f"improvement or {args.max_epochs} epochs. PPL is the deepest exit's best validation PPL in the last "
            "phase; the from-scratch model of the same depth trains on all data for the plan's training FLOPs and "
            "keeps its best validation.",
            table(rows),
            "## What the numbers show\n\n" + observations(rows),
        ]
    )
    write_results(
        args.name,
        rows,
        markdown,
        extra={"complete": complete, "resumed_from": args.resumed_from, "settings": args.settings},
    )


if __name__ == "__main__":
    main()
