"""Why ASHEM's phase 2 does not learn at the research's own setup (issue 16, part 10), probed with phase plans.

At the full 33,279-word vocabulary, ``configs/ashem.yaml``'s phase 2 makes the deep exit worse
every epoch, and the routed model ends above the 2-layer model alone (``ashem.md``). This
benchmark trains phase 1 once (2 layers, patience 1, its best weights kept) and then runs phase 2
from those same weights under several plans, each a :class:`~lego_lightning.Phase`:

* ``ours``: ``configs/ashem.yaml``'s phase 2: layers 3-4 identity-initialised, a new deep head
  copied from the shallow one and trained, 0.1x the learning rate, the loss on hard tokens;
* ``frozen_shared_head``: the deep exit keeps the shallow exit's head, frozen (no new head
  parameters; only layers 3-4 train);
* ``lr_1x``: ``ours`` at the full learning rate;
* ``all_tokens``: ``ours`` with the loss on every token;
* ``frozen_shared_head_lr_1x_all_tokens``: the three changes together.

Each phase 2 starts from the same phase-1 weights and the same threshold (``ours``' calibration;
the plans that mine recalibrate and get the same one), and runs until its patience (3) or
``--max-epochs``. Every validation is recorded: the deep exit's perplexity on all, hard and easy
tokens, the shallow exit's on hard tokens, the routed model's, and the training loss.

    python -m benchmarks.ashem_phase2                    # full vocabulary, seed 0 (about 2 hours on 2 cores)
    python -m benchmarks.ashem_phase2 --resume           # after an interruption: phase 1 is kept on disk
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import (
    DEFAULT_DATA,
    REPO,
    RESULTS,
    add_resume_arguments,
    index_runs,
    quiet_trainer,
    resumed_runs,
    write_results,
)
from lego_lightning import Phase, PhasedExitLM
from lego_lightning.data import TextDataModule

SEQ_LEN, BATCH = 32, 64
CACHE = REPO / ".bench_cache"
PHASE1 = Phase(layers=2, max_epochs=50, patience=1)
OURS = dict(layers=4, grow_init="identity", train=["new"], lr_scale=0.1, tokens="hard", hard_ratio=0.5, patience=3)
VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {},
    "frozen_shared_head": {"train": ["layers 3-4"]},
    "lr_1x": {"lr_scale": 1.0},
    "all_tokens": {"tokens": "all"},
    "frozen_shared_head_lr_1x_all_tokens": {"train": ["layers 3-4"], "lr_scale": 1.0, "tokens": "all"},
}
RECORDED = ("exit2/ppl", "exit4/ppl", "exit4/hard_ppl", "exit4/easy_ppl", "exit2/hard_ppl", "routed/ppl")


def build(
    args: argparse.Namespace, dm: TextDataModule, phase2: dict[str, Any], cls: type[PhasedExitLM] = PhasedExitLM
) -> PhasedExitLM:
    return cls(
        phases=[PHASE1, Phase(**{**OURS, "max_epochs": args.max_epochs, **phase2})],
        vocab_size=dm.vocab_size,
        d_model=64,
        n_heads=4,
        max_seq_len=SEQ_LEN,
        dropout=args.dropout,
        head_sharing="separate",
        lr=1e-3,
        log_prefix="ashem",
    )


def trainer(args: argparse.Namespace, callbacks: list[Callback]) -> L.Trainer:
    return quiet_trainer(accelerator=args.accelerator, devices=1, max_epochs=-1, callbacks=callbacks)


class StopAtPhaseEnd(Callback):
    """Phase 1 alone: when it ends, keep its best weights and stop (``advance_phase`` is not called)."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.history.append({k: float(trainer.callback_metrics[f"val/{k}"]) for k in ("exit2/ppl", "exit2/acc")})


class Phase1Only(PhasedExitLM):
    def advance_phase(self, trainer: L.Trainer, best_weights: Any = None, why: str = "") -> None:
        self.load_state_dict(best_weights)
        self.phase1_why = why
        trainer.should_stop = True


def run_phase1(args: argparse.Namespace, dm: TextDataModule, path: Path) -> dict[str, Any]:
    if path.exists():
        return torch.load(path, weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)
    module = build(args, dm, {}, Phase1Only)
    recorder = StopAtPhaseEnd()
    start = time.perf_counter()
    trainer(args, [recorder]).fit(module, dm)
    best = min(recorder.history, key=lambda h: h["exit2/ppl"])
    state = {
        "weights": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "history": recorder.history,
        "best": best,
        "epochs": len(recorder.history),
        "why": module.phase1_why,
        "time_s": time.perf_counter() - start,
    }
    torch.save(state, path)
    return state


class Phase2Recorder(Callback):
    """Enters phase 2 at the start of training (phase 1's weights are loaded) and records every validation."""

    def __init__(self, threshold: float | None) -> None:
        self.threshold, self.history, self.losses = threshold, [], []
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        pl_module.enter_phase(2, trainer, why="phase 1 ran in its own process")
        pl_module.phase_start_epoch = 0
        if pl_module.routing_threshold is None:  # a plan that does not mine: route with ours' threshold
            pl_module.routing_threshold = self.threshold
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        row = {k: float(m[f"val/{k}"]) for k in RECORDED if f"val/{k}" in m}
        row["train_loss"] = sum(self.losses) / max(len(self.losses), 1)
        row["time_s"] = time.perf_counter() - self.start
        self.losses = []
        self.history.append(row)


def run_variant(
    name: str, args: argparse.Namespace, dm: TextDataModule, phase1: dict[str, Any], threshold: float | None
) -> dict[str, Any]:
    L.seed_everything(args.seed, verbose=False)
    module = build(args, dm, VARIANTS[name])
    module.load_state_dict(phase1["weights"])
    recorder = Phase2Recorder(threshold)
    trainer(args, [recorder]).fit(module, dm)
    hard_frac = None if module.hard_tokens is None else module.hard_tokens.fraction()
    best = min(recorder.history, key=lambda h: h["routed/ppl"])
    return {
        "variant": name,
        "seed": args.seed,
        "plan": module.plan[1].phase.to_dict(),
        "threshold": module.routing_threshold,
        "train_hard_frac": hard_frac,
        "trained_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "epochs": len(recorder.history),
        "history": recorder.history,
        "best": best,
    }


def report(rows: list[dict[str, Any]], phase1: dict[str, Any], args: argparse.Namespace, done: bool) -> None:
    vocab = "the full vocabulary (33,279)" if args.vocab_cap is None else f"the vocabulary capped at {args.vocab_cap}"
    p1 = phase1["best"]
    lines = [
        "# Why ASHEM's phase 2 does not learn (issue 16, part 10)" + ("" if done else " (partial)"),
        f"Word-level WikiText-2, {args.train_samples} training blocks of {SEQ_LEN} tokens, 2,000 calibration and "
        f"2,000 validation blocks, {vocab}, d_model 64, 4 heads, batch {BATCH}, lr 1e-3, dropout {args.dropout}, "
        f"seed {args.seed}. Phase 1 (2 layers, patience 1) ran once: {phase1['epochs']} epochs, best exit-2 PPL "
        f"{p1['exit2/ppl']:.2f} ({p1['exit2/acc']:.2%} accuracy), ended because {phase1['why']}. Each phase 2 starts "
        f"from those weights and runs until patience 3 or {args.max_epochs} epochs.",
        "| phase 2 plan | trained params | epochs | deep PPL, first epoch | deep PPL, best | deep hard PPL, first "
        "| deep hard PPL, best | shallow hard PPL | routed PPL, best | train loss, first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        h = r["history"]
        best_deep = min(x["exit4/ppl"] for x in h)
        best_hard = min(x.get("exit4/hard_ppl", math.nan) for x in h)
        lines.append(
            f"| {r['variant']} | {r['trained_params']:,} | {r['epochs']} | {h[0]['exit4/ppl']:.2f} | {best_deep:.2f} "
            f"| {h[0].get('exit4/hard_ppl', math.nan):.2f} | {best_hard:.2f} "
            f"| {h[0].get('exit2/hard_ppl', math.nan):.2f} "
            f"| {r['best']['routed/ppl']:.2f} | {h[0]['train_loss']:.3f} -> {h[-1]['train_loss']:.3f} |"
        )
    lines.append(
        f"The 2-layer model alone: {p1['exit2/ppl']:.2f}. Every epoch of every plan is in the JSON (`history`)."
    )
    lines.append("## What the numbers show\n\n" + observations(rows, p1["exit2/ppl"]))
    write_results(
        args.name,
        rows,
        "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:-2]) + "\n\n" + "\n\n".join(lines[-2:]),
        extra={
            "complete": done,
            "resumed_from": args.resumed_from,
            "settings": args.settings,
            "phase1": {k: v for k, v in phase1.items() if k != "weights"},
        },
    )


def observations(rows: list[dict[str, Any]], shallow: float) -> str:
    if not rows:
        return "No phase-2 run yet."
    said = []
    for r in rows:
        h = r["history"]
        best = min(x["exit4/ppl"] for x in h)
        gained = h[0]["exit4/ppl"] - best
        routed = r["best"]["routed/ppl"]
        said.append(
            f"- `{r['variant']}`: the deep exit {'improves' if gained > 0.01 else 'does not improve'} after its first "
            f"epoch ({h[0]['exit4/ppl']:.2f} to {best:.2f}); the routed model's best, {routed:.2f}, is "
            f"{'below' if routed < shallow else 'above'} the 2-layer model's {shallow:.2f}."
        )
    return "\n".join(said)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--vocab-cap", type=int, default=None)
    parser.add_argument("--train-samples", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=8, help="phase 2's epoch limit")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--accelerator", default="auto")
    add_resume_arguments(parser, "ashem_phase2")
    args = parser.parse_args()
    dm = TextDataModule(
        path=str(args.data),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        max_train_samples=args.train_samples,
        max_val_samples=2000,
        calibration_samples=2000,
        max_vocab_size=args.vocab_cap,
    )
    dm.setup("fit")
    args.settings = {k: getattr(args, k) for k in ("seed", "vocab_cap", "train_samples", "max_epochs", "dropout")}
    rows, args.resumed_from = resumed_runs(args, "rows", args.settings)
    done = index_runs(rows, lambda r: r["variant"])
    # Phase 1's weights are a cache (26 MB at the full vocabulary), never committed: a resumed run reuses them.
    phase1 = run_phase1(args, dm, CACHE / f"{args.name}_phase1_seed{args.seed}.pt")
    threshold = done["ours"]["threshold"] if "ours" in done else None
    for name in ["ours", *(v for v in args.variants if v != "ours")]:
        if name in done:
            continue
        row = run_variant(name, args, dm, phase1, threshold)
        threshold = threshold if threshold is not None else row["threshold"]
        rows.append(row)
        done[name] = row
        report(rows, phase1, args, done=False)
    report(rows, phase1, args, done=True)
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
