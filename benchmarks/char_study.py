"""The character-level study (SEEDS.md section 4): eight methods, several seeds, two stopping rules.

Each method is its ``configs/char_*.yaml`` run through the ``lego`` CLI classes, so the
benchmark trains exactly what a user gets. Every run keeps its best checkpoint by validation
perplexity and is evaluated there: the final exit's perplexity (full compute), and for
methods with trained intermediate exits the routed model at ``--threshold`` with its FLOPs
ratio (everything that runs) and the research's layers-only ratio.

    python -m benchmarks.char_study                      # 3 seeds, patience 0 and 3
    python -m benchmarks.char_study --seeds 0 --patience 0 --methods standard deed
    python -m benchmarks.char_study --resume   # after an interruption: run only what is missing
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_DATA,
    add_resume_arguments,
    agreement,
    config_cli,
    direction,
    fmt,
    index_runs,
    resumed_runs,
    runs_of,
    summary,
    versus,
    write_results,
)

# SEEDS.md section 4: method -> (config, research PPL, research compute %), in the research's rank order.
METHODS: dict[str, tuple[str, float, float]] = {
    "discriminative_lr_decreasing": ("char_discriminative_lr_decreasing", 18.52, 65.2),
    "discriminative_lr_increasing": ("char_discriminative_lr_increasing", 21.14, 72.1),
    "asymmetric_aux_0.8": ("char_asymmetric_aux_0.8", 22.40, 65.2),
    "asymmetric_aux_0.7": ("char_asymmetric_aux_0.7", 22.95, 65.0),
    "aux_loss": ("char_aux_loss", 23.98, 65.2),
    "deed": ("char_deed", 28.13, 46.6),
    "deep_supervision": ("char_deep_supervision", 30.54, 100.0),
    "standard": ("char_standard", 34.86, 100.0),
}


def run_one(method: str, seed: int, patience: int, max_epochs: int, threshold: float, data: Path) -> dict[str, Any]:
    from lego_lightning.callbacks import PerplexityEarlyStopping

    with tempfile.TemporaryDirectory() as work:
        cli = config_cli(METHODS[method][0], data, seed, work, "--trainer.max_epochs", str(max_epochs))
        trainer, model = cli.trainer, cli.model
        stopper = next(cb for cb in trainer.callbacks if isinstance(cb, PerplexityEarlyStopping))
        stopper.patience = patience
        start = time.perf_counter()
        trainer.fit(model, cli.datamodule)
        wall = time.perf_counter() - start
        epochs = trainer.current_epoch
        weights = [s.loss_weight for s in model.config.stages]
        routable = len(weights) > 1 and all(w > 0 for w in weights[:-1])
        if routable:
            model.routing_threshold = threshold  # evaluate every multi-exit method at one threshold
        (metrics,) = trainer.validate(model, cli.datamodule, ckpt_path="best", verbose=False)
        best_epoch = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)["epoch"]
    deepest = model.config.exit_layers[-1]
    row = {
        "method": method,
        "seed": seed,
        "patience": patience,
        "epochs": epochs,
        "wall_s": wall,
        "best_epoch": best_epoch,
        "final_exit_ppl": float(metrics[f"val/exit{deepest}/ppl"]),
    }
    if routable:
        row.update(
            routed_ppl=float(metrics["val/routed/ppl"]),
            flops_ratio=float(metrics["val/routed/flops_ratio"]),
            layers_ratio=float(metrics["val/routed/layers_ratio"]),
        )
    return row


def aggregate(runs: list[dict[str, Any]], patience: int) -> list[dict[str, Any]]:
    rows = []
    for method, (_, research_ppl, research_compute) in METHODS.items():
        mine = runs_of(runs, method, patience)
        if not mine:
            continue
        row: dict[str, Any] = {
            "method": method,
            "patience": patience,
            "seeds": [r["seed"] for r in mine],
            "research_ppl": research_ppl,
            "research_compute_pct": research_compute,
            "final_exit_ppl": summary([r["final_exit_ppl"] for r in mine]),
            "epochs": summary([r["epochs"] for r in mine]),
            "wall_s": summary([r["wall_s"] for r in mine]),
        }
        if "routed_ppl" in mine[0]:
            for key in ("routed_ppl", "flops_ratio", "layers_ratio"):
                row[key] = summary([r[key] for r in mine])
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], threshold: float) -> str:
    lines = [
        f"| method | research PPL | final-exit PPL | routed PPL @ {threshold} | FLOPs ratio (all) | layers-only ratio "
        "| research compute | epochs | s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        routed = (
            [fmt(r[k], 3 if k != "routed_ppl" else 2) for k in ("routed_ppl", "flops_ratio", "layers_ratio")]
            if "routed_ppl" in r
            else ["n/a"] * 3
        )
        lines.append(
            f"| {r['method']} | {r['research_ppl']:.2f} | {fmt(r['final_exit_ppl'])} | {routed[0]} | {routed[1]} | "
            f"{routed[2]} | {r['research_compute_pct']:.1f}% | {fmt(r['epochs'], 1)} | {fmt(r['wall_s'], 0)} |"
        )
    return "\n".join(lines)


def observations(rows: list[dict[str, Any]]) -> str:
    """Plain statements computed from the numbers, so they stay true when the benchmark reruns."""
    by_ppl = sorted(rows, key=lambda r: r["final_exit_ppl"]["mean"])
    ours = [r["method"] for r in by_ppl]
    research = [m for m in METHODS if m in ours]
    std = {r["method"]: r for r in rows}
    out = [
        f"- Ranking by final-exit PPL (best first): {', '.join(ours)}.",
        f"- The research's ranking: {', '.join(research)}.",
    ]
    if all(len(r["final_exit_ppl"]["values"]) < 2 for r in rows):
        out.append("- One seed: no spread, so no method's PPL can be told from another's.")
    elif "standard" in std:
        s = std["standard"]["final_exit_ppl"]
        beats = [
            r["method"]
            for r in rows
            if r["method"] != "standard"
            and r["final_exit_ppl"]["mean"] + r["final_exit_ppl"]["std"] < s["mean"] - s["std"]
        ]
        out.append(
            "- Methods whose PPL beats standard by more than one standard deviation on both sides: "
            + (", ".join(beats) if beats else "none")
            + "."
        )
    spread = max(r["final_exit_ppl"]["mean"] for r in rows) - min(r["final_exit_ppl"]["mean"] for r in rows)
    out.append(f"- Spread of mean final-exit PPL across methods: {spread:.2f}.")
    for r in rows:
        if "flops_ratio" in r:
            out.append(
                f"- {r['method']}: routed at the threshold, the research's layers-only count gives "
                f"{r['layers_ratio']['mean']:.1%}; counting heads and confidence gives {r['flops_ratio']['mean']:.1%}."
            )
    return "\n".join(out)


def _values(runs: list[dict[str, Any]], method: str, patience: int, key: str) -> list[float]:
    return [r[key] for r in runs_of(runs, method, patience) if key in r]


def convergence(runs: list[dict[str, Any]], short: int, long: int, max_epochs: int) -> str:
    """Which conclusions of the research's stopping rule (``short`` patience) hold at ``long`` patience.

    Only methods measured at both patiences take part, so a partly run study says what it can.
    Runs that reached ``max_epochs`` are named: they stopped at the cap, not at convergence.
    """
    methods = [
        m for m in METHODS if _values(runs, m, short, "final_exit_ppl") and _values(runs, m, long, "final_exit_ppl")
    ]
    if not methods:
        return ""
    ppl = {(m, p): _values(runs, m, p, "final_exit_ppl") for m in methods for p in (short, long)}
    out = []
    for m in methods:
        epochs = [fmt(summary(_values(runs, m, p, "epochs")), 1) for p in (short, long)]
        out.append(
            f"- {m}: final-exit PPL at patience {long} against patience {short}: "
            f"{versus(ppl[m, long], ppl[m, short], 2)} (negative is better); epochs {epochs[0]} -> {epochs[1]}."
        )
    for p in (short, long):
        ranked = sorted(methods, key=lambda m: summary(ppl[m, p])["mean"])
        out.append(f"- Ranking of these {len(methods)} methods at patience {p} (best first): {', '.join(ranked)}.")
    if "standard" in methods:
        for m in methods:
            if m == "standard":
                continue
            said = [direction(ppl[m, p], ppl["standard", p]) for p in (short, long)]
            out.append(
                f"- {m} against standard: {said[0]} at patience {short}, {said[1]} at patience {long}: "
                f"the conclusion {agreement(said)}."
            )
    for m in methods:
        extra = [
            [a - b for a, b in zip(_values(runs, m, p, "flops_ratio"), _values(runs, m, p, "layers_ratio"))]
            for p in (short, long)
        ]
        if all(extra):
            out.append(
                f"- {m}, routed: counting heads and confidence adds {summary(extra[0])['mean']:+.1%} to the "
                f"layers-only ratio at patience {short} and {summary(extra[1])['mean']:+.1%} at patience {long}."
            )
    at_cap = {m: _values(runs, m, long, "epochs").count(max_epochs) for m in methods}
    if capped := [m for m in methods if at_cap[m]]:
        seeds = ", ".join(f"{m} {at_cap[m]} of {len(_values(runs, m, long, 'epochs'))}" for m in capped)
        out.append(
            f"- Stopped by the {max_epochs}-epoch cap rather than by patience {long} in at least one seed, so not "
            f"converged: {', '.join(capped)}. Seeds at the cap: {seeds}."
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patience", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "char_study")
    args = parser.parse_args()

    args.settings = {"max_epochs": args.max_epochs, "threshold": args.threshold}
    runs, args.resumed_from = resumed_runs(args, "runs", args.settings)
    done_before = index_runs(runs, lambda r: (r["method"], r["seed"], r["patience"]))
    for patience in args.patience:
        for method in args.methods:
            for seed in args.seeds:
                if (method, seed, patience) in done_before:
                    continue
                row = run_one(method, seed, patience, args.max_epochs, args.threshold, args.data)
                print(row, flush=True)
                runs.append(row)
                report(runs, args, done=False)  # an interrupted benchmark keeps what it measured
    report(runs, args, done=True)


def report(runs: list[dict[str, Any]], args: argparse.Namespace, done: bool) -> None:
    sections, rows = [], []
    # Every patience measured so far, also those an earlier invocation ran and this one did not ask for.
    for patience in sorted({r["patience"] for r in runs} | set(args.patience)):
        agg = aggregate(runs, patience)
        if not agg:
            continue
        rows += agg
        rule = (
            "the research's rule: stop at the first epoch without improvement"
            if patience == 0
            else "trained to convergence"
        )
        seeds = sorted({r["seed"] for r in runs if r["patience"] == patience})
        sections.append(
            f"## Patience {patience} ({rule}; seeds {seeds})\n\n{table(agg, args.threshold)}\n\n{observations(agg)}"
        )
    patiences = sorted({r["patience"] for r in runs})
    if len(patiences) > 1 and (held := convergence(runs, patiences[0], patiences[-1], args.max_epochs)):
        sections.append(f"## Which conclusions hold when trained to convergence\n\n{held}")
    markdown = (
        "# Character-level study (SEEDS.md section 4)" + ("" if done else " (partial: still running)") + "\n\n"
        f"Char-level WikiText-2 from `configs/char_*.yaml`: the first 100K training and 10K validation characters, "
        f"d_model 64, 4 heads, 3 layers, at most {args.max_epochs} epochs. Each run is evaluated "
        "at its best validation checkpoint. Mean ± sample standard deviation over seeds. "
        f"Routed columns: every method with trained intermediate exits, max-prob routing at {args.threshold}; "
        "the discriminative-lr configs train only the final exit, so they have none. The research's compute column "
        "is not defined in its notes (it reports 65% for methods without routing); it is shown for reference only.\n\n"
        + "\n\n".join(sections)
    )
    path = write_results(
        args.name,
        rows,
        markdown,
        extra={
            "runs": runs,
            "threshold": args.threshold,
            "complete": done,
            "resumed_from": args.resumed_from,
            "settings": args.settings,
        },
    )
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
