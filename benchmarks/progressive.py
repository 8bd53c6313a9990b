"""Progressive layer training (SEEDS.md section 3): standard against deep supervision, 3 layers then 4.

Each method is its ``configs/progressive_*.yaml`` run through the ``lego`` CLI classes: train 3
layers, add a randomly initialised 4th, freeze the embedding and layers 1-3, train layer 4 and
the head at 0.1x the learning rate. Two stopping rules: the research's (patience 1 in each
phase) and closer to convergence (patience 3). Every row sits beside the research's figure;
deep supervision's training step is timed against standard's in one process, alternating, with
the training-FLOPs ratio beside it (the training runs' own times per epoch are reported too, but
each run shares the machine with whatever else ran then, so their ratio is not a same-run figure).

    python -m benchmarks.progressive
    python -m benchmarks.progressive --vocab-cap 8192 --seeds 0 1 2
    python -m benchmarks.progressive --vocab-cap 8192 --resume   # after an interruption
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_DATA,
    ValidationHistory,
    add_resume_arguments,
    agreement,
    alternating_step_times,
    config_cli,
    direction,
    fmt,
    index_runs,
    resumed_runs,
    runs_of,
    summary,
    training_step_fn,
    versus,
    write_results,
)
from lego_lightning.model import flops

# SEEDS.md section 3: (accuracy, PPL, seconds) per phase; vocabulary 69,830, one seed.
RESEARCH = {
    "standard": {1: (0.1635, 978.89, 23.7), 2: (0.1620, 975.51, 27.4)},
    "deep_supervision": {1: (0.1645, 950.45, 53.1), 2: (0.1626, 968.60, 92.1)},
}


def run_one(method: str, seed: int, patience: int, args: argparse.Namespace) -> dict[str, Any]:
    history = ValidationHistory()
    with tempfile.TemporaryDirectory() as work:
        overrides = [f"--model.{name}" for name in ("phase1_patience", "phase2_patience")]
        cli_args = [overrides[0], str(patience), overrides[1], str(patience)]
        cli_args += [
            "--model.phase1_max_epochs",
            str(args.max_epochs),
            "--model.phase2_max_epochs",
            str(args.max_epochs),
        ]
        if args.vocab_cap:
            cli_args += ["--data.max_vocab_size", str(args.vocab_cap)]
        cli = config_cli(f"progressive_{method}", args.data, seed, work, *cli_args)
        cli.trainer.callbacks.append(history)
        cli.trainer.fit(cli.model, cli.datamodule)
    module = cli.model
    row: dict[str, Any] = {"method": method, "seed": seed, "patience": patience}
    end_of_phase1 = history.phase(1)[-1]["time_s"]
    for phase in (1, 2):
        entries = history.phase(phase)
        best = min(entries, key=lambda h: h["ppl"])
        seconds = entries[-1]["time_s"] - (0.0 if phase == 1 else end_of_phase1)
        row.update({f"phase{phase}_acc": best["acc"], f"phase{phase}_ppl": best["ppl"]})
        row.update({f"phase{phase}_time_s": seconds, f"phase{phase}_epochs": len(entries)})
        row[f"phase{phase}_s_per_epoch"] = seconds / len(entries)
    context = flops.mean_context(cli.datamodule.seq_len)
    cfg = module.config
    weights = {1: module.phase_loss_weights(1), 2: module.phase_loss_weights(2)}
    row["phase1_train_flops_per_token"] = flops.training_flops_per_token(cfg, weights[1], context).total
    row["phase2_train_flops_per_token"] = flops.training_flops_per_token(
        cfg, weights[2], context, frozen_layers=module.phase1_layers
    ).total
    return row


def step_cost(data: Path, vocab_cap: int | None, rounds: int, per_round: int) -> dict[str, Any]:
    """Deep supervision's training step time over standard's, per phase, timed in one process.

    Both modules come from the committed configs (sizes, batch, vocabulary) and step on the same
    real batch, alternating round by round; ratios pair the rounds.
    """
    import torch

    overrides = ["--data.max_vocab_size", str(vocab_cap)] if vocab_cap else []
    modules, batch = {}, None
    with tempfile.TemporaryDirectory() as work:
        for method in RESEARCH:
            cli = config_cli(f"progressive_{method}", data, 0, work, *overrides)
            modules[method] = cli.model
            if batch is None:
                cli.datamodule.setup("fit")
                batch = next(iter(cli.datamodule.train_dataloader()))
    x, y = modules["standard"].model_inputs(batch)
    out: dict[str, Any] = {"batch": list(x.shape), "rounds": rounds, "steps_per_round": per_round}
    for phase in (1, 2):
        if phase == 2:
            for module in modules.values():
                module.zero_grad(set_to_none=True)  # phase 1's gradients would hide whether phase 2 makes any
                module.apply_phase(2)
        torch.manual_seed(0)
        steps = {method: training_step_fn(module, x, y) for method, module in modules.items()}
        times = alternating_step_times(steps, rounds, per_round)
        ratios = [d / s for d, s in zip(times["deep_supervision"], times["standard"])]
        out[f"phase{phase}_step_s"] = {method: summary(t) for method, t in times.items()}
        out[f"phase{phase}_step_ratio"] = summary(ratios)
    frozen = [p for p in modules["standard"].parameters() if not p.requires_grad]
    out["frozen_parameters_without_grad"] = sum(p.grad is None for p in frozen)
    out["frozen_parameters"] = len(frozen)
    return out


def table(rows: list[dict[str, Any]], patience: int) -> str:
    lines = [
        "| model | phase 1 acc / PPL / s (research) | phase 1 acc / PPL / s (ours) | phase 2 acc / PPL / s (research) "
        "| phase 2 acc / PPL / s (ours) | epochs (phase 1, 2) |",
        "|---|---|---|---|---|---|",
    ]
    for method in RESEARCH:
        mine = runs_of(rows, method, patience)
        if not mine:
            continue
        cells = [method]
        for phase in (1, 2):
            acc, ppl, sec = RESEARCH[method][phase]
            cells.append(f"{acc:.2%} / {ppl:.2f} / {sec}")
            ours = [summary([r[f"phase{phase}_{k}"] for r in mine]) for k in ("acc", "ppl", "time_s")]
            ours[0] = {**ours[0], "mean": 100 * ours[0]["mean"], "std": 100 * ours[0]["std"]}
            cells.append(f"{fmt(ours[0], 2)}% / {fmt(ours[1], 1)} / {fmt(ours[2], 0)}")
        cells.append(", ".join(fmt(summary([r[f"phase{p}_epochs"] for r in mine]), 1) for p in (1, 2)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _time_ratio(ds: list[dict[str, Any]], std: list[dict[str, Any]], phase: int) -> float:
    """Deep supervision's mean seconds per epoch over standard's, in ``phase``."""
    key = f"phase{phase}_s_per_epoch"
    return (sum(r[key] for r in ds) / len(ds)) / (sum(r[key] for r in std) / len(std))


def _growth_gain(runs: list[dict[str, Any]]) -> float:
    """Mean change of the best PPL from phase 1 to phase 2: what the 4th layer bought."""
    return sum(r["phase2_ppl"] - r["phase1_ppl"] for r in runs) / len(runs)


def cost(rows: list[dict[str, Any]], steps: dict[str, Any] | None) -> str:
    """Deep supervision's training cost against standard's: FLOPs, the same-run step time, the research's time."""
    first = {method: next((r for r in rows if r["method"] == method), None) for method in RESEARCH}
    std, ds = first["standard"], first["deep_supervision"]
    if not (std and ds):
        return ""
    out = []
    for phase in (1, 2):
        flops_ratio = ds[f"phase{phase}_train_flops_per_token"] / std[f"phase{phase}_train_flops_per_token"]
        research = RESEARCH["deep_supervision"][phase][2] / RESEARCH["standard"][phase][2]
        timed = (
            f"a training step takes {fmt(steps[f'phase{phase}_step_ratio'], 2)}x standard's (timed in one process, "
            "alternating)"
            if steps
            else "no same-run step time was measured"
        )
        out.append(
            f"- Phase {phase}: deep supervision spends {flops_ratio:.2f}x standard's training FLOPs per token and "
            f"{timed}; the research reported {research:.2f}x for the whole phase's wall time."
        )
    if steps:
        out.append(
            f"- In phase 2, {steps['frozen_parameters_without_grad']} of {steps['frozen_parameters']} frozen "
            "parameters received no gradient."
        )
    return "\n".join(out)


def observations(rows: list[dict[str, Any]], patience: int) -> str:
    std, ds = runs_of(rows, "standard", patience), runs_of(rows, "deep_supervision", patience)
    out = []
    if not (std and ds):
        return ""
    out.append(
        "- Time per epoch of deep supervision over standard's, from the training runs (phase 1, phase 2): "
        f"{_time_ratio(ds, std, 1):.2f}x, {_time_ratio(ds, std, 2):.2f}x. Each run shared the machine with "
        "whatever ran beside it, so this is not a same-run ratio; the step time above is."
    )
    for phase in (1, 2):
        ds_ppl, std_ppl = [r[f"phase{phase}_ppl"] for r in ds], [r[f"phase{phase}_ppl"] for r in std]
        out.append(
            f"- Phase {phase}: deep supervision's PPL against standard's: {versus(ds_ppl, std_ppl)} "
            "(negative is better)."
        )
    out.append(
        f"- Adding the 4th layer changed the best PPL by {_growth_gain(std + ds):+.1f} on average (negative is better)."
    )
    return "\n".join(out)


def convergence(rows: list[dict[str, Any]], short: int, long: int) -> str:
    """Which conclusions of the research's stopping rule (``short`` patience) hold at ``long`` patience."""
    methods = [m for m in RESEARCH if runs_of(rows, m, short) and runs_of(rows, m, long)]
    if len(methods) < len(RESEARCH):
        return ""
    out = []
    for method in methods:
        before, after = runs_of(rows, method, short), runs_of(rows, method, long)
        epochs = [fmt(summary([r["phase1_epochs"] + r["phase2_epochs"] for r in runs]), 1) for runs in (before, after)]
        out.append(
            f"- {method}: phase-2 PPL at patience {long} against patience {short}: "
            f"{versus([r['phase2_ppl'] for r in after], [r['phase2_ppl'] for r in before])} "
            f"(negative is better); epochs in both phases {epochs[0]} -> {epochs[1]}."
        )
    for phase in (1, 2):
        said = []
        for patience in (short, long):
            std, ds = runs_of(rows, "standard", patience), runs_of(rows, "deep_supervision", patience)
            said.append(direction([r[f"phase{phase}_ppl"] for r in ds], [r[f"phase{phase}_ppl"] for r in std]))
        out.append(
            f"- Phase {phase}: deep supervision's PPL against standard's is {said[0]} at patience {short} and "
            f"{said[1]} at patience {long}: the conclusion {agreement(said)}."
        )
    ratios = {
        p: [_time_ratio(runs_of(rows, "deep_supervision", p), runs_of(rows, "standard", p), ph) for ph in (1, 2)]
        for p in (short, long)
    }
    out.append(
        f"- Deep supervision's time per epoch against standard's (phase 1, phase 2): "
        f"{ratios[short][0]:.2f}x, {ratios[short][1]:.2f}x at patience {short}; "
        f"{ratios[long][0]:.2f}x, {ratios[long][1]:.2f}x at patience {long} (from the training runs, not a "
        "same-run ratio)."
    )
    gains = [_growth_gain(runs_of(rows, "standard", p) + runs_of(rows, "deep_supervision", p)) for p in (short, long)]
    out.append(
        f"- What the 4th layer bought (phase 2 minus phase 1 PPL, both methods): {gains[0]:+.1f} at patience "
        f"{short}, {gains[1]:+.1f} at patience {long}."
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patience", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--vocab-cap", type=int, default=None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the same-run step timing")
    parser.add_argument("--steps", type=int, default=5, help="steps per round of the same-run step timing")
    add_resume_arguments(parser, "progressive")
    args = parser.parse_args()
    settings = {"max_epochs": args.max_epochs, "vocab_cap": args.vocab_cap}
    rows, resumed_from = resumed_runs(args, "rows", settings)
    # Timed first, so partial reports carry it too; it takes seconds against the runs' hours.
    args.step_cost = step_cost(args.data, args.vocab_cap, args.rounds, args.steps)
    done_before = index_runs(rows, lambda r: (r["method"], r["seed"], r["patience"]))
    shared = {"resumed_from": resumed_from, "settings": settings, "step_cost": args.step_cost}
    for patience in args.patience:
        for method in RESEARCH:
            for seed in args.seeds:
                if (method, seed, patience) in done_before:
                    continue
                rows.append(run_one(method, seed, patience, args))
                print(rows[-1], flush=True)
                write_results(args.name, rows, markdown(rows, args, done=False), extra={"complete": False, **shared})
    write_results(args.name, rows, markdown(rows, args, done=True), extra={"complete": True, **shared})


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, done: bool) -> str:
    vocab = "the full vocabulary (33,279)" if args.vocab_cap is None else f"the vocabulary capped at {args.vocab_cap}"
    parts = [
        "# Progressive layer training (SEEDS.md section 3)" + ("" if done else " (partial: still running)"),
        f"`configs/progressive_standard.yaml` and `configs/progressive_deep_supervision.yaml`: word-level WikiText-2, "
        f"10K training blocks of 32, {vocab}, d_model 64, 4 heads; 3 layers, then a random 4th with layers 1-3 frozen "
        f"at 0.1x lr; at most {args.max_epochs} epochs per phase; seeds {args.seeds}. Best validation accuracy and "
        "PPL per phase, and the phase's wall time. The research used a 69,830-word vocabulary, one seed and a GPU: "
        "compare directions and ratios, not absolute values.",
    ]
    if training_cost := cost(rows, args.step_cost):
        steps = args.step_cost
        parts.append(
            f"## Training cost\n\nMeasured by the command above: both configs' modules step on the same batch of "
            f"{steps['batch'][0]} x {steps['batch'][1]} tokens, {steps['rounds']} alternating rounds of "
            f"{steps['steps_per_round']} steps per phase (plain AdamW steps, no Trainer).\n\n{training_cost}"
        )
    for patience in args.patience:
        if any(r["patience"] == patience for r in rows):
            rule = "the research's patience" if patience == 1 else "closer to convergence"
            parts.append(f"## Patience {patience} in each phase ({rule})\n\n{table(rows, patience)}")
            parts.append(observations(rows, patience))
    if len(args.patience) == 2 and (held := convergence(rows, *sorted(args.patience))):
        parts.append(f"## Which conclusions hold when trained closer to convergence\n\n{held}")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
