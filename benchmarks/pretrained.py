"""Exits on a pretrained model (issue 18): our converted GPT-2 against transformers' own, and early exit on it.

A GPT-2 checkpoint with 124M's dimensions and random weights (speed does not depend on them),
built and saved by ``transformers``, then converted by ``ExitTransformer.from_pretrained`` with
an exit after layer 4, 6 or 8 sharing the final norm and LM head. Every speed is a ratio of two
things timed in the same run, alternated round by round.

1. **Training step** (plain loop, one fixed batch, AdamW): ours over ``GPT2LMHeadModel``.
2. **Scoring** (teacher-forced, ``routed_forward``): thresholds at the quantiles of the first
   exit's max-prob confidence that send 25, 50 or 75% of tokens out there, over our full depth.
3. **Generation** (KV cache, sampled at ``--temperature`` 1 with a fixed seed per row) at batch 1
   and 8: the same exits and fractions over our full depth, each threshold a quantile of the first
   exit's confidence on the tokens full-depth decoding samples (the share that leaves the routed
   run is measured too), and ``transformers``' own sampled ``generate`` over ours at full depth.
   Sampled, not greedy: greedy decoding on random weights falls into loops whose confidence no
   calibration text predicts (a first run at f4cafd8 sent 69-100% out where 25-75% was meant);
   sampled text from near-uniform random-weight distributions is alike at every exit, so a
   threshold calibrated on it sends the planned share out. ``--temperature 0`` decodes greedily.

    python -m benchmarks.pretrained                    # GPT-2 124M sizes: about 15 minutes on 2 CPU cores
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
from lego_lightning.model.early_exit import generate, routed_forward

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


def threshold_for(model: ExitTransformer, x: torch.Tensor, exit_layer: int, fraction: float) -> float:
    """The max-prob confidence above which ``fraction`` of ``x``'s tokens leave at ``exit_layer``."""
    with torch.no_grad():
        confidence = model(x, [exit_layer])[exit_layer].softmax(-1).amax(-1).flatten()
    return torch.quantile(confidence.float(), 1 - fraction).item()


def generation_threshold(
    model: ExitTransformer, full: ExitTransformer, prompt: torch.Tensor, exit_layer: int, fraction: float, **decoding
) -> float:
    """The max-prob confidence above which ``fraction`` of the tokens that full-depth decoding
    produces after ``prompt`` would leave at ``exit_layer``: generated text is not the scored text,
    and a threshold from one sends another share of the other out."""
    tokens = generate(full, prompt, **decoding).tokens
    with torch.no_grad():
        logits = model(tokens[:, :-1], [exit_layer])[exit_layer][:, prompt.shape[1] - 1 :]
    return torch.quantile(logits.softmax(-1).amax(-1).flatten().float(), 1 - fraction).item()


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

    # 2. scoring and 3. generation
    with torch.no_grad():
        for exit_layer in EXITS:
            model = by_exit[exit_layer]
            for fraction in FRACTIONS:
                t = threshold_for(model, x, exit_layer, fraction)
                scored = routed_forward(model, x, t)
                left = (scored.exit_position == 0).float().mean().item()
                ratio, _ = timed_ratio(lambda m=model, t=t: routed_forward(m, x, t), lambda: full(x), args.rounds)
                rows.append({"part": "scoring", "exit": exit_layer, "fraction": fraction, "left_early": left,
                             "time_ratio": ratio})  # fmt: skip
                for batch in (1, args.batch):
                    prompt = x[:batch, :16]
                    t = generation_threshold(model, full, prompt, exit_layer, fraction, **decoding)
                    went = generate(model, prompt, threshold=t, **decoding)
                    ratio, seconds = timed_ratio(
                        lambda m=model, p=prompt, t=t: generate(m, p, threshold=t, **decoding),
                        lambda p=prompt: generate(full, p, **decoding),
                        args.rounds,
                    )
                    rows.append({"part": "generation", "exit": exit_layer, "fraction": fraction, "batch": batch,
                                 "left_early": (went.exit_position == 0).float().mean().item(), "time_ratio": ratio,
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
    table = [
        "| exit after layer | tokens meant to leave | left (scoring) | scoring time ratio | generation batch 1 | "
        f"generation batch {args.batch} |",
        "|---|---|---|---|---|---|",
    ]
    for exit_layer in EXITS:
        for fraction in FRACTIONS:
            mine = [r for r in rows if r.get("exit") == exit_layer and r.get("fraction") == fraction]
            s = next(r for r in mine if r["part"] == "scoring")
            g = {r["batch"]: r for r in mine if r["part"] == "generation"}
            cells = " | ".join(f"{g[b]['time_ratio']:.2f} ({g[b]['left_early']:.0%} left)" for b in (1, args.batch))
            table.append(f"| {exit_layer} | {fraction:.0%} | {s['left_early']:.0%} | {s['time_ratio']:.2f} | {cells} |")
    hf = [r for r in rows if r.get("what") == "transformers generate over ours at full depth"]
    return "\n\n".join(
        [
            "# Exits on a pretrained model (issue 18)",
            f"GPT-2 sizes d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocabulary "
            f"{args.vocab}, random weights, converted from a `transformers` checkpoint. Batch {args.batch} x "
            f"{args.seq_len}; generation of {args.new_tokens} tokens after a 16-token prompt, "
            + (f"sampled at temperature {args.temperature} (seed 0 + row)" if args.temperature else "greedy")
            + f". Each ratio is the "
            f"median over {args.rounds} rounds of two things timed back to back (below 1: faster than the baseline).",
            "## Training step",
            f"`GPT2LMHeadModel`'s step time over ours: **{train['time_ratio']:.2f}** (ours {train['ours_s']:.3f} s, "
            f"theirs {train['theirs_s']:.3f} s); above 1: ours is faster.",
            "## Scoring and generation with early exit, time over our full depth",
            "\n".join(table),
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
