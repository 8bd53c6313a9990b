"""LayerSkip's training recipe against the early-exit loss alone and standard training, at the same FLOPs (issue 27).

Per seed, three models of ``configs/bpe/layerskip.yaml``'s size (d_model 256, 4 heads, 12 layers,
an exit after every layer, all exits sharing the final norm and head) on WikiText-2 in a
byte-level BPE of 8,192 tokens, blocks of 128 tokens, batch 16, AdamW at 1e-3 with 100 warm-up
steps and a cosine decay to a tenth:

* ``standard``: only the final exit's loss (the early exits are the final head read at a shallower
  layer, never trained);
* ``early_exit_loss``: the early-exit loss with the rotational curriculum (every step one exit
  before the last trains beside the last, weights by depth), no layer dropout;
* ``layerskip``: the config as committed: that loss and layer dropout (rising to 0.2 at layer 12).

Every run gets the same training FLOPs: what ``standard`` spends in ``--train-samples`` blocks
(one epoch of them); the other two run fewer steps, since each of their steps runs a second head
(counted by :func:`~lego_lightning.model.flops.training_flops_per_token`; layer dropout computes
every layer and discards the skipped ones, so it costs what the early-exit loss costs). Each is
``lego fit`` of the config through the CLI classes, with the command stored in the results, so the
self-speculative decoding benchmark can rebuild the checkpoints; ``--keep DIR`` also writes each
trained model with ``save_pretrained`` (and its tokenizer) under ``DIR/<method>_seed<k>``.

Measured on every WikiText-2 validation block: each exit's perplexity and bits per byte, and how
often its greedy token equals the final exit's (the acceptance rate of self-speculative decoding
drafting at that exit).

    python -m benchmarks.layerskip --seeds 0 1 2                    # about 45 minutes a seed on 2 idle CPU cores
    python -m benchmarks.layerskip --seeds 0 --train-samples 200 --val-samples 50 --name layerskip_quick
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_DATA,
    REPO,
    RESULTS,
    add_resume_arguments,
    config_cli,
    differ,
    fmt,
    grouped_verdict,
    index_runs,
    resumed_runs,
    summary,
    versus,
    write_results,
)
from lego_lightning.evaluation import collect_exit_outputs
from lego_lightning.model import flops

CONFIG = "bpe/layerskip"
# Each method as overrides of the committed config; what a run of it adds is the same for all three.
METHODS: dict[str, tuple[str, ...]] = {
    "standard": (
        "--model.exits",
        "{every: 1, loss_weights: final}",
        "--model.layer_dropout",
        "null",
        "--trainer.callbacks=[]",
    ),
    "early_exit_loss": ("--model.layer_dropout", "null"),
    "layerskip": (),
}


def run_overrides(seed: int, steps: int, args: argparse.Namespace) -> list[str]:
    """What every run adds to its method's overrides: the data slice, the seed, the step budget, no validation."""
    return [
        "--data.path",
        str(args.data),
        "--data.max_train_samples",
        str(args.train_samples),
        "--data.max_val_samples",
        "null" if args.val_samples is None else str(args.val_samples),
        "--seed_everything",
        str(seed),
        "--trainer.max_epochs",
        "-1",
        "--trainer.max_steps",
        str(steps),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.enable_checkpointing",
        "false",
        *(part for item in args.override for part in ("--" + item.split("=", 1)[0], item.split("=", 1)[1])),
    ]


def lego_command(method: str, seed: int, steps: int, args: argparse.Namespace) -> str:
    """The ``lego fit`` command that trains the run (what this benchmark runs, through the same CLI classes)."""
    overrides = run_overrides(seed, steps, args)
    overrides[1] = os.path.relpath(args.data, REPO)  # --data.path as typed in the repository's root
    parts = ["lego", "fit", "--config", f"configs/{CONFIG}.yaml", *METHODS[method], *overrides]
    return " ".join(shlex.quote(p) for p in parts)


def flops_per_step(method: str, seed: int, args: argparse.Namespace) -> tuple[float, int]:
    """A training step's FLOPs for ``method`` (every token, every head and layer that runs) and its batch size."""
    cli = config_cli(CONFIG, args.data, seed, tempfile.mkdtemp(), *METHODS[method], *run_overrides(seed, 1, args))
    module, dm = cli.model, cli.datamodule
    exits = module.config.exit_layers
    if method == "standard":
        weights = list(module.exit_loss_weights)
    else:  # the rotational curriculum: one exit before the last beside the last (which one does not matter)
        weights = [0.0] * len(exits)
        weights[0] = weights[-1] = 0.5
    per_token = flops.training_flops_per_token(module.config, weights, flops.mean_context(dm.seq_len)).total
    return per_token * dm.batch_size * dm.seq_len, dm.batch_size


def run(method: str, seed: int, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        cli = config_cli(CONFIG, args.data, seed, work, *METHODS[method], *run_overrides(seed, steps, args))
        start = time.perf_counter()
        cli.trainer.fit(cli.model, cli.datamodule)
        wall = time.perf_counter() - start
    module, dm = cli.model, cli.datamodule
    assert cli.trainer.global_step == steps, (cli.trainer.global_step, steps)
    if args.keep is not None:
        folder = args.keep / f"{method}_seed{seed}"
        module.model.save_pretrained(folder)
        dm.text_tokenizer.save(folder)
    start = time.perf_counter()
    out = collect_exit_outputs(module, dm.val_dataloader(), confidence="max_prob")
    eval_wall = time.perf_counter() - start
    exits = {
        str(k): {"ppl": out.exit_ppl(k), "bpb": out.exit_bpb(k), "agreement": out.agreement(k)} for k in out.exit_layers
    }
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "train_tokens": steps * dm.batch_size * dm.seq_len,
        "train_wall_s": wall,
        "eval_wall_s": eval_wall,
        "val_tokens": int(out.nll.shape[1]),
        "command": lego_command(method, seed, steps, args),
        "exits": exits,
    }


# ------------------------------------------------------------------------------------------ report
def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method and exit: each figure's seeds, mean and spread."""
    out = []
    for method in METHODS:
        layers = sorted({int(k) for r in runs if r["method"] == method for k in r["exits"]})
        for k in layers:
            figures = {f: summary(values(runs, method, k, f)) for f in ("ppl", "bpb", "agreement")}
            out.append({"method": method, "exit": k, **figures})
    return out


def values(runs: list[dict[str, Any]], method: str, k: int, field: str) -> list[float]:
    return [r["exits"][str(k)][field] for r in runs if r["method"] == method]


def plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """Each method's mean agreement and perplexity against the exit's layer."""
    try:
        import matplotlib.pyplot as plt

        from lego_lightning import viz
    except ImportError:
        return False
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    layers = sorted({int(k) for r in runs for k in r["exits"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, field, label in zip(axes, ("agreement", "ppl"), ("greedy token equals the final exit's", "perplexity")):
        series = {m: [(k, statistics.fmean(values(runs, m, k, field))) for k in layers] for m in methods}
        viz.metric_curves(series, title=f"WikiText-2 valid, mean of {len(runs) // len(methods)} seed(s)",
                          ylabel=label, log_y=field == "ppl", styles={m: "o-" for m in methods}, ax=ax)  # fmt: skip
        ax.set_xlabel("exit after layer")
    viz.save(fig, path)
    return True


def report(runs: list[dict[str, Any]], budget: dict[str, Any], args: argparse.Namespace) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    layers = sorted({int(k) for r in runs for k in r["exits"]})
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        "# LayerSkip's training recipe: does it make the early exits agree with the last one?",
        "",
        f"`configs/{CONFIG}.yaml` (d_model 256, 4 heads, 12 layers, an exit after every layer sharing the final "
        "head) on WikiText-2 in a byte-level BPE of 8,192 tokens, blocks of 128 tokens, batch 16, "
        f"{args.train_samples} training blocks, seeds {seeds}. Every run gets the training FLOPs of one epoch of "
        f"standard training ({budget['standard_steps']} steps, {budget['flops'] / 1e15:.2f} PFLOPs): "
        + ", ".join(f"{m} {budget['steps'][m]} steps" for m in methods)
        + ". Scored on "
        + (f"{runs[0]['val_tokens']:,}" if runs else "the")
        + " validation tokens.",
        "",
        "- `standard`: the final exit's loss alone; the early exits are the final norm and head read at a shallower "
        "layer, never trained.",
        "- `early_exit_loss`: the early-exit loss, rotational curriculum (each step one exit before the last beside "
        "the last, weights by depth), no layer dropout.",
        "- `layerskip`: that loss and layer dropout (each sample skips layer l at 0.2 (2^((l-1)/11) - 1)).",
        "",
        f"![agreement and perplexity per exit]({args.name}_exits.png)"
        if plot(runs, RESULTS / f"{args.name}_exits.png")
        else "(matplotlib missing: no image)",
        "",
    ]
    lines += per_exit_table(
        "Agreement with the final exit (greedy tokens equal: self-speculative decoding's acceptance rate)",
        methods,
        layers,
        lambda m, k: fmt(summary(values(runs, m, k, "agreement")), 3),
    )
    lines += per_exit_table(
        "Each exit's perplexity (bits per byte)",
        methods,
        layers,
        lambda m, k: f"{fmt(summary(values(runs, m, k, 'ppl')), 1)} ({fmt(summary(values(runs, m, k, 'bpb')), 3)})",
    )
    lines += [
        "",
        "## Runs",
        "",
        "| method | seed | steps | train tokens | train s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (list(METHODS).index(r["method"]), r["seed"])):
        lines.append(
            f"| {r['method']} | {r['seed']} | {r['steps']} | {r['train_tokens']:,} | {r['train_wall_s']:.0f} | "
            f"{r['eval_wall_s']:.0f} |"
        )
    lines += [
        "",
        "Each run's command (to rebuild its checkpoint; add `--trainer.enable_checkpointing true` to keep one):",
        "",
    ]
    lines += [f"- {r['method']}, seed {r['seed']}: `{r['command']}`" for r in runs]
    lines += ["", "## What the numbers show", "", *observations(runs, layers)]
    return "\n".join(lines) + "\n"


def per_exit_table(title: str, methods: list[str], layers: list[int], cell: Callable[[str, int], str]) -> list[str]:
    """A markdown section: one row per exit, one column per method, ``cell(method, layer)`` in each."""
    lines = [
        "",
        f"## {title}",
        "",
        "| exit after layer | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    return lines + [f"| {k} | " + " | ".join(cell(m, k) for m in methods) + " |" for k in layers]


def observations(runs: list[dict[str, Any]], layers: list[int]) -> list[str]:
    """The verdicts, by the rule every study here uses: a difference counts beyond both rows' seed spread."""
    have = {r["method"] for r in runs}
    out: list[str] = []
    early = layers[:-1]
    if not early:
        return out
    for a, b in (("layerskip", "early_exit_loss"), ("layerskip", "standard"), ("early_exit_loss", "standard")):
        if not {a, b} <= have:
            continue
        higher, lower, same = [], [], []
        for k in early:
            diff, told = differ(values(runs, a, k, "agreement"), values(runs, b, k, "agreement"))
            (same if not told else higher if diff > 0 else lower).append(k)
        n_seeds = min(len(values(runs, a, early[0], "agreement")), len(values(runs, b, early[0], "agreement")))
        verdict = grouped_verdict(
            [("higher at exits", higher), ("lower at exits", lower), ("not told apart at exits", same)], n_seeds
        )
        mean_gain = statistics.fmean(
            statistics.fmean(values(runs, a, k, "agreement")) - statistics.fmean(values(runs, b, k, "agreement"))
            for k in early
        )
        out.append(
            f"- Agreement with the final exit, `{a}` against `{b}`: {verdict} (mean over the early exits "
            f"{100 * mean_gain:+.1f} points)."
        )
    final = layers[-1]
    for method in (m for m in METHODS if m in have):
        ppl = {k: statistics.fmean(values(runs, method, k, "ppl")) for k in layers}
        near = min(k for k in layers if ppl[k] <= 1.01 * ppl[final])
        out.append(
            f"- `{method}`: the shallowest exit within 1% of the final exit's perplexity is after layer {near} "
            f"({ppl[near]:.1f} against {ppl[final]:.1f}; mean of the seeds)."
        )
    for method in ("layerskip", "early_exit_loss"):
        if {method, "standard"} <= have:
            a, b = values(runs, method, final, "ppl"), values(runs, "standard", final, "ppl")
            out.append(
                f"- The final exit's perplexity, `{method}` against `standard` at the same FLOPs: {fmt(summary(a), 1)} "
                f"against {fmt(summary(b), 1)} ({versus(a, b)})."
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--train-samples", type=int, default=10_000, help="training blocks of 128 tokens")
    parser.add_argument("--val-samples", type=int, default=None, help="validation blocks (default: all)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--keep", type=Path, default=None, help="write each trained model (save_pretrained) here")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a lego option for every run, e.g. model.warmup_steps=2 (for a quick check; the results say so)",
    )
    add_resume_arguments(parser, "layerskip")
    args = parser.parse_args()
    bad = [item for item in args.override if "=" not in item]
    if bad:
        parser.error(f"--override takes KEY=VALUE, got {bad}")
    settings = {"train_samples": args.train_samples, "val_samples": args.val_samples, "override": args.override}
    runs, resumed_from = resumed_runs(args, "runs", settings)
    done = index_runs(runs, lambda r: (r["method"], r["seed"]))
    per_step = {m: flops_per_step(m, args.seeds[0], args) for m in METHODS}
    standard_steps = -(-args.train_samples // per_step["standard"][1])  # one epoch of the training blocks
    total = per_step["standard"][0] * standard_steps
    budget = {
        "standard_steps": standard_steps,
        "flops": total,
        "steps": {m: int(total // per_step[m][0]) for m in METHODS},
        "flops_per_step": {m: per_step[m][0] for m in METHODS},
    }
    extra = {"settings": settings, "budget": budget, "resumed_from": resumed_from}
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            runs.append(run(method, seed, budget["steps"][method], args))
            write_results(args.name, rows(runs), report(runs, budget, args), extra={**extra, "runs": runs})
    write_results(args.name, rows(runs), report(runs, budget, args), extra={**extra, "runs": runs})
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
