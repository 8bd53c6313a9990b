"""The research's SD/SD2 grid (SEEDS.md section 5): {constant, linear, cosine} x {none, SD, SD2}.

AdamW on word-level WikiText-2 (the shared files), for the masked-word objective and the causal
one, several seeds, a fixed number of epochs (no early stopping, so overfitting shows): final
train loss, best validation loss and PPL, the epoch of the best validation loss, and curves.
For every schedule and objective it also trains, without the callback, at the base lr that
SD2's mean scale implies (lr x mean L^(1/3), from the same seed's SD2 run), so a reader can
tell a real effect of SD2 from a plain change of learning rate.

    python -m benchmarks.sd_study
    python -m benchmarks.sd_study --vocab-cap 8192 --train-samples 2000 --epochs 12
    python -m benchmarks.sd_study --vocab-cap 8192 --resume   # after an interruption
    # part of the grid in a parallel lane, then its runs merged in:
    python -m benchmarks.sd_study --vocab-cap 8192 --objectives causal --schedules cosine --name sd_lane
    python -m benchmarks.sd_study --vocab-cap 8192 --resume --merge sd_lane
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    DEFAULT_DATA,
    RESULTS,
    ValidationHistory,
    add_resume_arguments,
    differ,
    fmt,
    index_runs,
    quiet_trainer,
    resumed_runs,
    summary,
    write_results,
)
from lego_lightning import SupervisedExitLM
from lego_lightning.callbacks import LossScaledLR
from lego_lightning.data import TextDataModule
from lego_lightning.modules.optim import SCHEDULES

# Two losses closer than this (nats), or within their seeds' spread, count as the same in the verdicts.
SAME_LOSS = 0.03
MODES = ("none", "sd", "sd2")
OBJECTIVES = ("masked", "causal")


class TrainLoss(Callback):
    """Mean training loss per epoch (the loss itself, not scaled), and the applied lr scale per step."""

    def __init__(self, loss_scaler: LossScaledLR | None) -> None:
        self.loss_scaler, self.epochs, self.scales, self._losses = loss_scaler, [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._losses.append(float(outputs["loss"]))
        if self.loss_scaler is not None:
            self.scales.append(self.loss_scaler.last_scale)

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(statistics.fmean(self._losses))
        self._losses = []


def run_one(objective: str, schedule: str, mode: str, seed: int, lr: float, dm: TextDataModule, args) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    module = SupervisedExitLM(
        vocab_size=dm.vocab_size,
        n_layers=3,
        d_model=64,
        n_heads=4,
        max_seq_len=dm.seq_len,
        dropout=args.dropout,
        objective=objective,
        lr=lr,
        scheduler=schedule,
        warmup_steps=args.warmup_steps,
    )
    scaler = LossScaledLR(mode=mode) if mode != "none" else None
    train, history = TrainLoss(scaler), ValidationHistory()
    trainer = quiet_trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        num_sanity_val_steps=0,
        callbacks=[*([scaler] if scaler else []), train, history],
    )
    start = time.perf_counter()
    trainer.fit(module, dm)
    val_losses = [math.log(h["ppl"]) for h in history.history]
    best = min(range(len(val_losses)), key=val_losses.__getitem__)
    return {
        "objective": objective,
        "schedule": schedule,
        "mode": mode,
        "seed": seed,
        "lr": lr,
        "final_train_loss": train.epochs[-1],
        "best_val_loss": val_losses[best],
        "best_val_ppl": math.exp(val_losses[best]),
        "best_epoch": best + 1,
        "final_val_loss": val_losses[-1],
        "train_curve": train.epochs,
        "val_curve": val_losses,
        "mean_scale": statistics.fmean(train.scales) if train.scales else 1.0,
        "wall_s": time.perf_counter() - start,
    }


def label(row: dict[str, Any], base_lr: float) -> str:
    return row["mode"] if row["mode"] != "none" or row["lr"] == base_lr else "none @ SD2-implied lr"


def table(rows: list[dict[str, Any]], objective: str, base_lr: float) -> str:
    lines = [
        "| schedule | method | lr | final train loss | best val loss | best val PPL | best epoch | mean lr scale |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for schedule in SCHEDULES:
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["objective"] == objective and r["schedule"] == schedule:
                groups.setdefault(label(r, base_lr), []).append(r)
        for name, mine in groups.items():
            cells = [schedule, name, f"{statistics.fmean(r['lr'] for r in mine):.2e}"]  # implied lr: seeds' mean
            cells += [fmt(summary([r[k] for r in mine]), d) for k, d in (("final_train_loss", 3), ("best_val_loss", 3))]
            cells += [
                fmt(summary([r["best_val_ppl"] for r in mine]), 1),
                fmt(summary([r["best_epoch"] for r in mine]), 1),
            ]
            cells.append(fmt(summary([r["mean_scale"] for r in mine]), 3))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def runs_of(
    rows: list[dict[str, Any]], objective: str, schedule: str, base_lr: float
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """One grid cell's runs: each mode at the base lr, and plain training at SD2's implied lr."""
    cell = [r for r in rows if (r["objective"], r["schedule"]) == (objective, schedule)]
    at_base = {m: [r for r in cell if r["mode"] == m and r["lr"] == base_lr] for m in MODES}
    implied = [r for r in cell if r["mode"] == "none" and r["lr"] != base_lr]
    return at_base, implied


def observations(rows: list[dict[str, Any]], base_lr: float) -> str:
    out = []
    for objective in OBJECTIVES:
        for schedule in SCHEDULES:
            pick, implied = runs_of(rows, objective, schedule, base_lr)
            if not all(pick.values()):
                continue
            none, sd, sd2 = (pick[m] for m in MODES)
            spread = max(summary([r["best_val_loss"] for r in g])["std"] for g in pick.values())
            # One seed has no spread to report: say so rather than print 0.
            spread_text = f"largest seed spread {spread:.3f}" if len(none) > 1 else "one seed, no spread"
            line = (
                f"- {objective}, {schedule}: final train loss none {_mean(none, 'final_train_loss'):.3f}, "
                f"SD {_mean(sd, 'final_train_loss'):.3f}, SD2 {_mean(sd2, 'final_train_loss'):.3f}; best val loss "
                f"none {_mean(none, 'best_val_loss'):.3f}, SD {_mean(sd, 'best_val_loss'):.3f}, "
                f"SD2 {_mean(sd2, 'best_val_loss'):.3f} ({spread_text}); best epoch none "
                f"{_mean(none, 'best_epoch'):.1f}, SD2 {_mean(sd2, 'best_epoch'):.1f}."
            )
            if implied:
                line += (
                    f" Without the callback at SD2's implied lr ({_mean(implied, 'lr'):.2e}): final train loss "
                    f"{_mean(implied, 'final_train_loss'):.3f}, best val loss {_mean(implied, 'best_val_loss'):.3f}."
                )
            out.append(line)
    return "\n".join(verdicts(rows, base_lr) + out)


def losses_differ(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> tuple[float, bool]:
    """:func:`benchmarks.common.differ` on ``key``, where losses closer than SAME_LOSS count as equal."""
    return differ([r[key] for r in a], [r[key] for r in b], floor=SAME_LOSS)


def verdicts(rows: list[dict[str, Any]], base_lr: float) -> list[str]:
    """The research's three claims, each checked per objective across the three schedules."""
    out = []
    for objective in OBJECTIVES:
        groups = []
        for schedule in SCHEDULES:
            at, implied = runs_of(rows, objective, schedule, base_lr)
            if all(at.values()) and implied:
                groups.append((at["none"], at["sd"], at["sd2"], implied))
        if not groups:
            continue
        n = len(groups)
        sd_val = [losses_differ(sd, none, "best_val_loss") for none, sd, _, _ in groups]
        sd2_train = [losses_differ(sd2, none, "final_train_loss") for none, _, sd2, _ in groups]
        sd2_val = [losses_differ(sd2, none, "best_val_loss") for none, _, sd2, _ in groups]
        sd2_earlier = sum(_mean(sd2, "best_epoch") < _mean(none, "best_epoch") for none, _, sd2, _ in groups)
        # SD2 against plain training at its implied lr, on both losses: told apart on either?
        plain = [
            (losses_differ(sd2, imp, "final_train_loss"), losses_differ(sd2, imp, "best_val_loss"))
            for _, _, sd2, imp in groups
        ]
        told_apart = sum(train[1] or val[1] for train, val in plain)
        largest = max(max(abs(train[0]), abs(val[0])) for train, val in plain)

        def count(pairs: list[tuple[float, bool]], better: bool) -> int:
            return sum(real and (d < 0) == better for d, real in pairs)

        sd_better, sd_worse = count(sd_val, True), count(sd_val, False)
        out.append(
            f"- **{objective}, base lr {base_lr:g}.** SD {'helps in some schedule' if sd_better else 'does not help'}: "
            f"its best val loss differs from no scaling by {min(d for d, _ in sd_val):+.3f} to "
            f"{max(d for d, _ in sd_val):+.3f} across {n} schedules (negative is better); beyond the seed spread it is "
            f"better in {sd_better} and worse in {sd_worse}. SD2 lowers the final train loss in "
            f"{sum(d < 0 for d, _ in sd2_train)} of {n} schedules ({count(sd2_train, True)} beyond the seed spread) "
            f"and reaches its best val loss earlier in {sd2_earlier} of {n}; its best val loss differs from no scaling "
            f"by {min(d for d, _ in sd2_val):+.3f} to {max(d for d, _ in sd2_val):+.3f} (worse beyond the seed spread "
            f"in {count(sd2_val, False)} of {n}). "
            + (
                f"Plain training at SD2's implied lr cannot be told from SD2 on either loss in any schedule (largest "
                f"difference {largest:.3f}, within the seed spread or {SAME_LOSS}): here SD2 does what a higher "
                "learning rate does."
                if told_apart == 0
                else f"Plain training at SD2's implied lr differs from SD2 beyond the seed spread in {told_apart} of "
                f"{n} schedules (largest difference {largest:.3f}): there SD2 is not just a higher learning rate."
            )
        )
    return out


def plot(rows: list[dict[str, Any]], base_lr: float, path: Path) -> bool:
    try:
        from lego_lightning import viz

        plt = viz._pyplot()
    except ImportError:
        return False
    objectives = [o for o in OBJECTIVES if any(r["objective"] == o for r in rows)]
    fig, axes = plt.subplots(len(objectives), len(SCHEDULES), figsize=(13, 3.5 * len(objectives)), squeeze=False)
    for i, objective in enumerate(objectives):
        for j, schedule in enumerate(SCHEDULES):
            groups: dict[str, list[dict[str, Any]]] = {}
            for r in rows:
                if r["objective"] == objective and r["schedule"] == schedule:
                    groups.setdefault(label(r, base_lr), []).append(r)
            series, styles = {}, {}
            for name, mine in groups.items():
                for kind in ("val", "train"):
                    curve = [statistics.fmean(c) for c in zip(*(r[f"{kind}_curve"] for r in mine))]
                    series[f"{name} ({kind})"] = list(enumerate(curve, start=1))
                    styles[f"{name} ({kind})"] = "-" if kind == "val" else "--"
            viz.metric_curves(
                series, title=f"{objective}, {schedule}", ylabel="loss (mean over seeds)", styles=styles, ax=axes[i][j]
            )
            axes[i][j].set_xlabel("epoch")
            if (i, j) != (0, 0):
                axes[i][j].get_legend().remove()
    viz.save(fig, path, dpi=110)
    return True


def report(rows: list[dict[str, Any]], args: argparse.Namespace, done: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    has_plot = plot(rows, args.lr, RESULTS / f"{args.name}_curves.png")
    vocab = "the full vocabulary (33,279)" if args.vocab_cap is None else f"the vocabulary capped at {args.vocab_cap}"
    parts = [
        "# SD and SD2: the loss-scaled learning rate (SEEDS.md section 5)"
        + ("" if done else " (partial: still running)"),
        f"Word-level WikiText-2 (the shared files), {args.train_samples} training and {args.val_samples} validation "
        f"blocks of 32 words, {vocab}; 3 layers, d_model 64, 4 heads, dropout {args.dropout}; AdamW at base lr "
        f"{args.lr:g} (warm-up {args.warmup_steps} steps), {args.epochs} epochs without early stopping; seeds "
        f"{args.seeds}. SD divides each step's lr by the cube root of the step's loss, SD2 multiplies (LossScaledLR, "
        "clamped to [0.1, 10]). The research fine-tuned bert-base-cased at lr 2e-5; here small models train from "
        "scratch, so compare directions. Masked: 15% of words, loss on those only.",
    ]
    for objective in OBJECTIVES:
        if any(r["objective"] == objective for r in rows):
            parts.append(f"## {objective} objective\n\n{table(rows, objective, args.lr)}")
    parts.append(
        "## Curves\n\n" + (f"![curves]({args.name}_curves.png)" if has_plot else "(matplotlib missing: no image)")
    )
    parts.append("## What holds\n\n" + observations(rows, args.lr))
    write_results(
        args.name,
        rows,
        "\n\n".join(parts),
        extra={"complete": done, "resumed_from": args.resumed_from, "settings": args.settings},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--val-samples", type=int, default=500)
    parser.add_argument("--vocab-cap", type=int, default=None)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--accelerator", default="auto")
    add_resume_arguments(parser, "sd_study")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    dm = TextDataModule(
        path=str(args.data),
        seq_len=32,
        batch_size=64,
        max_train_samples=args.train_samples,
        max_val_samples=args.val_samples,
        max_vocab_size=args.vocab_cap,
    )
    dm.setup("fit")
    args.settings = {
        k: getattr(args, k)
        for k in ("lr", "warmup_steps", "epochs", "train_samples", "val_samples", "vocab_cap", "dropout")
    }
    rows, args.resumed_from = resumed_runs(args, "rows", args.settings)

    def run_key(row: dict[str, Any]) -> tuple[str, str, str, int, bool]:
        """One run per (objective, schedule, mode, seed, at the base lr or SD2's implied one)."""
        return row["objective"], row["schedule"], row["mode"], row["seed"], row["lr"] == args.lr

    run_at = index_runs(rows, run_key)

    def keep(row: dict[str, Any]) -> None:
        rows.append(row)
        run_at[run_key(row)] = row  # only keys not yet measured are run

    for objective in args.objectives:
        for schedule in args.schedules:
            for mode in MODES:
                for seed in args.seeds:
                    if (objective, schedule, mode, seed, True) not in run_at:
                        keep(run_one(objective, schedule, mode, seed, args.lr, dm, args))
                        print({k: v for k, v in rows[-1].items() if "curve" not in k}, flush=True)
                        report(rows, args, done=False)
            for seed in args.seeds:
                if (objective, schedule, "none", seed, False) not in run_at:
                    # Each seed's own SD2 run sets its lr, so a resumed seed gets the lr a full run gives it.
                    implied_lr = args.lr * run_at[(objective, schedule, "sd2", seed, True)]["mean_scale"]
                    keep(run_one(objective, schedule, "none", seed, implied_lr, dm, args))
                    report(rows, args, done=False)
    report(rows, args, done=True)


if __name__ == "__main__":
    main()
