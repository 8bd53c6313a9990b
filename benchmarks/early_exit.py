"""Early exit that saves real time (issue 5): every speed figure is a ratio measured within this run.

1. **Routed inference against the full model**: wall time of teacher-forced scoring (every
   token's NLL) with ``routed_forward`` (exited tokens skip queries and MLPs, and attention
   where few continue; deeper layers compute only their keys and values) against the full
   model, beside the FLOPs ratio of everything that runs, at the research size (d_model 64,
   WikiText-2's 33,279 words: the head dominates) and where layers dominate (d_model 512, 8
   layers, exit after layer 4). Also the "simulated" routing that evaluation uses (every layer
   for every token), and, on a trained model, the PPL difference between skipping with state
   propagation and the simulated routing.
2. **Generation**: tokens/s of ``generate`` with early exit against our full-depth generation
   and Hugging Face ``transformers`` GPT-2 with the same sizes and a KV cache (random weights).
3. **Training throughput**: our model against GPT-2 with the same sizes, data and batch, a
   plain loop for both (target: at least 1.0).
4. **Peak memory** of deep supervision with 4 exits against standard training at 33,279 words
   (target: at most 1.25x), with the lean (chunked) exit loss and with the plain one.
5. **Learned confidence against max-prob**: routed PPL against the FLOPs ratio on WikiText-2
   valid, for a model trained here with an exit after layer 2 of 4.

    python -m benchmarks.early_exit
    python -m benchmarks.early_exit --quick     # smaller repetition counts
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import DEFAULT_DATA, RESULTS, peak_memory_during, quiet_trainer, summary, write_results
from lego_lightning import ExitTransformer, Stage, SupervisedExitLM, TransformerConfig
from lego_lightning.callbacks import ExitClassifierTraining
from lego_lightning.data import TextDataModule
from lego_lightning.decoding import generate
from lego_lightning.evaluation import collect_exit_outputs, routed_metrics, threshold_sweep
from lego_lightning.model import flops
from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.early_exit import routed_forward
from lego_lightning.model.exit_classifier import ExitClassifier

WIKITEXT_VOCAB = 33_279
SIZES: dict[str, dict[str, Any]] = {
    "research": dict(d_model=64, n_heads=4, n_layers=4, exits=(2, 4), vocab=WIKITEXT_VOCAB, seq=32, batch=64),
    "layers_dominate": dict(d_model=512, n_heads=8, n_layers=8, exits=(4, 8), vocab=8192, seq=128, batch=8),
}


def build(size: str, seed: int = 0) -> ExitTransformer:
    s = SIZES[size]
    first, last = s["exits"]
    cfg = TransformerConfig(
        vocab_size=s["vocab"],
        n_layers=s["n_layers"],
        d_model=s["d_model"],
        n_heads=s["n_heads"],
        max_seq_len=max(s["seq"], 256),
        head_sharing="separate",
        stages=[Stage((1, first)), Stage((first + 1, last))],
    )
    torch.manual_seed(seed)
    return ExitTransformer(cfg).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_ratio(fn, baseline, repeats: int) -> tuple[float, float]:
    """Median of per-round ``fn`` time / ``baseline`` time, the two timed back to back in each round.

    Alternating keeps a change in the machine's load from landing on one side of the ratio only.
    Also returns the median time of ``fn``.
    """
    fn(), baseline()  # warm-up
    ratios, times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        baseline()
        mid = time.perf_counter()
        fn()
        end = time.perf_counter()
        ratios.append((end - mid) / (mid - start))
        times.append(end - mid)
    return statistics.median(ratios), statistics.median(times)


# ---------------------------------------------------------------------------------- 1. routed
@torch.no_grad()
def routed_inference(size: str, repeats: int) -> list[dict[str, Any]]:
    s = SIZES[size]
    model = build(size)
    classifier = ExitClassifier(s["d_model"], [s["exits"][0]]).eval()
    idx = torch.randint(0, s["vocab"], (s["batch"], s["seq"]))
    targets = torch.randint(0, s["vocab"], (s["batch"], s["seq"]))
    first, last = s["exits"]
    hidden = model.hidden_states(idx, [first])[first]

    def full_scores() -> torch.Tensor:  # teacher-forced scoring with the full model: every token's NLL
        logits = model(idx, [last])[last]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")

    confidences = {
        "max_prob": torch.softmax(model.head(first)(hidden), -1).amax(-1).flatten(),
        "learned": classifier(first, hidden).flatten(),
    }
    full = timed(lambda: model(idx, [last]), repeats)
    simulated = timed(lambda: model(idx), repeats)  # every layer for every token, every head
    # FLOPs count a softmax as 5 per logit against 2 x d_model for the head's matmul; time says otherwise
    # when d_model is small, because each pass over the (tokens x vocab) logits is bound by memory.
    shallow_logits = model.head(first)(hidden)
    head_s = timed(lambda: model.head(first)(hidden), repeats)
    max_prob_s = timed(lambda: get_confidence("max_prob")(shallow_logits), repeats)
    context = flops.mean_context(s["seq"])
    rows = []
    for name, conf in confidences.items():
        hidden_confidence = classifier if name == "learned" else None
        for leave in (0.25, 0.5, 0.75):
            threshold = torch.quantile(conf, 1 - leave).item()
            out = routed_forward(model, idx, threshold, hidden_confidence=hidden_confidence)
            measured = (out.exit_position == 0).float().mean().item()
            wall_ratio, wall = timed_ratio(
                lambda t=threshold, hc=hidden_confidence: routed_forward(
                    model, idx, t, targets=targets, hidden_confidence=hc
                ),
                full_scores,
                repeats,
            )
            flops_ratio = flops.routed_flops_ratio(model.config, {first: measured, last: 1 - measured}, context, name)
            rows.append(
                {
                    "size": size,
                    "confidence": name,
                    "leave_first": measured,
                    "full_s": full,
                    "simulated_s": simulated,
                    "routed_s": wall,
                    "wall_ratio": wall_ratio,
                    "flops_ratio": flops_ratio,
                    "saving_realised": (1 - wall_ratio) / (1 - flops_ratio) if flops_ratio < 1 else None,
                    "max_prob_over_head_time": max_prob_s / head_s,
                    "max_prob_over_head_flops": get_confidence("max_prob").flops_per_element / (2 * s["d_model"]),
                }
            )
    return rows


# ------------------------------------------------------------------------------ 2. generation
@torch.no_grad()
def generation(repeats: int, new_tokens: int) -> list[dict[str, Any]]:
    """Tokens/s at batch 1 and 8: full depth, early exit at a few thresholds, and transformers GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SIZES["layers_dominate"]
    model = build("layers_dominate")
    first = s["exits"][0]
    classifier = ExitClassifier(s["d_model"], [first]).eval()
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=s["vocab"], n_positions=256, n_embd=s["d_model"], n_layer=s["n_layers"], n_head=s["n_heads"]
        )
    ).eval()
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, s["vocab"], (batch, 16))
        confidence = classifier(first, model.hidden_states(prompt, [first])[first]).flatten()
        runs: dict[str, Any] = {"ours, full depth": lambda p=prompt: generate(model, p, new_tokens)}
        for quantile in (0.5, 0.1):
            threshold = torch.quantile(confidence, quantile).item()
            runs[f"ours, early exit, threshold at the {quantile:.0%} quantile"] = lambda p=prompt, t=threshold: (
                generate(model, p, new_tokens, t, hidden_confidence=classifier)
            )
        runs["transformers GPT-2, KV cache"] = lambda p=prompt: gpt2.generate(
            p,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            attention_mask=torch.ones_like(p),
        )
        base = None
        for name, fn in runs.items():
            seconds = timed(fn, repeats)
            tokens_per_s = batch * new_tokens / seconds
            base = base or tokens_per_s
            row = {
                "batch": batch,
                "generator": name,
                "tokens_per_s": tokens_per_s,
                "vs_ours_full_depth": tokens_per_s / base,
            }
            if "early exit" in name:
                row["leave_first"] = (fn().exit_position == 0).float().mean().item()
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------- 3. training
def training_throughput(repeats: int, steps: int) -> list[dict[str, Any]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    rows = []
    for size in ("research", "layers_dominate"):
        s = SIZES[size]
        torch.manual_seed(0)
        ours = SupervisedExitLM(
            vocab_size=s["vocab"],
            n_layers=s["n_layers"],
            d_model=s["d_model"],
            n_heads=s["n_heads"],
            max_seq_len=256,
            tie_embeddings=True,
        )
        gpt2 = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=s["vocab"],
                n_positions=256,
                n_embd=s["d_model"],
                n_layer=s["n_layers"],
                n_head=s["n_heads"],
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
        batches = [torch.randint(0, s["vocab"], (s["batch"], s["seq"] + 1)) for _ in range(steps)]
        opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
        opt_gpt2 = torch.optim.AdamW(gpt2.parameters(), lr=1e-4)
        ratios = []
        for _ in range(repeats):
            t_ours = _once(_ours_steps, ours, opt_ours, batches, s["n_layers"])
            t_gpt2 = _once(_gpt2_steps, gpt2, opt_gpt2, batches)
            ratios.append(t_gpt2 / t_ours)
        tokens = steps * s["batch"] * s["seq"]
        rows.append(
            {
                "size": size,
                "ours_params": sum(p.numel() for p in ours.parameters()),
                "gpt2_params": sum(p.numel() for p in gpt2.parameters()),
                "tokens_per_step": s["batch"] * s["seq"],
                "ratio": summary(ratios),
                "ratio_median": statistics.median(ratios),
                "tokens": tokens,
            }
        )
    return rows


def _ours_steps(model: SupervisedExitLM, optimizer: Any, batches: list[torch.Tensor], exit_layer: int) -> None:
    for b in batches:
        loss = model.exit_losses(b[:, :-1], b[:, 1:])[exit_layer]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _gpt2_steps(model: Any, optimizer: Any, batches: list[torch.Tensor]) -> None:
    for b in batches:
        loss = model(input_ids=b[:, :-1], labels=b[:, :-1]).loss  # GPT-2 shifts the labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _once(fn, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- 4. memory
def memory_child(method: str, chunk: str) -> None:
    """In a fresh process: peak memory of 3 training steps, printed as JSON."""
    stages = [Stage((1, 4))] if method == "standard" else [Stage((k, k), 0.25) for k in range(1, 5)]
    torch.manual_seed(0)
    module = SupervisedExitLM(
        vocab_size=WIKITEXT_VOCAB,
        n_layers=4,
        d_model=64,
        n_heads=4,
        max_seq_len=32,
        stages=stages,
        loss_chunk_size=None if chunk == "plain" else 1024,
    )
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batches = [torch.randint(0, WIKITEXT_VOCAB, (64, 33)) for _ in range(3)]

    def train() -> None:
        for b in batches:
            losses = module.exit_losses(b[:, :-1], b[:, 1:])
            loss = sum(
                w * losses[k] for k, w in zip(module.config.exit_layers, module.exit_loss_weights) if k in losses
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    print(json.dumps({"peak_bytes": peak_memory_during(train)}))


def memory() -> list[dict[str, Any]]:
    rows = []
    for chunk in ("lean", "plain"):
        peaks = {}
        for method in ("standard", "deep_supervision_4"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.early_exit", "--memory-child", method, chunk],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20
        rows.append(
            {
                "loss": chunk,
                "standard_mib": peaks["standard"],
                "ds4_mib": peaks["deep_supervision_4"],
                "ratio": peaks["deep_supervision_4"] / peaks["standard"],
            }
        )
    return rows


# ------------------------------------------------------------------------ 5. learned vs max-prob
def learned_against_max_prob(data: Path, vocab_cap: int, steps: int) -> dict[str, Any]:
    dm = TextDataModule(
        path=str(data),
        seq_len=32,
        batch_size=64,
        max_train_samples=10_000,
        max_val_samples=1000,
        max_vocab_size=vocab_cap,
    )
    L.seed_everything(0, verbose=False)
    module = SupervisedExitLM(
        vocab_size=dm.vocab_size,
        n_layers=4,
        d_model=64,
        n_heads=4,
        max_seq_len=32,
        head_sharing="separate",
        stages=[Stage((1, 2), 0.5), Stage((3, 4), 0.5)],
        confidence="learned",
    )
    training = ExitClassifierTraining(target="consistency", epochs=1)
    quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=[training]).fit(module, dm)
    learned = collect_exit_outputs(module, dm.val_dataloader())
    max_prob = collect_exit_outputs(module, dm.val_dataloader(), confidence="max_prob")
    curves = {}
    for name, outputs in (("learned", learned), ("max_prob", max_prob)):
        thresholds = sorted({0.0, 1.0, *torch.quantile(outputs.confidence[0], torch.linspace(0, 1, 21)).tolist()})
        curves[name] = threshold_sweep(outputs, module.config, thresholds, name)
    # State propagation against the simulated routing, on this trained model.
    propagation = []
    for leave in (0.25, 0.5, 0.75):
        threshold = torch.quantile(max_prob.confidence[0], 1 - leave).item()
        simulated = routed_metrics(max_prob, threshold, module.config, "max_prob")["ppl"]
        skip_nll = []
        for b in dm.val_dataloader():
            skip_nll.append(routed_forward(module.model, b["input_ids"], threshold, targets=b["targets"]).nll.flatten())
        skipped = torch.exp(torch.cat(skip_nll).mean()).item()
        propagation.append(
            {
                "leave_first": leave,
                "simulated_ppl": simulated,
                "skipping_ppl": skipped,
                "difference": skipped / simulated - 1,
            }
        )
    return {
        "classifier": training.stats,
        "curves": curves,
        "propagation": propagation,
        "vocab_size": dm.vocab_size,
        "steps": steps,
        "exit_ppl": {k: learned.exit_ppl(k) for k in learned.exit_layers},
    }


def plot_curves(curves: dict[str, list[dict[str, Any]]], path: Path) -> bool:
    try:
        from lego_lightning import viz

        named = {f"confidence: {name}": points for name, points in curves.items()}
        viz.save(viz.sweep_curve(named, title="Exit after layer 2 of 4, WikiText-2 valid"), path)
    except ImportError:
        return False
    return True


def markdown(results: dict[str, Any], args: argparse.Namespace, has_plot: bool) -> str:
    lines = [
        "# Early exit that saves real time",
        "",
        "Every speed figure is a ratio of two things measured in this run (median of repeats); the machine is "
        "shared, so absolute times are for orientation only.",
        "",
        "## Routed inference against the full model",
        "",
        "Teacher-forced scoring (every token's NLL) of one batch: `routed_forward` (exited tokens give only keys and "
        "values to deeper layers) against the full model's forward to its last exit and its cross-entropy, the two "
        "timed back to back in each round (wall ratio: median of the per-round ratios). FLOPs ratio: everything "
        "that runs, as `lego_lightning.model.flops` counts it. Realised saving: (1 - wall ratio) / (1 - FLOPs "
        "ratio), the share of the FLOPs saving that shows up as time (target at the larger size: at least 0.85). "
        "Simulated routing is what validation uses (its column: a forward through every layer and head against "
        "the full forward to the last exit).",
        "",
        "| size | confidence | tokens leaving early | wall ratio | FLOPs ratio | realised saving | simulated / full |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["routed"]:
        if r["saving_realised"] is None:
            realised = "n/a (costs more)"
        elif r["flops_ratio"] > 0.95:  # a share of a saving this small is noise divided by almost nothing
            realised = f"n/a (saves {1 - r['flops_ratio']:.1%} of FLOPs)"
        else:
            realised = f"{r['saving_realised']:.2f}"
        lines.append(
            f"| {r['size']} | {r['confidence']} | {r['leave_first']:.0%} | {r['wall_ratio']:.3f} "
            f"| {r['flops_ratio']:.3f} | {realised} | {r['simulated_s'] / r['full_s']:.2f} |"
        )
    lines += [
        "",
        "## Generation (d_model 512, 8 layers, exit after layer 4, 16-token prompt, learned confidence)",
        "",
        "At decode time every matrix product is tiny and bound by reading its weights, so a sequence that leaves at "
        "layer 4 skips most of the bytes of layers 5-8 (it still computes their key and value). In a batch, a layer "
        "still runs for the rows that continue, so the saving shrinks as rows disagree.",
        "",
        "| batch | generator | tokens leaving at layer 4 | tokens/s | against our full depth |",
        "|---|---|---|---|---|",
    ]
    for r in results["generation"]:
        left = f"{r['leave_first']:.0%}" if "leave_first" in r else ""
        lines.append(
            f"| {r['batch']} | {r['generator']} | {left} | {r['tokens_per_s']:.0f} | {r['vs_ours_full_depth']:.2f} |"
        )
    lines += [
        "",
        "## Training throughput against transformers GPT-2 (same sizes, data, batch; plain loops)",
        "",
        "| size | our params | GPT-2 params | tokens/step | GPT-2 time / our time, per repeat | median |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["training"]:
        per = ", ".join(f"{v:.3f}" for v in r["ratio"]["values"])
        lines.append(
            f"| {r['size']} | {r['ours_params']:,} | {r['gpt2_params']:,} | {r['tokens_per_step']} | {per} "
            f"| {r['ratio_median']:.3f} |"
        )
    lines += [
        "",
        "## Peak memory, deep supervision (4 exits) against standard, vocabulary 33,279, batch 64 x 32",
        "",
        "| exit loss | standard MiB | deep supervision MiB | ratio |",
        "|---|---|---|---|",
    ]
    for r in results["memory"]:
        lines.append(f"| {r['loss']} | {r['standard_mib']:.0f} | {r['ds4_mib']:.0f} | {r['ratio']:.2f} |")
    ll = results["learned"]
    lines += [
        "",
        f"## Learned confidence against max-prob (vocabulary {ll['vocab_size']}, {ll['steps']} training steps)",
        "",
        f"Exit PPL: {', '.join(f'layer {k}: {v:.1f}' for k, v in ll['exit_ppl'].items())}. Classifier (consistency "
        f"with the deep exit): {json.dumps(ll['classifier'])}.",
        "",
    ]
    lines.append(f"![curves]({args.name}_curves.png)" if has_plot else "(matplotlib missing: no image)")
    lines += ["", "| FLOPs ratio <= | best routed PPL, max_prob | best routed PPL, learned |", "|---|---|---|"]
    for budget in (0.8, 0.9, 1.0, 1.1):
        best = {
            n: min((p["ppl"] for p in c if p["flops_ratio"] <= budget), default=float("nan"))
            for n, c in ll["curves"].items()
        }
        lines.append(f"| {budget} | {best['max_prob']:.2f} | {best['learned']:.2f} |")
    lines += [
        "",
        "State propagation against simulated routing on this trained model (max_prob):",
        "",
        "| tokens leaving early | simulated PPL | skipping PPL | difference |",
        "|---|---|---|---|",
    ]
    for r in ll["propagation"]:
        lines.append(
            f"| {r['leave_first']:.0%} | {r['simulated_ppl']:.2f} | {r['skipping_ppl']:.2f} | {r['difference']:+.2%} |"
        )
    big = [
        r
        for r in results["routed"]
        if r["size"] == "layers_dominate" and r["saving_realised"] is not None and r["flops_ratio"] <= 0.95
    ]
    small = [r for r in results["routed"] if r["size"] == "research"]
    lines += ["", "## What this shows", ""]
    if small:
        worst = max(r["flops_ratio"] for r in small if r["confidence"] == "max_prob")
        lines.append(
            f"- At the research size the head dominates: with max-prob confidence the routed model runs up to "
            f"{worst:.0%} of the full model's FLOPs (every token pays the shallow head and its softmax), so early exit "
            "costs more than it saves there; the learned classifier removes the shallow head for tokens that continue."
        )
        r = small[0]
        lines.append(
            f"- Wall time exceeds FLOPs there because the logits are wide and d_model is small: computing max-prob "
            f"from the shallow logits takes {r['max_prob_over_head_time']:.2f}x the time of the head's matrix product, "
            f"though it is {r['max_prob_over_head_flops']:.0%} of its FLOPs. Every pass over the tokens x vocabulary "
            "logits (the confidence, the softmax of each exit's scores) is bound by "
            "memory, and FLOPs do not count memory traffic."
        )
    for name in ("learned", "max_prob"):
        realised = [r["saving_realised"] for r in big if r["confidence"] == name]
        if not realised:
            continue
        verdict = "meets the 0.85 target" if min(realised) >= 0.85 else "does not meet the 0.85 target everywhere"
        line = (
            f"- Where layers dominate, with {name} confidence the realised share of the FLOPs saving is "
            f"{min(realised):.2f} to {max(realised):.2f}: it {verdict}."
        )
        if name == "max_prob":
            line += (
                " Every token runs the shallow head and a softmax over the vocabulary, and each pass over those "
                "logits is bound by memory, which FLOPs do not count."
            )
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--vocab-cap", type=int, default=8192, help="for part 5 (training on WikiText-2)")
    parser.add_argument("--train-steps", type=int, default=600, help="for part 5")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="early_exit")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    repeats = 2 if args.quick else 7
    results = {
        "routed": routed_inference("research", repeats) + routed_inference("layers_dominate", repeats),
        "generation": generation(repeats=1 if args.quick else 3, new_tokens=16 if args.quick else 64),
        "training": training_throughput(repeats=1 if args.quick else 3, steps=2 if args.quick else 8),
        "memory": memory(),
        "learned": learned_against_max_prob(args.data, args.vocab_cap, 20 if args.quick else args.train_steps),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    has_plot = plot_curves(results["learned"]["curves"], RESULTS / f"{args.name}_curves.png")
    rows = [{"part": part, **row} for part in ("routed", "generation", "training", "memory") for row in results[part]]
    write_results(args.name, rows, markdown(results, args, has_plot), extra={"learned": results["learned"]})


if __name__ == "__main__":
    main()
