"""ASHEM (SEEDS.md section 2) against the research's figures, its own variant, and the baselines it never ran.

For every seed:

1. **ASHEM as built here** ("ours"): the research's table, each row beside its figure.
2. **The research's variants**: the shared head trained in phase 2, hard tokens as isolated
   states without context, and both (the research's own), so each fix's effect is measured.
3. **Baselines with the same training FLOPs as ours** (phase 1 + calibration + mining +
   phase 2, everything that runs): a 4-layer model trained normally on all data; a 4-layer
   model with exits after layers 2 and 4; deep supervision with an exit after every layer.
   Also the 2-layer model alone (ASHEM's phase 1).
4. **Threshold sweeps**: routed PPL against the FLOPs ratio (everything counted) for ASHEM and
   the multi-exit baselines, written as a curve (``ashem_sweep.png``).

Results are written after every run, so an interrupted benchmark still leaves what it measured.

    python -m benchmarks.ashem                                  # research setup, full vocabulary
    python -m benchmarks.ashem --vocab-cap 8192 --variant-seeds 0   # what fits on 2 CPU cores
    python -m benchmarks.ashem --vocab-cap 8192 --resume            # after an interruption
    # seed 2 in a parallel lane, then its runs merged in:
    python -m benchmarks.ashem --vocab-cap 8192 --seeds 2 --name ashem_seed2
    python -m benchmarks.ashem --vocab-cap 8192 --resume --merge ashem_seed2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

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
    versus,
    write_results,
)
from lego_lightning import ASHEM, Stage, SupervisedExitLM
from lego_lightning.callbacks import PerplexityEarlyStopping
from lego_lightning.data import TextDataModule
from lego_lightning.evaluation import ExitOutputs, collect_exit_outputs, routed_metrics, threshold_sweep
from lego_lightning.model import flops

SEQ_LEN, BATCH = 32, 64

# SEEDS.md section 2 (vocabulary 69,830; one seed).
RESEARCH = {
    "phase1_acc": 0.1630,
    "phase1_ppl": 975.07,
    "phase1_best_epoch": 3,
    "phase1_time_s": 22.4,
    "threshold": 0.1648,
    "calibration_hard_frac": 0.5,
    "calibration_mean_confidence": 0.0764,
    "phase1_hard_ppl": 2599.93,
    "phase2_ppl": 823.89,
    "phase2_hard_ppl": 571.10,
    "phase2_best_epoch": 8,
    "phase2_epochs": 11,
    "phase2_time_s": 74.1,
    "two_stage_acc": 0.1527,
    "two_stage_ppl": 823.89,
    "exit2_frac": 0.72,
    "exit4_frac": 0.28,
    "layers_ratio": 0.6398,
    "phase2_param_frac": 4_600_448 / 9_200_896,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "ours": {},
    "shared_head_trained": {"head_sharing": "shared", "freeze_shallow_exit": False},
    "no_context": {"phase2_context": "none"},
    "research": {"head_sharing": "shared", "freeze_shallow_exit": False, "phase2_context": "none"},
    # A classifier on the hidden state: a token sent deeper skips the shallow head (issue 17's table).
    "learned": {"confidence": "learned"},
}
BASELINES: dict[str, list[Stage]] = {
    "standard_4_layers": [Stage((1, 4))],
    "exits_2_and_4": [Stage((1, 2), 0.5), Stage((3, 4), 0.5)],
    "deep_supervision_4": [Stage((k, k), 0.25) for k in range(1, 5)],
}


class Recorder(ValidationHistory):
    """Validation history, tokens trained per phase, and phase 1's final state when phase 2 begins."""

    def __init__(self, dm: TextDataModule) -> None:
        super().__init__()
        self.dm = dm
        self.tokens = {1: 0, 2: 0}
        self.phase1: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.tokens[getattr(pl_module, "phase", 1)] += batch["input_ids"].numel()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if getattr(pl_module, "phase", 1) == 2 and self.phase1 is None:
            shallow = pl_module.shallow_exit
            self.phase1 = {
                "val": collect_exit_outputs(pl_module, self.dm.val_dataloader(), [shallow]),
                "calibration": collect_exit_outputs(pl_module, self.dm.calibration_dataloader(), [shallow]),
                "threshold": pl_module.routing_threshold,
            }


class RecordedASHEM(ASHEM):
    """ASHEM with the recorder among its callbacks; phase 1's snapshot, at phase 2's first batch, sees the threshold."""

    recorder: Recorder

    def configure_callbacks(self):
        return [*super().configure_callbacks(), self.recorder]


def trainer_for(args: argparse.Namespace, **kwargs: Any) -> L.Trainer:
    return quiet_trainer(accelerator=args.accelerator, devices=1, precision=args.precision, **kwargs)


def sweep_thresholds(outputs: ExitOutputs) -> list[float]:
    """Quantiles of the first exit's confidence, so every curve spans all exit fractions."""
    qs = torch.linspace(0, 1, 21)
    return sorted({0.0, 1.0, *(round(v, 5) for v in torch.quantile(outputs.confidence[0], qs).tolist())})


def run_ashem(variant: str, seed: int, dm: TextDataModule, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    module = RecordedASHEM(
        vocab_size=dm.vocab_size,
        max_seq_len=SEQ_LEN,
        dropout=args.dropout,
        phase1_max_epochs=args.max_epochs,
        phase2_max_epochs=args.max_epochs,
        **VARIANTS[variant],
    )
    module.recorder = recorder = Recorder(dm)
    start = time.perf_counter()
    trainer = trainer_for(args, max_epochs=-1)
    trainer.fit(module, dm)
    wall = time.perf_counter() - start
    cfg, shallow, deep = module.config, module.shallow_exit, module.deep_exit
    final = collect_exit_outputs(module, dm.val_dataloader(), [shallow, deep])
    threshold = module.routing_threshold
    two_stage = routed_metrics(final, threshold, cfg, module.confidence)
    p1 = recorder.phase1
    hard_val = p1["val"].confidence[0] < threshold
    phase1_hist, phase2_hist = recorder.phase(1), recorder.phase(2)
    best1 = min(phase1_hist, key=lambda h: h["ppl"])
    best2 = min(phase2_hist, key=lambda h: h["ppl"])
    context = flops.mean_context(SEQ_LEN)
    frozen_heads = [0] if module.hparams.freeze_shallow_exit else []
    n_train, n_cal = len(dm.splits["train"]) * SEQ_LEN, len(dm.splits["calibration"]) * SEQ_LEN
    budget = (
        recorder.tokens[1] * flops.training_flops_per_token(cfg, [1.0, 0.0], context).total
        + (n_train + n_cal) * flops.inference_flops_per_token(cfg, shallow, context, module.confidence).total
        + recorder.tokens[2]
        * flops.training_flops_per_token(
            cfg, [0.0, 1.0], context, frozen_layers=shallow, frozen_heads=frozen_heads
        ).total
    )
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {
        "kind": "ashem",
        "variant": variant,
        "seed": seed,
        "wall_s": wall,
        "phase1_ppl": best1["ppl"],
        "phase1_acc": best1["acc"],
        "phase1_best_epoch": best1["epoch"] + 1,
        "phase1_time_s": phase1_hist[-1]["time_s"],
        "threshold": threshold,
        "calibration_hard_frac": (p1["calibration"].confidence[0] < threshold).float().mean().item(),
        "calibration_mean_confidence": p1["calibration"].confidence[0].mean().item(),
        "train_hard_frac": module.hard_tokens.fraction(),
        "phase1_hard_ppl": p1["val"].exit_ppl(shallow, hard_val),
        "phase1_easy_ppl": p1["val"].exit_ppl(shallow, ~hard_val),
        "phase1_bpb": p1["val"].exit_bpb(shallow),
        "phase2_ppl": best2["ppl"],
        "phase2_best_epoch": best2["epoch"] - phase1_hist[-1]["epoch"],
        "phase2_epochs": len(phase2_hist),
        "phase2_time_s": phase2_hist[-1]["time_s"] - phase1_hist[-1]["time_s"],
        "phase2_hard_ppl": final.exit_ppl(deep, hard_val),
        "shallow_ppl_after": final.exit_ppl(shallow),
        "shallow_drift": final.exit_ppl(shallow) / p1["val"].exit_ppl(shallow) - 1,
        "deep_ppl": final.exit_ppl(deep),
        "deep_bpb": final.exit_bpb(deep),
        "two_stage_ppl": two_stage["ppl"],
        "two_stage_bpb": two_stage["bpb"],
        "two_stage_acc": two_stage["acc"],
        "exit2_frac": two_stage["fractions"][shallow],
        "exit4_frac": two_stage["fractions"][deep],
        "flops_ratio": two_stage["flops_ratio"],
        "layers_ratio": two_stage["layers_ratio"],
        "phase2_param_frac": trained / total,
        "phase2_params": trained,
        "params": total,
        "training_flops": budget,
        "tokens_phase1": recorder.tokens[1],
        "tokens_phase2": recorder.tokens[2],
        "two_layer_flops_ratio": flops.single_exit_flops(cfg, shallow, context).total
        / flops.full_flops(cfg, context).total,
        "sweep": threshold_sweep(final, cfg, sweep_thresholds(final), module.confidence),
    }


def run_baseline(name: str, seed: int, budget: float, dm: TextDataModule, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    stages = BASELINES[name]
    module = SupervisedExitLM(
        vocab_size=dm.vocab_size,
        n_layers=4,
        d_model=64,
        n_heads=4,
        max_seq_len=SEQ_LEN,
        dropout=args.dropout,
        stages=stages,
    )
    per_token = flops.training_flops_per_token(
        module.config, [s.loss_weight for s in stages], flops.mean_context(SEQ_LEN)
    )
    steps = max(1, int(budget / (per_token.total * BATCH * SEQ_LEN)))
    keep_best = PerplexityEarlyStopping(patience=10**9, restore_best_weights=True)  # validated every epoch
    start = time.perf_counter()
    trainer_for(args, max_steps=steps, max_epochs=-1, callbacks=[keep_best]).fit(module, dm)
    wall = time.perf_counter() - start
    final_outputs = collect_exit_outputs(module, dm.val_dataloader())
    if keep_best.best_weights is not None:
        best = {k: v.to(module.device) for k, v in keep_best.best_weights.items()}
        last = final_outputs.exit_ppl(module.config.exit_layers[-1])
        module.load_state_dict(best)
        best_outputs = collect_exit_outputs(module, dm.val_dataloader())
        if best_outputs.exit_ppl(module.config.exit_layers[-1]) < last:
            final_outputs = best_outputs
    deepest = module.config.exit_layers[-1]
    row = {
        "kind": "baseline",
        "variant": name,
        "seed": seed,
        "wall_s": wall,
        "steps": steps,
        "training_flops": steps * BATCH * SEQ_LEN * per_token.total,
        "deep_ppl": final_outputs.exit_ppl(deepest),
        "deep_bpb": final_outputs.exit_bpb(deepest),
        "deep_acc": final_outputs.exit_acc(deepest),
    }
    if len(stages) > 1:
        row["sweep"] = threshold_sweep(final_outputs, module.config, sweep_thresholds(final_outputs))
    return row


# ------------------------------------------------------------------------------------------ report
def _agg(rows: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    values = [r[key] for r in rows if key in r and r[key] is not None and not math.isnan(r[key])]
    return summary(values) if values else None


def _cell(s: dict[str, Any] | None, digits: int = 2, pct: bool = False) -> str:
    if s is None:
        return "n/a"
    if pct:
        s = {**s, "mean": 100 * s["mean"], "std": 100 * s["std"], "values": [100 * v for v in s["values"]]}
        return fmt(s, digits) + "%"
    return fmt(s, digits)


def research_table(ours: list[dict[str, Any]]) -> str:
    rows = [
        ("Phase 1 best val acc", "phase1_acc", True, 2),
        ("Phase 1 best val PPL", "phase1_ppl", False, 1),
        ("Phase 1 best epoch", "phase1_best_epoch", False, 1),
        ("Phase 1 time (s)", "phase1_time_s", False, 0),
        ("threshold at ratio 0.5", "threshold", False, 4),
        ("fraction of calibration tokens below it", "calibration_hard_frac", True, 2),
        ("mean shallow confidence (calibration)", "calibration_mean_confidence", False, 4),
        ("fraction of training tokens mined (the threshold on data phase 1 trained on)", "train_hard_frac", True, 2),
        ("Phase 1 PPL on hard tokens", "phase1_hard_ppl", False, 1),
        ("Phase 2 best val PPL (two-stage)", "phase2_ppl", False, 1),
        ("Phase 2 PPL on hard tokens (deep exit)", "phase2_hard_ppl", False, 1),
        ("Phase 2 best epoch", "phase2_best_epoch", False, 1),
        ("Phase 2 epochs run", "phase2_epochs", False, 1),
        ("Phase 2 time (s)", "phase2_time_s", False, 0),
        ("two-stage accuracy", "two_stage_acc", True, 2),
        ("two-stage PPL", "two_stage_ppl", False, 1),
        ("tokens leaving at layer 2", "exit2_frac", True, 1),
        ("tokens leaving at layer 4", "exit4_frac", True, 1),
        ("compute, layers only (the research's measure)", "layers_ratio", True, 1),
        ("compute, FLOPs of everything that runs", "flops_ratio", True, 1),
        ("parameters trained in phase 2", "phase2_param_frac", True, 1),
    ]
    lines = ["| row | research | ours (mean ± std over seeds) |", "|---|---|---|"]
    for label, key, pct, digits in rows:
        research = RESEARCH.get(key)
        r = "n/a" if research is None else (f"{100 * research:.2f}%" if pct else f"{research:g}")
        lines.append(f"| {label} | {r} | {_cell(_agg(ours, key), digits, pct)} |")
    return "\n".join(lines)


def comparison_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | seeds | PPL at full compute | routed (two-stage) PPL | routed FLOPs ratio | layers-only ratio "
        "| training FLOPs (1e12) | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = [r for r in rows if r["variant"] == "ours"]
    if ours:
        two = {"values": [r["phase1_ppl"] for r in ours]}
        lines.append(
            f"| 2 layers alone (ASHEM phase 1) | {len(ours)} | {_cell(summary(two['values']))} | n/a | "
            f"{_cell(_agg(ours, 'two_layer_flops_ratio'), 3)} | 0.500 | n/a | n/a |"
        )
    for variant in [*VARIANTS, *BASELINES]:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        label = f"ASHEM, {variant}" if variant in VARIANTS else f"{variant} (same training FLOPs as ours)"
        flops_cell = _cell(_agg([{"f": r["training_flops"] / 1e12} for r in mine if "training_flops" in r], "f"), 2)
        lines.append(
            f"| {label} | {len(mine)} | {_cell(_agg(mine, 'deep_ppl'))} | {_cell(_agg(mine, 'two_stage_ppl'))} "
            f"| {_cell(_agg(mine, 'flops_ratio'), 3)} | {_cell(_agg(mine, 'layers_ratio'), 3)} "
            f"| {flops_cell if variant in ('ours', *BASELINES) else 'n/a'} | {_cell(_agg(mine, 'wall_s'), 0)} |"
        )
    return "\n".join(lines)


def phase2_gains(rows: list[dict[str, Any]]) -> list[float]:
    """Two-stage PPL minus the same run's phase-1 PPL (negative: phase 2 helped).

    A variant with another head layout (shared instead of separate) initialises differently, so
    the same seed gives it another phase 1; this paired difference is what phase 2 itself changed.
    """
    return [r["two_stage_ppl"] - r["phase1_ppl"] for r in rows]


def variant_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| variant | seeds | phase 1 PPL | two-stage PPL | phase 2's change (two-stage minus the same run's phase 1) "
        "| two-stage acc | deep exit PPL on hard tokens | shallow exit PPL change in phase 2 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            lines.append(
                f"| {variant} | {len(mine)} | {_cell(_agg(mine, 'phase1_ppl'))} | {_cell(_agg(mine, 'two_stage_ppl'))} "
                f"| {_cell(summary(phase2_gains(mine)))} | {_cell(_agg(mine, 'two_stage_acc'), 2, True)} "
                f"| {_cell(_agg(mine, 'phase2_hard_ppl'))} | {_cell(_agg(mine, 'shallow_drift'), 2, True)} |"
            )
    return "\n".join(lines)


def best_ppl_at_ratio(sweep: list[dict[str, Any]], ratio: float) -> float | None:
    """Lowest routed PPL among thresholds whose FLOPs ratio is at most ``ratio``."""
    ok = [p["ppl"] for p in sweep if p["flops_ratio"] <= ratio + 1e-9]
    return min(ok) if ok else None


def observations(rows: list[dict[str, Any]]) -> str:
    out = []
    if len({r["seed"] for r in rows}) == 1:
        out.append("- One seed: differences of about a PPL point between rows are not established.")
    else:
        out.append(
            "- A difference counts only when it is larger than both rows' standard deviations added "
            "(the rule of the other studies); otherwise it is within the seed spread."
        )
    ours = [r for r in rows if r["variant"] == "ours"]
    if ours:
        two_stage = [r["two_stage_ppl"] for r in ours]
        o = statistics.fmean(two_stage)
        out.append(
            f"- ASHEM's routed model costs {_agg(ours, 'flops_ratio')['mean']:.1%} of the 4-layer model's FLOPs when "
            f"heads and confidence count; the layers-only measure says {_agg(ours, 'layers_ratio')['mean']:.1%}."
        )
        gains = phase2_gains(ours)  # phase 1 and the two-stage model come from the same run: compare per seed
        p1 = _agg(ours, "phase1_ppl")["mean"]
        out.append(
            f"- Phase 2 improves on phase 1 in {sum(g < 0 for g in gains)} of {len(gains)} seeds: two-stage PPL "
            f"{o:.1f} against {p1:.1f} for the 2-layer model alone (two-stage minus phase 1 per seed "
            f"{', '.join(f'{g:+.2f}' for g in gains)}; the 2-layer model costs "
            f"{_agg(ours, 'two_layer_flops_ratio')['mean']:.0%} of the 4-layer model's FLOPs). On the hard tokens the "
            f"deep exit scores {_agg(ours, 'phase2_hard_ppl')['mean']:.1f} against the shallow exit's "
            f"{_agg(ours, 'phase1_hard_ppl')['mean']:.1f}."
        )
        for name, label in (
            ("standard_4_layers", "a 4-layer model trained normally on all tokens (run at full depth, ratio 1.0)"),
            ("exits_2_and_4", "the 4-layer model with exits after layers 2 and 4, at full depth"),
            ("deep_supervision_4", "deep supervision with an exit after every layer, at full depth"),
        ):
            base = [r["deep_ppl"] for r in rows if r["variant"] == name]
            if base:
                diff, told_apart = differ(two_stage, base)
                if min(len(two_stage), len(base)) == 1:
                    verdict = "is below" if diff < 0 else "is above"  # one seed: a direction, not a result
                else:
                    verdict = ("beats" if diff < 0 else "is worse than") if told_apart else "cannot be told from"
                out.append(
                    f"- At the same training FLOPs, ASHEM's two-stage PPL {o:.1f} {verdict} that of {label}: "
                    f"{statistics.fmean(base):.1f} ({versus(two_stage, base)})."
                )
        base4 = [r["deep_ppl"] for r in rows if r["variant"] == "standard_4_layers"]
        if base4:
            phase1 = [r["phase1_ppl"] for r in ours]
            diff, told_apart = differ(phase1, base4)
            out.append(
                f"- The 2-layer model alone (ASHEM's phase 1, {_agg(ours, 'two_layer_flops_ratio')['mean']:.0%} of the "
                f"4-layer model's FLOPs) scores {p1:.1f} against the normally trained 4-layer model's "
                f"{statistics.fmean(base4):.1f} ({versus(phase1, base4)})"
                + (
                    ": at this data size the two extra layers do not pay, and whatever ASHEM gains over the "
                    "4-layer model, its phase 1 already had."
                    if not (told_apart and diff > 0)
                    else "."
                )
            )
        for variant in ("research", "shared_head_trained", "no_context"):
            theirs = [r for r in rows if r["variant"] == variant]
            if theirs:
                out.append(
                    f"- The {variant} variant reaches two-stage PPL {_agg(theirs, 'two_stage_ppl')['mean']:.1f} "
                    f"against ours {o:.1f} ({versus([r['two_stage_ppl'] for r in theirs], two_stage)}), from a phase 1 "
                    f"at {_agg(theirs, 'phase1_ppl')['mean']:.1f} (ours {p1:.1f}). What phase 2 itself changed: "
                    f"{statistics.fmean(phase2_gains(theirs)):+.2f} against ours {statistics.fmean(gains):+.2f} "
                    f"({versus(phase2_gains(theirs), gains, 2)}). Its shallow exit changes by "
                    f"{_agg(theirs, 'shallow_drift')['mean']:+.2%} in phase 2 (ours: "
                    f"{_agg(ours, 'shallow_drift')['mean']:+.2%})."
                )
    for name in ("exits_2_and_4", "deep_supervision_4"):
        base = [r for r in rows if r["variant"] == name]
        if base and ours:
            for ratio in (0.9, 1.0):
                theirs = [best_ppl_at_ratio(r["sweep"], ratio) for r in base]
                mine = [best_ppl_at_ratio(r["sweep"], ratio) for r in ours]
                if all(v is not None for v in theirs + mine):
                    out.append(
                        f"- Best routed PPL at FLOPs ratio <= {ratio}: ASHEM {statistics.fmean(mine):.1f}, "
                        f"{name} {statistics.fmean(theirs):.1f} ({versus(mine, theirs)})."
                    )
    return "\n".join(out)


def word_level_bits(args: argparse.Namespace) -> dict[str, float]:
    """The word-level (capped) validation blocks' targets, the bytes they cover and their ``<unk>`` share.

    Perplexity is the exponential of the mean loss over every target, so the stored word-level
    perplexities give bits per byte exactly: ``ln(ppl) * targets / ln(2) / bytes``.
    """
    dm = TextDataModule(
        path=str(args.data), seq_len=SEQ_LEN, max_val_samples=2000, max_vocab_size=args.vocab_cap, max_train_samples=1
    )
    dm.setup("validate")
    blocks = dm.splits["validation"]
    targets = blocks.targets
    covered = sum(int(blocks[i]["target_bytes"]) for i in range(len(blocks)))
    unk = dm.vocab.index["<unk>"]
    return {"targets": targets.numel(), "bytes": covered, "unk_frac": (targets == unk).float().mean().item()}


def ppl_to_bpb(ppl: float, word: dict[str, float]) -> float:
    return math.log(ppl) * word["targets"] / math.log(2) / word["bytes"]


def tokenizer_table(rows: list[dict[str, Any]], words: list[dict[str, Any]], word: dict[str, float], args) -> str:
    """This run's models beside the word-level runs at the same vocabulary size, in bits per byte and PPL."""
    by = {v: [r for r in rows if r["variant"] == v] for v in ("ours", "learned", "standard_4_layers")}
    wby = {v: [r for r in words if r["variant"] == v] for v in ("ours", "standard_4_layers")}
    lines = [
        "| model | tokens | seeds | bits per byte | PPL per token | routed FLOPs ratio | exit 2 share |",
        "|---|---|---|---|---|---|---|",
    ]

    def add(label: str, tokens: str, mine: list[dict[str, Any]], bpb: list[float], ppl: str, ratio: str = "n/a"):
        if mine:
            share = _cell(_agg(mine, "exit2_frac"), 1, True) if "exit2_frac" in mine[0] and ratio != "n/a" else "n/a"
            lines.append(f"| {label} | {tokens} | {len(mine)} | {_cell(summary(bpb), 3)} | {ppl} | {ratio} | {share} |")

    tok = f"{args.tokenizer} {args.vocab_cap or 8192}"
    for label, key_ppl, key_bpb, variant, routed in (
        ("2 layers alone (ASHEM phase 1)", "phase1_ppl", "phase1_bpb", "ours", False),
        ("ASHEM routed, max-prob confidence", "two_stage_ppl", "two_stage_bpb", "ours", True),
        ("ASHEM routed, learned confidence", "two_stage_ppl", "two_stage_bpb", "learned", True),
        ("ASHEM's 4 layers at full compute (max-prob run)", "deep_ppl", "deep_bpb", "ours", False),
        ("4 layers, standard, same training FLOPs", "deep_ppl", "deep_bpb", "standard_4_layers", False),
    ):
        mine = by[variant]
        add(
            label,
            tok,
            mine,
            [r[key_bpb] for r in mine],
            _cell(_agg(mine, key_ppl)),
            _cell(_agg(mine, "flops_ratio"), 3) if routed else "n/a",
        )
        theirs = wby.get(variant, [])
        if theirs:
            add(
                label,
                f"words, capped at {args.vocab_cap}",
                theirs,
                [ppl_to_bpb(r[key_ppl], word) for r in theirs],
                _cell(_agg(theirs, key_ppl)),
                _cell(_agg(theirs, "flops_ratio"), 3) if routed else "n/a",
            )
    return "\n".join(lines)


def tokenizer_observations(rows: list[dict[str, Any]], word: dict[str, float], vocab: int) -> str:
    ours = [r for r in rows if r["variant"] == "ours"]
    learned = [r for r in rows if r["variant"] == "learned"]
    base = [r for r in rows if r["variant"] == "standard_4_layers"]
    out = [
        f"- The word-level bits per byte come from the stored perplexities over the same 2,000 validation blocks "
        f"({word['targets']:,} targets covering {word['bytes']:,} bytes); {word['unk_frac']:.1%} of those targets "
        "are `<unk>` at the capped vocabulary, and predicting `<unk>` costs none of the bits its word's spelling "
        "would, so the word level's bits per byte flatter it. The byte-level BPE has no `<unk>`: every "
        "byte is paid for.",
        "- The BPE validation blocks are the first 2,000 blocks of 32 BPE tokens, a shorter stretch of the same "
        "validation text than the word level's first 2,000 blocks of 32 words.",
    ]
    if ours and base:
        two = [r["two_stage_bpb"] for r in ours]
        four = [r["deep_bpb"] for r in base]
        out.append(
            f"- At the same training FLOPs, ASHEM's routed model scores {statistics.fmean(two):.3f} bits per byte "
            f"against the standard 4-layer model's {statistics.fmean(four):.3f} ({versus(two, four, 3)}), at "
            f"{_agg(ours, 'flops_ratio')['mean']:.1%} of its inference FLOPs with max-prob confidence."
        )
        p1 = [r["phase1_bpb"] for r in ours]
        out.append(
            f"- The 2-layer model alone (ASHEM's phase 1) scores {statistics.fmean(p1):.3f} against ASHEM's routed "
            f"{statistics.fmean(two):.3f} ({versus(two, p1, 3)}) and the 4-layer model's {statistics.fmean(four):.3f} "
            f"({versus(p1, four, 3)})."
        )
    if ours and learned:
        out.append(
            f"- Routed FLOPs ratio with max-prob confidence {_agg(ours, 'flops_ratio')['mean']:.3f}, with the learned "
            f"classifier {_agg(learned, 'flops_ratio')['mean']:.3f}: max-prob computes the shallow exit's "
            f"{vocab:,}-way head for every token, also those sent deeper; the classifier reads the hidden "
            "state, so a token pays one head. The learned run's routed bits per byte: "
            f"{_agg(learned, 'two_stage_bpb')['mean']:.3f} (max-prob run {_agg(ours, 'two_stage_bpb')['mean']:.3f})."
        )
    return "\n".join(out)


def tokenizer_section(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """This run beside the word-level runs of ``ashem.json`` at the same vocabulary size."""
    stored = RESULTS / "ashem.json"
    words = json.loads(stored.read_text())["rows"] if stored.exists() else []
    if words and json.loads(stored.read_text())["settings"].get("vocab_cap") != args.vocab_cap:
        words = []  # another vocabulary size: not the comparison this table makes
    word = word_level_bits(args)
    return (
        f"## {args.tokenizer} {args.vocab_cap or 8192} beside the word level at the same vocabulary size\n\n"
        "Word-level rows: `ashem.md`'s runs (vocabulary capped at the same size). Bits per byte compare across "
        "tokenizers; perplexity per token does not.\n\n"
        + tokenizer_table(rows, words, word, args)
        + "\n\n"
        + tokenizer_observations(rows, word, args.vocab_cap or 8192)
    )


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    """Seed 0's sweeps of ASHEM and the multi-exit baselines, and each 4-layer baseline's single point."""
    try:
        from lego_lightning import viz

        first = min(r["seed"] for r in rows)
        curves = {r["variant"]: r["sweep"] for r in rows if r["seed"] == first and "sweep" in r}
        points = {
            f"standard_4_layers, seed {r['seed']}": (1.0, r["deep_ppl"])
            for r in rows
            if r["variant"] == "standard_4_layers"
        }
        viz.save(viz.sweep_curve(curves, points, title=f"Threshold sweeps, WikiText-2 valid (seed {first})"), path)
    except ImportError:
        return False
    return True


def text_of(args: argparse.Namespace) -> str:
    return "Word-level WikiText-2" if args.tokenizer is None else f"WikiText-2 in {args.tokenizer} tokens"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, done: bool) -> None:
    ours = [r for r in rows if r["variant"] == "ours"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    has_plot = plot(rows, RESULTS / f"{args.name}_sweep.png")
    vocab = "the full vocabulary (33,279)" if args.vocab_cap is None else f"the vocabulary capped at {args.vocab_cap}"
    if args.tokenizer is not None:
        vocab = f"a {args.tokenizer} vocabulary of {args.vocab_cap or 8192} trained on the training split"
    markdown = "\n\n".join(
        [
            "# ASHEM (SEEDS.md section 2): the research's table, its variant, and baselines"
            + ("" if done else " (partial)"),
            f"{text_of(args)}, {args.train_samples} training blocks of {SEQ_LEN} tokens, 2,000 held-out "
            f"calibration blocks, 2,000 validation blocks, {vocab}, d_model 64, 4 heads, batch {BATCH}, lr 1e-3 "
            f"(phase 2 0.1x), dropout {args.dropout}, at most {args.max_epochs} epochs per phase, patience 1 and 3. "
            "The research used a 69,830-word vocabulary and one seed, so absolute perplexities differ; compare "
            "directions and ratios.",
            *([tokenizer_section(rows, args)] if args.tokenizer is not None else []),
            "## The research's table\n\n" + research_table(ours),
            "## ASHEM against baselines at the same training FLOPs\n\n" + comparison_table(rows),
            "## What each fix changes (the research's variants)\n\n" + variant_table(rows),
            "## Threshold sweeps\n\n"
            + (f"![sweep]({args.name}_sweep.png)\n\n" if has_plot else "(matplotlib missing: no image)\n\n")
            + "Every point of every curve is in the JSON (`sweep`).",
            "## What holds and what does not\n\n" + observations(rows),
        ]
    )
    write_results(
        args.name,
        [{k: v for k, v in r.items()} for r in rows],
        markdown,
        extra={"complete": done, "resumed_from": args.resumed_from, "settings": args.settings},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variant-seeds", type=int, nargs="*", default=None, help="seeds for the non-ours variants")
    parser.add_argument(
        "--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), help="ours also runs for a baseline"
    )
    parser.add_argument(
        "--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES), help="at ours' training FLOPs"
    )
    parser.add_argument("--vocab-cap", type=int, default=None)
    parser.add_argument(
        "--tokenizer", default=None, help="TextDataModule's tokenizer (bpe, unigram, ...); the default is words"
    )
    parser.add_argument("--train-samples", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    add_resume_arguments(parser, "ashem")
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")

    dm = TextDataModule(
        path=str(args.data),
        seq_len=SEQ_LEN,
        batch_size=BATCH,
        max_train_samples=args.train_samples,
        max_val_samples=2000,
        calibration_samples=2000,
        max_vocab_size=args.vocab_cap,
        tokenizer=args.tokenizer,
    )
    dm.setup("fit")
    variant_seeds = args.seeds if args.variant_seeds is None else args.variant_seeds
    args.settings = {k: getattr(args, k) for k in ("vocab_cap", "train_samples", "max_epochs", "dropout", "precision")}
    if args.tokenizer is not None:  # word-level results stored before this option resume as before
        args.settings["tokenizer"] = args.tokenizer
    rows, args.resumed_from = resumed_runs(args, "rows", args.settings)
    run_at = index_runs(rows, lambda r: (r["variant"], r["seed"]))

    def keep(row: dict[str, Any]) -> dict[str, Any]:
        rows.append(row)
        run_at[row["variant"], row["seed"]] = row  # only keys not yet measured are run
        report(rows, args, done=False)
        return row

    for seed in args.seeds:
        # The baselines' training FLOPs are ours, so ours runs when they need it even if not listed.
        ours = run_at.get(("ours", seed))
        if ours is None and ("ours" in args.variants or args.baselines):
            ours = keep(run_ashem("ours", seed, dm, args))
        for name in args.baselines:
            if (name, seed) not in run_at:
                keep(run_baseline(name, seed, ours["training_flops"], dm, args))
        for variant in args.variants:
            if variant != "ours" and seed in variant_seeds and (variant, seed) not in run_at:
                keep(run_ashem(variant, seed, dm, args))
    report(rows, args, done=True)
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
