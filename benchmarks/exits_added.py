"""Exits added to a trained model afterwards (EE-Tuning) against exits trained with it from the start (issue 18).

Per seed, on WikiText-2 in a byte-level BPE of 8,192 tokens (``configs/data/wikitext2_bpe8k.yaml``:
10,000 training and 2,000 validation blocks of 32 tokens, batch 64), d_model 64, 4 heads:

1. ``standard``: ``configs/bpe/standard.yaml`` at 4 layers, one exit, trained until validation
   perplexity stops improving (patience 1), then its best checkpoint
2. exported with ``save_pretrained`` (GPT-2's Hugging Face format) with the tokenizer it was
   trained with, and
3. ``exit_tuned``: ``configs/pretrained/exit_tuning.yaml`` on that export, with exits after layers
   1, 2 and 3, each starting as a copy of the final norm and head, the trunk frozen (the final
   exit stays the standard model's), until the exits' summed validation loss (``val/loss``) stops
   improving (patience 1); lr 1e-3, the standard model's (the config's 1e-4 is for GPT-2's size).
4. ``deep_supervision``: ``configs/bpe/deep_supervision.yaml`` at 4 layers from scratch, an exit
   after every layer with loss weight 0.25, one shared head, patience 1.

For 3 and 4: every exit's validation perplexity and bits per byte, and routed perplexity against
FLOPs with two confidences: a learned exit classifier (CALM's consistency target, one pass over
the training blocks with the model frozen) and max-prob. Thresholds are quantiles of the first
exit's confidence; FLOPs count everything that runs (layers, attention, every head a token
passes, the confidence) relative to the full 4-layer model.

    python -m benchmarks.exits_added --seeds 0 1 2     # about 30 minutes a seed on 2 CPU cores
    python -m benchmarks.exits_added --seeds 0 --max-epochs 1 --train-samples 500 --name exits_added_quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_DATA,
    REPO,
    RESULTS,
    add_resume_arguments,
    config_cli,
    differ,
    grouped_verdict,
    index_runs,
    resumed_runs,
    summary,
    versus,
    write_results,
)
from lego_lightning.evaluation import ExitOutputs, collect_exit_outputs, threshold_sweep
from lego_lightning.model.exit_classifier import ExitClassifier, train_exit_classifier

LAYERS = 4
BPE_DATA = REPO / "configs" / "data" / "wikitext2_bpe8k.yaml"
EXIT_TUNING_STAGES = (
    "[{layers: [1, 1]}, {layers: [2, 2]}, {layers: [3, 3]}, {layers: [4, 4], loss_weight: 0.0, trainable: false}]"
)
DEEP_SUPERVISION_STAGES = "[{layers: [1, 1], loss_weight: 0.25}, {layers: [2, 2], loss_weight: 0.25}, {layers: [3, 3], loss_weight: 0.25}, {layers: [4, 4], loss_weight: 0.25}]"  # noqa: E501
# FLOPs ratios at which the best routed PPL is reported: at 8,192 tokens and d_model 64 the head is
# most of the model's compute, so sending every token out at the first exit costs over 0.8 of it.
BUDGETS = (0.85, 0.9, 0.95, 1.0)
MODELS = ("exit_tuned", "deep_supervision")  # the two ways to get exits, compared


def fit(config: str, seed: int, work: str, args: argparse.Namespace, *overrides: str) -> tuple[Any, dict[str, Any]]:
    """``config`` fitted through the ``lego`` CLI classes, then set back to its best checkpoint."""
    data = ("--data.max_train_samples", str(args.train_samples), "--trainer.max_epochs", str(args.max_epochs))
    cli = config_cli(config, args.data, seed, work, *overrides, *data)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    wall = time.perf_counter() - start
    best = cli.trainer.checkpoint_callback.best_model_path
    cli.model.load_state_dict(torch.load(best, weights_only=True)["state_dict"])
    return cli, {"wall_s": wall, "epochs": cli.trainer.current_epoch, "steps": cli.trainer.global_step}


def exits_of(outputs: ExitOutputs) -> dict[str, dict[str, float | None]]:
    return {str(k): {"ppl": outputs.exit_ppl(k), "bpb": outputs.exit_bpb(k)} for k in outputs.exit_layers}


def curves(cli: Any) -> dict[str, Any]:
    """Routed PPL against FLOPs with max-prob and with a learned classifier fitted on the frozen model,
    and the classifier's training statistics."""
    module, dm = cli.model, cli.datamodule
    exits = module.config.exit_layers
    out = {"max_prob": collect_exit_outputs(module, dm.val_dataloader(), confidence="max_prob")}
    classifier = ExitClassifier(module.config.d_model, exits[:-1])
    batches = [(b["input_ids"], b["targets"]) for b in dm.train_dataloader()]
    stats = train_exit_classifier(module.model, classifier, batches, target="consistency")
    module.exit_classifier, module.confidence = classifier.requires_grad_(False), "learned"
    out["learned"] = collect_exit_outputs(module, dm.val_dataloader())
    sweeps: dict[str, Any] = {}
    for name, outputs in out.items():
        qs = torch.quantile(outputs.confidence[0].float(), torch.linspace(0, 1, 41)).tolist()
        thresholds = sorted({0.0, 1.0, *(round(q, 6) for q in qs)})
        sweeps[name] = threshold_sweep(outputs, module.config, thresholds, name)
    sweeps["classifier"] = {str(k): v for k, v in stats.items()}
    return sweeps


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        standard, standard_run = fit(
            "bpe/standard",
            seed,
            f"{work}/standard",
            args,
            "--model.n_layers",
            str(LAYERS),
            "--model.stages",
            f"[{{layers: [1, {LAYERS}]}}]",
        )
        export = Path(work) / "export"
        standard.model.model.save_pretrained(export)
        standard.datamodule.text_tokenizer.save(export)
        standard_out = collect_exit_outputs(standard.model, standard.datamodule.val_dataloader())
        tuned, tuned_run = fit(
            "pretrained/exit_tuning",
            seed,
            f"{work}/exit_tuned",
            args,
            "--model.pretrained",
            str(export),
            "--data",
            str(BPE_DATA),
            "--data.path",
            str(args.data),
            "--data.tokenizer",
            str(export),
            "--data.max_vocab_size",
            "null",
            "--model.exits",  # the config places its exits by rule; this study names every layer's
            "null",
            "--model.stages",
            EXIT_TUNING_STAGES,
            "--model.lr",
            "1e-3",
        )
        # The export's tokenizer reads the same validation blocks the standard model was scored on.
        first = next(iter(tuned.datamodule.val_dataloader()))["input_ids"]
        assert torch.equal(first, next(iter(standard.datamodule.val_dataloader()))["input_ids"])
        tuned_out = collect_exit_outputs(tuned.model, tuned.datamodule.val_dataloader(), confidence="max_prob")
        deep, deep_run = fit(
            "bpe/deep_supervision",
            seed,
            f"{work}/deep_supervision",
            args,
            "--model.n_layers",
            str(LAYERS),
            "--model.stages",
            DEEP_SUPERVISION_STAGES,
        )
        deep_out = collect_exit_outputs(deep.model, deep.datamodule.val_dataloader(), confidence="max_prob")
        before = standard.model.model.state_dict()  # one head, heads.0: the tuned model's last (heads.3)
        final = f"heads.{LAYERS - 1}."
        trunk_kept = all(
            torch.equal(v, before[k.replace(final, "heads.0.")])
            for k, v in tuned.model.model.state_dict().items()
            if not k.startswith("heads.") or k.startswith(final)
        )
        return {
            "seed": seed,
            "standard": {**standard_run, "exits": exits_of(standard_out)},
            "exit_tuned": {**tuned_run, "exits": exits_of(tuned_out), "trunk_unchanged": trunk_kept, **curves(tuned)},
            "deep_supervision": {**deep_run, "exits": exits_of(deep_out), **curves(deep)},
        }


# ------------------------------------------------------------------------------------------ report
def best_ppl_at(sweep: list[dict[str, Any]], budget: float) -> float | None:
    within = [p["ppl"] for p in sweep if p["flops_ratio"] <= budget + 1e-9]
    return min(within) if within else None


def cell(values: list[float | None], digits: int = 2) -> str:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return "n/a"
    s = summary(kept)
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if len(kept) > 1 else f"{kept[0]:.{digits}f}"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    seeds = [r["seed"] for r in rows]
    floor = min(p["flops_ratio"] for p in rows[0]["exit_tuned"]["learned"])
    lines = [
        "# Exits added to a trained model (EE-Tuning) against exits trained from the start",
        "",
        f"WikiText-2 in a byte-level BPE of 8,192 tokens, {args.train_samples} training blocks of 32 tokens, "
        f"2,000 validation blocks, d_model 64, 4 heads, 4 layers, at most {args.max_epochs} epochs per training, "
        f"seeds {seeds}. The standard model (`configs/bpe/standard.yaml` at 4 layers) is exported with "
        "`save_pretrained` and its exits after layers 1-3 are trained with `configs/pretrained/exit_tuning.yaml` "
        "(trunk frozen, each exit a copy of the final norm and head, lr 1e-3); deep supervision "
        "(`configs/bpe/deep_supervision.yaml` at 4 layers, weights 0.25, one shared head) trains from scratch.",
        "",
        "## Each exit's validation perplexity (bits per byte)",
        "",
        "| exit after layer | exits added afterwards | deep supervision from scratch | added / from scratch |",
        "|---|---|---|---|",
    ]
    for k in range(1, LAYERS + 1):
        tuned = [r["exit_tuned"]["exits"][str(k)]["ppl"] for r in rows]
        deep = [r["deep_supervision"]["exits"][str(k)]["ppl"] for r in rows]
        tuned_bpb = [r["exit_tuned"]["exits"][str(k)]["bpb"] for r in rows]
        deep_bpb = [r["deep_supervision"]["exits"][str(k)]["bpb"] for r in rows]
        ratio = [a / b for a, b in zip(tuned, deep)]
        label = f"{k} (the standard model's own)" if k == LAYERS else str(k)
        lines.append(
            f"| {label} | {cell(tuned)} ({cell(tuned_bpb, 3)}) | {cell(deep)} ({cell(deep_bpb, 3)}) | "
            f"{cell(ratio, 3)} |"
        )
    lines += [
        "",
        "## Best routed perplexity within a FLOPs budget",
        "",
        "FLOPs relative to the full 4-layer model, counting every head a token passes and the confidence. "
        f"Sending every token out at the first exit costs {floor:.3f} of the full model (its layer, its "
        "8,192-way head, the confidence, and the keys and values the layers above still need), so no routing "
        "goes below that.",
        "",
        "| FLOPs ratio <= | added, learned | added, max-prob | deep supervision, learned "
        "| deep supervision, max-prob |",
        "|---|---|---|---|---|",
    ]
    for budget in BUDGETS:
        cells = [
            cell([best_ppl_at(r[model][conf], budget) for r in rows])
            for model in MODELS
            for conf in ("learned", "max_prob")
        ]
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    lines += ["", "## Runs", "", "| seed | model | epochs | steps | wall s |", "|---|---|---|---|---|"]
    for r in rows:
        for model in ("standard", *MODELS):
            m = r[model]
            lines.append(f"| {r['seed']} | {model} | {m['epochs']} | {m['steps']} | {m['wall_s']:.0f} |")
    lines += ["", "## What the numbers show", "", *observations(rows)]
    return "\n".join(lines) + "\n"


def observations(rows: list[dict[str, Any]]) -> list[str]:
    """The verdicts, by the rule every study here uses: a difference counts beyond both rows' seed spread."""

    def ppl(model: str, k: int) -> list[float]:
        return [r[model]["exits"][str(k)]["ppl"] for r in rows]

    kept = all(r["exit_tuned"]["trunk_unchanged"] for r in rows)
    out = [f"- EE-Tuning left every trunk weight and the final head bit-identical to the exported model: {kept}."]
    said, worse, better, same = [], [], [], []
    for k in range(1, LAYERS):
        added, scratch = ppl("exit_tuned", k), ppl("deep_supervision", k)
        diff, told_apart = differ(added, scratch)
        said.append(f"layer {k}: {100 * diff / statistics.fmean(scratch):+.1f}% ({versus(added, scratch)})")
        (same if not told_apart or len(rows) < 2 else worse if diff > 0 else better).append(k)
    verdict = grouped_verdict(
        [("worse after layer(s)", worse), ("better after layer(s)", better), ("not told apart after layer(s)", same)],
        len(rows),
    )
    out.append(
        "- Exits added afterwards against exits trained from the start, perplexity (added minus from scratch): "
        f"{', '.join(said)}. Added exits are {verdict}."
    )
    final, scratch_final = ppl("exit_tuned", LAYERS), ppl("deep_supervision", LAYERS)
    lower = (
        "the standard model's" if statistics.fmean(final) < statistics.fmean(scratch_final) else "deep supervision's"
    )
    out.append(
        "- The final exit, the standard model's (EE-Tuning keeps it) against deep supervision's: "
        f"{cell(final)} against {cell(scratch_final)} ({versus(final, scratch_final)}); {lower} is the lower."
    )
    best_scratch = min(range(1, LAYERS + 1), key=lambda k: statistics.fmean(ppl("deep_supervision", k)))
    if best_scratch != LAYERS:
        out.append(
            f"- Deep supervision's best exit is after layer {best_scratch}, not the last: at this data size its "
            "layers above do not lower the perplexity."
        )
    epochs = [r["exit_tuned"]["epochs"] for r in rows]
    out.append(
        f"- EE-Tuning ran {epochs} epochs (patience 1 on its exits' summed validation loss); the standard model "
        "and deep supervision trained "
        f"{[r['standard']['epochs'] for r in rows]} and {[r['deep_supervision']['epochs'] for r in rows]}."
    )
    for budget in (0.9, 0.95):
        parts = [
            f"{model} {conf} {cell([best_ppl_at(r[model][conf], budget) for r in rows])}"
            for model in MODELS
            for conf in ("learned", "max_prob")
        ]
        out.append(f"- Best routed PPL within {budget} of the full FLOPs: " + "; ".join(parts) + ".")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-samples", type=int, default=10_000)
    parser.add_argument("--max-epochs", type=int, default=50)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "exits_added")
    args = parser.parse_args()
    settings = {"train_samples": args.train_samples, "max_epochs": args.max_epochs}
    rows, resumed_from = resumed_runs(args, "rows", settings)
    done = index_runs(rows, lambda r: r["seed"])
    extra = {"settings": settings, "resumed_from": resumed_from}
    for seed in args.seeds:
        if seed not in done:
            rows.append(run_seed(seed, args))
            rows.sort(key=lambda r: r["seed"])
            write_results(args.name, rows, report(rows, args), extra=extra)  # after every seed
    write_results(args.name, rows, report(rows, args), extra=extra)
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
