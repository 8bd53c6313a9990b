"""Exits on a pretrained model (issue 18): our converted GPT-2 against transformers' own, and early exit on it.

A GPT-2 checkpoint with 124M's dimensions and random weights (speed does not depend on them),
built and saved by ``transformers``, then converted by ``ExitTransformer.from_pretrained`` with
an exit after layer 4, 6 or 8 sharing the final norm and LM head. Every speed is a ratio of two
things timed in the same run, alternated round by round.

1. **Training step** (plain loop, one fixed batch, AdamW): ours over ``GPT2LMHeadModel``.
2. **Scoring** (teacher-forced, ``routed_forward``): thresholds at the quantiles of the first
   exit's confidence that send 25, 50 or 75% of tokens out there, over our full depth. Twice:
   with max-prob confidence (every token runs the exit head) and with an exit classifier of
   random weights (only leaving tokens run it; its cost does not depend on its weights).
3. **Generation** (KV cache, sampled at ``--temperature`` 1 with a fixed seed per row) at batch 1
   and 8: the same exits and fractions over our full depth, each threshold a quantile of the first
   exit's confidence on the tokens full-depth decoding samples (the share that leaves the routed
   run is measured too), and ``transformers``' own sampled ``generate`` over ours at full depth.
   Sampled, not greedy: greedy decoding on random weights falls into loops whose confidence no
   calibration text predicts (a first run at f4cafd8 sent 69-100% out where 25-75% was meant);
   sampled text from near-uniform random-weight distributions is alike at every exit, so a
   threshold calibrated on it sends the planned share out. ``--temperature 0`` decodes greedily.

    python -m benchmarks.pretrained                    # GPT-2 124M sizes: about 26 minutes on 2 CPU cores
    python -m benchmarks.pretrained --d-model 128 --n-layers 12 --n-heads 4 --vocab 4096   # a quick look
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch

from benchmarks.common import machine, write_results
from benchmarks.early_exit import timed_ratio
from lego_lightning import ExitTransformer
from lego_lightning.decoding import generate
from lego_lightning.model.confidence import get_confidence
from lego_lightning.model.early_exit import routed_forward
from lego_lightning.model.exit_classifier import ExitClassifier

FRACTIONS = (0.25, 0.5, 0.75)
EXITS = (4, 6, 8)


def gpt2(args: argparse.Namespace) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=1024, n_embd=args.d_model, n_layer=args.n_layers, n_head=args.n_heads,
        attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=args.vocab - 1, eos_token_id=args.vocab - 1,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def train_step(model: torch.nn.Module, logits_of: Any, x: torch.Tensor) -> Any:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        logits = logits_of(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def confidences(
    model: ExitTransformer, classifier: ExitClassifier | None, tokens: torch.Tensor, exit_layer: int
) -> torch.Tensor:
    """Each token's confidence at ``exit_layer``: max-prob, or ``classifier``'s from the hidden state."""
    with torch.no_grad():
        hidden = model.hidden_states(tokens, [exit_layer])[exit_layer]
        if classifier is not None:
            return classifier(exit_layer, hidden).flatten()
        return get_confidence("max_prob")(model.head(exit_layer)(hidden)).flatten()


def quantile(confidence: torch.Tensor, fraction: float) -> float:
    """The threshold above which ``fraction`` of these confidences lie."""
    return torch.quantile(confidence.float(), 1 - fraction).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--n-heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0, help="generation's; 0 decodes greedily")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--name", default="pretrained")
    args = parser.parse_args()
    theirs = gpt2(args)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        full = ExitTransformer.from_pretrained(folder)
        by_exit = {e: ExitTransformer.from_pretrained(folder, exits=[e]).eval() for e in EXITS}
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    # top_k 0: transformers samples from the top 50 tokens unless told otherwise; ours from all of them
    decoding = {"max_new_tokens": args.new_tokens, "temperature": args.temperature, "seed": 0}
    sampled = {"do_sample": True, "temperature": args.temperature, "top_k": 0} if args.temperature else {}

    # 1. training step
    ours_step = train_step(full.train(), lambda idx: full(idx)[args.n_layers], x)
    theirs_step = train_step(theirs.train(), lambda idx: theirs(idx).logits, x)
    ratio, seconds = timed_ratio(theirs_step, ours_step, args.rounds)
    rows.append({"part": "training", "what": "transformers GPT2LMHeadModel over ours", "time_ratio": ratio,
                 "ours_s": seconds / ratio, "theirs_s": seconds})  # fmt: skip
    full.eval()
    theirs.eval()

    # 2. scoring and 3. generation, with max-prob confidence and with an exit classifier (random
    # weights: what it costs does not depend on them, and its thresholds are quantiles like max-prob's)
    with torch.no_grad():
        generated = {b: generate(full, x[:b, :16], **decoding).tokens for b in (1, args.batch)}
        for exit_layer in EXITS:
            model = by_exit[exit_layer]
            torch.manual_seed(exit_layer)
            classifiers = {"max_prob": None, "learned": ExitClassifier(args.d_model, [exit_layer]).eval()}
            for confidence, classifier in classifiers.items():
                routing = {"confidence": confidence, "hidden_confidence": classifier}
                scored_confidence = confidences(model, classifier, x, exit_layer)
                generated_confidence = {  # at the positions whose next token was generated
                    b: confidences(model, classifier, tokens[:, :-1], exit_layer).view(b, -1)[:, 15:]
                    for b, tokens in generated.items()
                }
                for fraction in FRACTIONS:
                    t = quantile(scored_confidence, fraction)
                    scored = routed_forward(model, x, t, **routing)
                    ratio, _ = timed_ratio(
                        lambda m=model, t=t, r=routing: routed_forward(m, x, t, **r), lambda: full(x), args.rounds
                    )
                    rows.append({"part": "scoring", "confidence": confidence, "exit": exit_layer, "fraction": fraction,
                                 "left_early": (scored.exit_position == 0).float().mean().item(),
                                 "time_ratio": ratio})  # fmt: skip
                    for batch in (1, args.batch):
                        prompt = x[:batch, :16]
                        t = quantile(generated_confidence[batch], fraction)
                        went = generate(model, prompt, threshold=t, **routing, **decoding)
                        ratio, seconds = timed_ratio(
                            lambda m=model, p=prompt, t=t, r=routing: generate(m, p, threshold=t, **r, **decoding),
                            lambda p=prompt: generate(full, p, **decoding),
                            args.rounds,
                        )
                        rows.append({"part": "generation", "confidence": confidence, "exit": exit_layer,
                                     "fraction": fraction, "batch": batch,
                                     "left_early": (went.exit_position == 0).float().mean().item(),
                                     "time_ratio": ratio,
                                     "tokens_per_s": batch * args.new_tokens / seconds})  # fmt: skip
        for batch in (1, args.batch):
            prompt = x[:batch, :16]
            mask = torch.ones_like(prompt)
            ratio, _ = timed_ratio(
                lambda p=prompt, m=mask: theirs.generate(
                    p, attention_mask=m, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                    pad_token_id=0, **(sampled or {"do_sample": False}),
                ),
                lambda p=prompt: generate(full, p, **decoding),
                args.rounds,
            )  # fmt: skip
            rows.append({"part": "generation", "what": "transformers generate over ours at full depth", "batch": batch,
                         "time_ratio": ratio})  # fmt: skip
    write_results(args.name, rows, report(rows, args), extra={"settings": vars(args), "machine": machine()})
    print(f"wrote benchmarks/results/{args.name}.md")


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    train = next(r for r in rows if r["part"] == "training")
    tables = {}
    for confidence in ("max_prob", "learned"):
        table = [
            "| exit after layer | tokens meant to leave | left (scoring) | scoring time ratio | generation batch 1 | "
            f"generation batch {args.batch} |",
            "|---|---|---|---|---|---|",
        ]
        for exit_layer in EXITS:
            for fraction in FRACTIONS:
                mine = [r for r in rows if (r.get("confidence"), r.get("exit"), r.get("fraction")) ==
                        (confidence, exit_layer, fraction)]  # fmt: skip
                s = next(r for r in mine if r["part"] == "scoring")
                g = {r["batch"]: r for r in mine if r["part"] == "generation"}
                cells = " | ".join(f"{g[b]['time_ratio']:.2f} ({g[b]['left_early']:.0%} left)" for b in (1, args.batch))
                table.append(
                    f"| {exit_layer} | {fraction:.0%} | {s['left_early']:.0%} | {s['time_ratio']:.2f} | {cells} |"
                )
        tables[confidence] = "\n".join(table)
    hf = [r for r in rows if r.get("what") == "transformers generate over ours at full depth"]
    return "\n\n".join(
        [
            "# Exits on a pretrained model (issue 18)",
            f"GPT-2 sizes d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocabulary "
            f"{args.vocab}, random weights, converted from a `transformers` checkpoint. Batch {args.batch} x "
            f"{args.seq_len}; generation of {args.new_tokens} tokens after a 16-token prompt, "
            + (f"sampled at temperature {args.temperature} (seed 0 + row)" if args.temperature else "greedy")
            + ". Each ratio is the "
            f"median over {args.rounds} rounds of two things timed back to back (below 1: faster than the baseline).",
            "## Training step",
            f"`GPT2LMHeadModel`'s step time over ours: **{train['time_ratio']:.2f}** (ours {train['ours_s']:.3f} s, "
            f"theirs {train['theirs_s']:.3f} s); above 1: ours is faster.",
            "## Scoring and generation with early exit, time over our full depth",
            "### Max-prob confidence\n\nEvery token that reaches the exit runs its head "
            f"({args.vocab:,} ways) and a softmax, whether it leaves or not.",
            tables["max_prob"],
            "### A learned exit classifier\n\nA layer norm and a dot product decide; only the tokens that leave "
            "run the exit's head (the classifier's weights are random: its cost does not depend on them).",
            tables["learned"],
            "`transformers`' `generate` (KV cache) time over ours at full depth: "
            + ", ".join(f"batch {r['batch']}: {r['time_ratio']:.2f}" for r in hf)
            + ".",
            "## Exits added to an existing checkpoint\n\nThe quality side of this issue (a `configs/standard.yaml` "
            "model exported, its exits EE-Tuned, against deep supervision from scratch) takes hours where this "
            "takes minutes, so it has its own script and results: `python -m benchmarks.exits_added`, "
            "[exits_added.md](exits_added.md).",
        ]
    )


if __name__ == "__main__":
    main()
