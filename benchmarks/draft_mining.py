"""Hard-token mining with a job: a draft exit's agreement with the final exit, output unchanged (issue 29).

Starting points: the LayerSkip-trained model of ``benchmarks/layerskip.py`` and its standard-trained
control (seed 0, d_model 256, 12 layers, BPE 8K), as the ``--keep`` folders of that benchmark
hold them (rebuild them with the command in ``benchmarks/speculative.py``'s docstring). Each
runs ``configs/pretrained/draft_mining.yaml`` through the ``lego`` CLI classes with its draft
exit after layer 1 (the best draft exit of both models in ``benchmarks/results/speculative.md``,
at batch 1 and 8): a separate head for exit 1, copied from the final norm and LM head, is the
only thing that trains. Five plans, at the same training FLOPs:

* ``ce_all``: cross-entropy with the data on every token (EE-Tuning);
* ``distill_all``: KL to the final exit's softmax (temperature 1) on every token;
* ``distill_mined``: that KL on the mined tokens: those where exit 1's greedy token is not the
  final exit's (``tokens: disagree``);
* ``ce_mined``: cross-entropy with the data on the mined tokens;
* ``distill_soft``: the KL on the tokens where exit 1 gives the final exit's greedy token a
  probability below a threshold calibrated on held-out blocks so that half of them fall below
  it (``tokens: disagree_soft``, ``hard_ratio: 0.5``).

The budget is ``--ce-steps`` steps of ``ce_all``; the others get the steps its FLOPs pay for
(:func:`~lego_lightning.model.flops.training_flops_per_token`, the final exit's forward counted for
distillation), after mining (both exits over every training block,
:func:`~lego_lightning.model.flops.agreement_flops_per_token`, and the calibration blocks for the
soft selection) is paid for. ``start`` is the model before any plan.

Measured after each run:

* exit 1's agreement with the final exit on the WikiText-2 validation blocks (greedy
  self-speculative decoding's acceptance rate), and both exits' perplexity;
* self-speculative decoding with the library's decoder, drafting at exit 1 with the K that was
  best for that model and batch: tokens per second over full depth at batch 1 and 8 (greedy,
  ``--prompts`` validation paragraphs of 32 tokens, 48 new tokens, each timed ``--timings`` times,
  the fastest counts, full depth timed before and after), the share of drafts kept and the tokens
  a verification yields; the greedy tokens must equal the starting model's full-depth tokens;
* whether every weight but exit 1's head is bit for bit the starting model's, and the final
  exit's perplexity equal to the start's (float for float);
* each plan's training time (mining included) and the share of training tokens it mined.

    python -m benchmarks.draft_mining --seeds 0 1 2          # about 25 minutes a seed on 2 idle CPU cores
    python -m benchmarks.draft_mining --seeds 0 --ce-steps 10 --train-samples 40 --val-samples 8 --name draft_quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_DATA,
    RESULTS,
    add_resume_arguments,
    config_cli,
    differ,
    fmt,
    index_runs,
    resumed_runs,
    summary,
    versus,
    write_results,
)
from benchmarks.speculative import CHECKPOINTS, decode_all, load_prompts, timed
from lego_lightning.evaluation import collect_exit_outputs
from lego_lightning.model import flops

CONFIG = "pretrained/draft_mining"
MODELS = ("layerskip", "standard")
DRAFT_EXIT = 1
SOFT_RATIO = 0.5
_PHASE = {"train": ["exit first"], "loss_weights": {"first": 1.0}, "max_epochs": 1000, "patience": 1000}
PLANS: dict[str, dict[str, Any]] = {
    "ce_all": {"tokens": "all", "distill": 0.0},
    "distill_all": {"tokens": "all", "distill": 1.0},
    "distill_mined": {"tokens": "disagree", "distill": 1.0},
    "ce_mined": {"tokens": "disagree", "distill": 0.0},
    "distill_soft": {"tokens": "disagree_soft", "hard_ratio": SOFT_RATIO, "distill": 1.0},
    # Outside the equal-FLOPs grid: distill_mined given distill_all's steps, mining on top, so that the token
    # selection is compared at the same training and its budget is not what decides.
    "distill_mined_same_steps": {"tokens": "disagree", "distill": 1.0, "same_steps_as": "distill_all"},
}
RUN_KEY = ("model", "plan", "seed")


def best_ks() -> dict[tuple[str, int], int]:
    """The K that was fastest for each (model, batch), greedy, in speculative.json; its draft exit must be
    ``DRAFT_EXIT`` (the issue drafts where self-speculation was best)."""
    rows = json.loads((RESULTS / "speculative.json").read_text())["runs"]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in rows:
        if r["mode"] == "greedy" and r["draft_threshold"] is None:
            key = (r["model"], r["batch"])
            if key not in best or r["speedup"] > best[key]["speedup"]:
                best[key] = r
    elsewhere = {key: r["draft_exit"] for key, r in best.items() if r["draft_exit"] != DRAFT_EXIT}
    if elsewhere:
        raise SystemExit(f"speculative.json's best draft exits are {elsewhere}, not {DRAFT_EXIT}: update DRAFT_EXIT")
    return {key: r["k"] for key, r in best.items()}


def overrides(model: str, plan: str, seed: int, steps: int, args: argparse.Namespace) -> list[str]:
    spec = {k: v for k, v in PLANS.get(plan, PLANS["ce_all"]).items() if k != "same_steps_as"}
    phase = {**_PHASE, **spec}  # "start" builds ce_all's plan and never trains
    return [
        "--model.pretrained", str(CHECKPOINTS / f"{model}_seed0"),
        "--model.exits", f"{{layers: [{DRAFT_EXIT}]}}",
        "--model.lr", str(args.lr),
        "--model.phases", json.dumps([phase]),
        # No validation during training (the budget ends the run), so the phase follows a logged training metric.
        "--model.monitor", "train/loss",
        "--model.mode", "min",
        "--data.max_train_samples", str(args.train_samples),
        "--data.calibration_samples", str(args.calibration_samples),
        "--data.max_val_samples", str(args.val_samples),
        "--seed_everything", str(seed),
        "--trainer.max_epochs", "-1",
        "--trainer.max_steps", str(max(steps, 1)),
        "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_checkpointing", "false",
    ]  # fmt: skip


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """Each plan's steps at the FLOPs of ``--ce-steps`` steps of ``ce_all``, mining paid for first."""
    cli = config_cli(CONFIG, args.data, 0, tempfile.mkdtemp(), *overrides(MODELS[0], "ce_all", 0, 1, args))
    module, dm = cli.model, cli.datamodule
    cfg = module.config
    context = flops.mean_context(dm.seq_len)
    weights = [1.0 if k == DRAFT_EXIT else 0.0 for k in cfg.exit_layers]
    frozen_heads = [i for i, k in enumerate(cfg.exit_layers) if k != DRAFT_EXIT]
    tokens_per_step = dm.batch_size * dm.seq_len

    def step(distill: bool) -> float:
        teacher = cfg.n_layers if distill else None
        per_token = flops.training_flops_per_token(cfg, weights, context, cfg.n_layers, frozen_heads, teacher)
        return per_token.total * tokens_per_step

    agreement = flops.agreement_flops_per_token(cfg, DRAFT_EXIT, cfg.n_layers, context).total
    mining = agreement * args.train_samples * dm.seq_len
    calibration = agreement * args.calibration_samples * dm.seq_len
    total = step(False) * args.ce_steps
    out: dict[str, Any] = {
        "flops": total, "steps": {}, "mining_flops": {}, "flops_per_step": {}, "batch_size": dm.batch_size,
        "flops_ratio": {},
    }  # fmt: skip
    for plan, spec in PLANS.items():
        cost = 0.0 if spec["tokens"] == "all" else mining + (calibration if spec["tokens"] == "disagree_soft" else 0)
        per_step = step(spec["distill"] > 0)
        steps = out["steps"][spec["same_steps_as"]] if "same_steps_as" in spec else int((total - cost) // per_step)
        out["steps"][plan] = steps
        out["mining_flops"][plan] = cost
        out["flops_per_step"][plan] = per_step
        out["flops_ratio"][plan] = (cost + steps * per_step) / total  # 1 but for rounding, outside the grid more
        if steps < 1:
            raise SystemExit(f"{plan}: mining alone costs more than the budget; raise --ce-steps")
    return out


def evaluate(module: Any, dm: Any, prompts: torch.Tensor, ks: dict[int, int], args: argparse.Namespace) -> dict:
    """Agreement and perplexities on the validation blocks, and greedy self-speculative decoding's speed."""
    start = time.perf_counter()
    out = collect_exit_outputs(module, dm.val_dataloader(), confidence="max_prob")
    final = module.config.n_layers
    row: dict[str, Any] = {
        "agreement": out.agreement(DRAFT_EXIT),
        "draft_ppl": out.exit_ppl(DRAFT_EXIT),
        "final_ppl": out.exit_ppl(final),
        "val_tokens": int(out.nll.shape[1]),
    }
    model = module.model.eval()
    new = args.new_tokens
    for batch, k in sorted(ks.items()):

        def full_depth(batch: int = batch) -> list:
            return decode_all(model, prompts, batch, new)

        def speculative(batch: int = batch, k: int = k) -> list:
            return decode_all(model, prompts, batch, new, draft_exit=DRAFT_EXIT, num_speculations=k)

        full_s0, full = timed(full_depth, args.timings)
        spec_s, spec = timed(speculative, args.timings)
        full_s1, _ = timed(full_depth, args.timings)
        if not all(torch.equal(a.tokens, b.tokens) for a, b in zip(spec, full)):
            raise SystemExit(f"batch {batch}: self-speculative greedy tokens differ from full depth's")
        drafts = sum(int(g.drafts.sum()) for g in spec)
        accepted = sum(int(g.accepted.sum()) for g in spec)
        rounds = sum(int(g.verifications.sum()) for g in spec)
        row[f"batch{batch}"] = {
            "k": k,
            "speedup": min(full_s0, full_s1) / spec_s,
            "seconds": spec_s,
            "full_seconds": [full_s0, full_s1],
            "kept_share": accepted / drafts if drafts else 0.0,
            "tokens_per_verification": (accepted + rounds) / rounds,
            "tokens_sha": hashlib.sha256(torch.cat([g.tokens.flatten() for g in full]).numpy().tobytes()).hexdigest(),
        }
    row["eval_wall_s"] = time.perf_counter() - start
    return row


def trunk_state(module: Any) -> dict[str, torch.Tensor]:
    """Every weight but the draft exit's own head (what must not change)."""
    head = f"heads.{module.config.exit_layers.index(DRAFT_EXIT)}."
    return {k: v.detach().clone() for k, v in module.model.state_dict().items() if not k.startswith(head)}


def run(model: str, plan: str, seed: int, steps: int, ks: dict[int, int], args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cli = config_cli(CONFIG, args.data, seed, work, *overrides(model, plan, seed, steps, args))
        module, dm = cli.model, cli.datamodule
        row: dict[str, Any] = {"model": model, "plan": plan, "seed": seed, "steps": 0, "train_wall_s": 0.0}
        if plan == "start":  # the model as loaded (set-up loads the pretrained weights), nothing trained
            cli.trainer.validate(module, dm, verbose=False)
        else:
            start = time.perf_counter()
            cli.trainer.fit(module, dm)
            row["train_wall_s"] = time.perf_counter() - start
            assert cli.trainer.global_step == steps, (cli.trainer.global_step, steps)
            row["steps"] = steps
            row["mined_share"] = None if module.hard_tokens is None else module.hard_tokens.fraction()
        prompts = load_prompts(CHECKPOINTS / f"{model}_seed0", args.data, args.prompts, args.prompt_tokens)
        row |= evaluate(module, dm, prompts, {b: ks[(model, b)] for b in (1, 8)}, args)
        row["trunk"] = trunk_state(module)  # popped by main before the row is stored
    return row


def unchanged(runs: list[dict[str, Any]], row: dict[str, Any]) -> bool:
    """Whether a plan's final exit is the start's, float for float, and its greedy tokens too."""
    start = next(r for r in runs if r["model"] == row["model"] and r["plan"] == "start")
    same_tokens = all(row[f"batch{b}"]["tokens_sha"] == start[f"batch{b}"]["tokens_sha"] for b in (1, 8))
    return row["final_ppl"] == start["final_ppl"] and same_tokens and row.get("trunk_identical", True)


# ------------------------------------------------------------------------------------------ report
def values(runs: list[dict[str, Any]], model: str, plan: str, field: str, batch: int | None = None) -> list[float]:
    rows = [r for r in runs if r["model"] == model and r["plan"] == plan]
    return [(r[f"batch{batch}"] if batch else r)[field] for r in rows]


def report(runs: list[dict[str, Any]], plan_budget: dict[str, Any], args: argparse.Namespace) -> str:
    seeds = sorted({r["seed"] for r in runs if r["plan"] != "start"})
    lines = [
        "# Draft mining: raising a draft exit's agreement with the final exit, output unchanged",
        "",
        f"`configs/{CONFIG}.yaml` on the seed-0 models of `benchmarks/layerskip.py` (d_model 256, 12 layers, BPE "
        f"8K): a separate head for exit {DRAFT_EXIT}, copied from the final norm and LM head, is all that trains "
        f"(AdamW at {args.lr}), on {args.train_samples:,} WikiText-2 training blocks of 128 tokens (batch 8), "
        f"{args.calibration_samples} held-out blocks for the soft selection's calibration, seeds {seeds}. Every plan "
        f"gets the training FLOPs of {args.ce_steps} steps of `ce_all` ({plan_budget['flops'] / 1e12:.1f} TFLOPs), "
        "mining and the final exit's forward for distillation counted: "
        + ", ".join(f"`{p}` {s} steps" for p, s in plan_budget["steps"].items() if "same_steps_as" not in PLANS[p])
        + "; but `distill_mined_same_steps`, outside that grid: "
        + ", ".join(
            f"`{p}` {plan_budget['steps'][p]} steps at {plan_budget.get('flops_ratio', {}).get(p, float('nan')):.2f}x "
            "the FLOPs"
            for p, spec in PLANS.items()
            if "same_steps_as" in spec
        )
        + f". Scored on {runs[0]['val_tokens']:,} validation tokens; decoding on {args.prompts} validation "
        f"paragraphs of {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy. A seed changes only the "
        "order of the training blocks (the draft head starts as the same copy of the final head in every seed), so "
        "the seed spread is narrow. Each speed-up is a ratio of two timings in the same run (self-speculative against "
        "full depth); how much one moves between seeds (up to a quarter of its value) is its noise, so plans are "
        "compared by agreement and tokens per verification, which do not depend on timing.",
        "",
        "- `ce_all`: cross-entropy with the data on every token (EE-Tuning).",
        "- `distill_all`: KL to the final exit's softmax on every token.",
        "- `distill_mined`: that KL on the mined tokens, where exit 1's greedy token is not the final exit's.",
        "- `ce_mined`: cross-entropy with the data on those mined tokens.",
        f"- `distill_soft`: the KL where exit 1's probability of the final exit's token is below the threshold "
        f"that {SOFT_RATIO:.0%} of held-out tokens fall below.",
        "- `distill_mined_same_steps`: `distill_mined` with `distill_all`'s steps, mining on top of the budget.",
        "",
    ]
    for model in MODELS:
        if not any(r["model"] == model for r in runs):
            continue
        plans = ["start", *[p for p in PLANS if any(r["model"] == model and r["plan"] == p for r in runs)]]
        k1 = next(r["batch1"]["k"] for r in runs if r["model"] == model)
        k8 = next(r["batch8"]["k"] for r in runs if r["model"] == model)
        lines += [
            f"## `{model}` model, drafting at exit {DRAFT_EXIT} (K={k1} at batch 1, K={k8} at batch 8)",
            "",
            "| plan | agreement | tokens per verification (batch 1) | speed-up batch 1 | speed-up batch 8 "
            "| exit 1 PPL | final PPL | output unchanged | mined | steps (epochs) | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for plan in plans:
            rows = [r for r in runs if r["model"] == model and r["plan"] == plan]
            if not rows:
                continue

            def cell(field: str, batch: int | None = None, digits: int = 3) -> str:
                return fmt(summary(values(runs, model, plan, field, batch)), digits)  # noqa: B023

            mined = [r.get("mined_share") for r in rows]
            lines.append(
                f"| {plan} | {cell('agreement')} | {cell('tokens_per_verification', 1, 2)} | "
                f"{cell('speedup', 1, 2)}x | {cell('speedup', 8, 2)}x | {cell('draft_ppl', digits=1)} | "
                f"{rows[0]['final_ppl']:.3f} | {'yes' if all(unchanged(runs, r) for r in rows) else 'NO'} | "
                f"{'-' if mined[0] is None else fmt(summary(mined), 3)} | {rows[0]['steps']} "
                f"({rows[0]['steps'] * plan_budget['batch_size'] / args.train_samples:.1f}) | "
                f"{fmt(summary([r['train_wall_s'] for r in rows]), 0)} |"
            )
        lines.append("")
    lines += ["## What the numbers show", "", *observations(runs)]
    return "\n".join(lines)


# Each comparison the report makes: (plan, against, what it asks).
COMPARISONS = [
    ("distill_all", "ce_all", "distillation against cross-entropy, all tokens"),
    ("distill_mined", "ce_all", "mined distillation against EE-Tuning"),
    ("ce_mined", "ce_all", "mining against all tokens, cross-entropy"),
    ("distill_mined", "distill_all", "mining against all tokens, distillation"),
    ("distill_soft", "distill_all", "soft mining against all tokens, distillation"),
    ("distill_soft", "distill_mined", "soft against greedy disagreement"),
    ("distill_mined_same_steps", "distill_all", "mining against all tokens at the same steps, distillation"),
]


def verdict(a: list[float], b: list[float]) -> str:
    """``a`` against ``b`` as a plain verdict: higher, lower, not told apart (the seed-spread rule), or one seed."""
    if min(len(a), len(b)) < 2:
        return "one seed, no verdict"
    diff, told = differ(a, b)
    return ("higher" if diff > 0 else "lower") if told else "not told apart"


def observations(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for model in MODELS:
        start = values(runs, model, "start", "agreement")
        if not start:
            continue
        moved = [
            f"`{plan}` {fmt(summary(values(runs, model, plan, 'agreement')), 3)}"
            for plan in PLANS
            if values(runs, model, plan, "agreement")
        ]
        out.append(f"- `{model}`: exit 1's agreement was {start[0]:.3f} before training; after: {', '.join(moved)}.")
        for plan, other, what in COMPARISONS:
            a, b = values(runs, model, plan, "agreement"), values(runs, model, other, "agreement")
            if not a or not b:
                continue
            points = versus([100 * v for v in a], [100 * v for v in b]).replace(",", " points,", 1)
            out.append(f"- `{model}`, {what}: `{plan}` against `{other}`, agreement {points}: {verdict(a, b)}.")
        tokens = {
            p: summary(values(runs, model, p, "tokens_per_verification", 1))["mean"]
            for p in PLANS
            if values(runs, model, p, "tokens_per_verification", 1)
        }
        best = max((p for p in tokens), key=lambda p: tokens[p])
        start_tokens = values(runs, model, "start", "tokens_per_verification", 1)[0]
        out.append(
            f"- `{model}`, decoding its own greedy continuations at batch 1: {start_tokens:.2f} tokens per "
            f"verification before training; the most after, {tokens[best]:.2f} (`{best}`)"
            + (" (no plan raised it)." if tokens[best] <= start_tokens else ".")
        )
        beats = [p for p in PLANS if p != "ce_all" and "same_steps_as" not in PLANS[p] and verdict(
            values(runs, model, p, "agreement"), values(runs, model, "ce_all", "agreement")) == "higher"]  # fmt: skip
        out.append(
            f"- `{model}`: plans at equal FLOPs whose agreement beats `ce_all` beyond the seed spread: "
            f"{beats or 'none'}."
        )
    changed = [r for r in runs if r["plan"] != "start" and not unchanged(runs, r)]
    out.append(
        "- Output: every plan left every weight but exit 1's head, the final exit's perplexity and the greedy tokens "
        "exactly as they were."
        if not changed
        else f"- Output CHANGED in {len(changed)} runs: {[(r['model'], r['plan'], r['seed']) for r in changed]}."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS))
    parser.add_argument("--ce-steps", type=int, default=600, help="the budget: steps of ce_all (batch 8 x 128)")
    parser.add_argument("--train-samples", type=int, default=1000, help="training blocks of 128 tokens")
    parser.add_argument("--calibration-samples", type=int, default=200, help="held-out blocks for calibration")
    parser.add_argument("--val-samples", type=int, default=200, help="validation blocks")
    parser.add_argument("--lr", type=float, default=1e-4, help="the config's own")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--timings", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    add_resume_arguments(parser, "draft_mining")
    args = parser.parse_args()
    settings = {
        k: getattr(args, k)
        for k in ("ce_steps", "train_samples", "calibration_samples", "val_samples", "lr", "prompts", "prompt_tokens",
                  "new_tokens")
    }  # fmt: skip
    runs, resumed_from = resumed_runs(args, "runs", settings)
    done = index_runs(runs, lambda r: tuple(r[k] for k in RUN_KEY))
    ks = best_ks()
    plan_budget = budget(args)
    extra = {"settings": settings, "budget": plan_budget, "resumed_from": resumed_from}

    def save() -> None:
        write_results(args.name, runs, report(runs, plan_budget, args), extra={**extra, "runs": runs})

    starts: dict[str, dict[str, torch.Tensor]] = {}  # each model's weights before any plan, but the draft head
    for model in args.models:  # every starting point first: each report compares its plans with it
        todo = [(plan, seed) for seed in args.seeds for plan in args.plans if (model, plan, seed) not in done]
        if todo or (model, "start", 0) not in done:
            start = run(model, "start", 0, 0, ks, args)  # measured once; a resumed run reads its weights again
            starts[model] = start.pop("trunk")
            if (model, "start", 0) not in done:
                runs.append(start)
                done[(model, "start", 0)] = start
    for seed in args.seeds:
        for model in args.models:
            todo = [plan for plan in args.plans if (model, plan, seed) not in done]
            for plan in todo:
                row = run(model, plan, seed, plan_budget["steps"][plan], ks, args)
                trunk = row.pop("trunk")
                row["trunk_identical"] = set(trunk) == set(starts[model]) and all(
                    torch.equal(trunk[k], starts[model][k]) for k in trunk
                )
                runs.append(row)
                save()
    save()
    print(f"wrote {RESULTS / args.name}.md")


if __name__ == "__main__":
    main()
