"""The greedy tokens of every greedy setting of ``benchmarks/speculative.py``, hashed, to compare two commits.

For each model of the speculative benchmark, batch 1 and 8, full depth and every draft exit with
K 1-6 and adaptive drafting, the prompts are decoded greedily and the SHA-256 of all their tokens
is recorded. Run at two commits, the hashes say whether a change of the decoding code changed any
token of the committed results. The module uses nothing but ``generate`` and the speculative
benchmark's prompts, so it also runs at a commit older than itself (copy it there)::

    git worktree add /tmp/old b19f5bb && cp benchmarks/greedy_hashes.py /tmp/old/benchmarks/
    (cd /tmp/old && ln -s $PWD/benchmarks/checkpoints benchmarks/checkpoints;
     python -m benchmarks.greedy_hashes --name greedy_hashes_b19f5bb)
    python -m benchmarks.greedy_hashes --against greedy_hashes_b19f5bb     # here: about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_DATA, RESULTS, write_results
from benchmarks.speculative import MODELS, decode_all, load_prompts
from lego_lightning import ExitTransformer

FULL_DEPTH = "full depth"


def setting_name(draft_exit: int | None, k: int | None, threshold: float | None) -> str:
    if draft_exit is None:
        return FULL_DEPTH
    return f"exit {draft_exit}, K={k}" + ("" if threshold is None else f", max-prob >= {threshold}")


def tokens_hash(model: ExitTransformer, prompts: torch.Tensor, batch: int, new: int, **kwargs: Any) -> str:
    tokens = torch.cat([g.tokens for g in decode_all(model, prompts, batch, new, **kwargs)])
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--exits", type=int, nargs="+", default=list(range(1, 12)))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    parser.add_argument("--draft-thresholds", type=float, nargs="*", default=[0.1, 0.3])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--name", default="greedy_hashes")
    parser.add_argument("--against", default=None, help="results name of another commit's hashes to compare with")
    args = parser.parse_args()
    settings = [(None, None, None)] + [(e, k, None) for e in args.exits for k in args.ks]
    settings += [(e, 6, t) for e in args.exits for t in args.draft_thresholds]
    rows = []
    for name in args.models:
        model = ExitTransformer.from_pretrained(MODELS[name]).eval()
        prompts = load_prompts(MODELS[name], args.data, args.prompts, args.prompt_tokens)
        for batch in args.batches:
            for e, k, t in settings:
                kwargs = {} if e is None else {"draft_exit": e, "num_speculations": k, "draft_threshold": t}
                digest = tokens_hash(model, prompts, batch, args.new_tokens, **kwargs)
                rows.append({"model": name, "batch": batch, "setting": setting_name(e, k, t), "sha256": digest})
            print(f"{name} batch {batch}: done", flush=True)
    lines = [
        "# Greedy tokens of the speculative benchmark's settings, hashed",
        "",
        f"{args.prompts} prompts of {args.prompt_tokens} tokens from WikiText-2 valid, {args.new_tokens} new tokens, "
        f"models {args.models}, batch {args.batches}: full depth and every draft exit with K {args.ks} and "
        f"adaptive drafting (K ≤ 6, max-prob ≥ {args.draft_thresholds}), {len(rows)} settings.",
        "",
    ]
    for name in args.models:
        for batch in args.batches:
            part = {r["sha256"] for r in rows if (r["model"], r["batch"]) == (name, batch)}
            lines.append(f"- `{name}`, batch {batch}: {len(part)} distinct hash(es) over its settings "
                         "(1: every setting gave full depth's tokens).")  # fmt: skip
    extra: dict[str, Any] = {}
    if args.against:
        theirs = {(r["model"], r["batch"], r["setting"]): r["sha256"]
                  for r in json.loads((RESULTS / f"{args.against}.json").read_text())["rows"]}  # fmt: skip
        compared = [r for r in rows if (r["model"], r["batch"], r["setting"]) in theirs]
        differ = [r for r in compared if theirs[(r["model"], r["batch"], r["setting"])] != r["sha256"]]
        extra["against"] = {"name": args.against, "compared": len(compared), "differ": len(differ)}
        lines += ["", f"Against `{args.against}`: {len(compared)} settings compared, {len(differ)} differ."]
        lines += [f"- differs: `{r['model']}`, batch {r['batch']}, {r['setting']}" for r in differ]
    write_results(args.name, rows, "\n".join(lines), extra=extra)
    print("\n".join(lines[-3:]))


if __name__ == "__main__":
    main()
