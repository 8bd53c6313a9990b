"""Speed ratios, each measured within one run: Lightning against a plain loop, deep supervision against standard.

1. Training tokens/s of ``SupervisedExitLM`` under the Lightning Trainer against a plain
   PyTorch loop over the same model, data, loss code (``exit_losses``) and optimizer.
   Rounds alternate the two; the ratio of each round is reported and their median.
2. Deep supervision (3 exits, weights 1/3) against standard (one exit): step time, measured
   alternately in this process, and peak memory, each in a fresh subprocess (peak RSS during
   training minus RSS before the first step; on a GPU, ``torch.cuda.max_memory_allocated``).
   At the research size (WikiText-2 vocabulary of 33,279, d_model 64, 3 layers, batch 64 x 32)
   and at a size where layers weigh more (d_model 512, 8 heads, 8 layers, exits after layers
   3, 6 and 8).

    python -m benchmarks.speed
    python -m benchmarks.speed --rounds 1 --steps 6 --skip-large
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import DEFAULT_DATA, fmt, peak_memory_during, quiet_trainer, summary, write_results

SIZES: dict[str, dict[str, Any]] = {
    "research": dict(n_layers=3, d_model=64, n_heads=4, batch_size=64, ds_stages=[(1, 1), (2, 2), (3, 3)]),
    "large": dict(n_layers=8, d_model=512, n_heads=8, batch_size=16, ds_stages=[(1, 3), (4, 6), (7, 8)]),
}
SEQ_LEN = 32


def make_data(path: Path, batch_size: int, samples: int):
    from lego_lightning.data import TextDataModule

    dm = TextDataModule(
        path=str(path), seq_len=SEQ_LEN, batch_size=batch_size, max_train_samples=samples, shuffle=False
    )
    dm.setup("fit")
    return dm


def make_model(size: str, method: str, vocab_size: int, seed: int = 0):
    from lego_lightning import Stage, SupervisedExitLM

    spec = SIZES[size]
    if method == "standard":
        stages = [Stage((1, spec["n_layers"]))]
    else:
        stages = [Stage(layers, 1 / 3) for layers in spec["ds_stages"]]
    torch.manual_seed(seed)
    return SupervisedExitLM(
        vocab_size=vocab_size,
        n_layers=spec["n_layers"],
        d_model=spec["d_model"],
        n_heads=spec["n_heads"],
        max_seq_len=SEQ_LEN,
        stages=stages,
    )


def plain_loop(model, loader, steps: int, warmup: int) -> float:
    """Seconds for steps ``warmup..steps-1`` of a hand-written loop doing what ``training_step`` does."""
    optimizer = model.configure_optimizers()["optimizer"]
    weights = dict(zip(model.config.exit_layers, model.exit_loss_weights))
    model.train()
    start = None
    for step, batch in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        losses = model.exit_losses(batch["input_ids"], batch["targets"])
        loss = sum(weights[k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 == steps:
            break
    return time.perf_counter() - start


def lightning_loop(model, dm, steps: int, warmup: int, logger: bool) -> float:
    """The same window of steps under ``Trainer.fit``, timed from inside by a callback."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    class Window(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == warmup:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == steps:
                self.seconds = time.perf_counter() - self.start

    window = Window()
    with tempfile.TemporaryDirectory() as work:
        trainer = quiet_trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            limit_val_batches=0,
            logger=TensorBoardLogger(work) if logger else False,
            callbacks=[window],
            default_root_dir=work,
        )
        trainer.fit(model, dm)
    return window.seconds


def trainer_vs_plain(data: Path, rounds: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    for size, samples_per_step in (("research", SIZES["research"]["batch_size"]),):
        dm = make_data(data, samples_per_step, samples_per_step * (steps + 1))
        tokens = (steps - warmup) * samples_per_step * SEQ_LEN
        for logger in (False, True):
            ratios, plain_tps, lightning_tps = [], [], []
            for _ in range(rounds):
                plain = plain_loop(make_model(size, "standard", dm.vocab_size), dm.train_dataloader(), steps, warmup)
                light = lightning_loop(make_model(size, "standard", dm.vocab_size), dm, steps, warmup, logger)
                plain_tps.append(tokens / plain)
                lightning_tps.append(tokens / light)
                ratios.append(plain / light)
            rows.append(
                {
                    "comparison": "lightning_vs_plain",
                    "size": size,
                    "tensorboard_logger": logger,
                    "plain_tokens_per_s": summary(plain_tps),
                    "lightning_tokens_per_s": summary(lightning_tps),
                    "ratio": summary(ratios),
                    "ratio_median": statistics.median(ratios),
                }
            )
            print(rows[-1], flush=True)
    return rows


def memory_child(size: str, method: str, data: str, steps: int) -> None:
    """Run in a fresh process: print peak training memory (bytes) as JSON."""
    dm = make_data(Path(data), SIZES[size]["batch_size"], SIZES[size]["batch_size"] * steps)
    model = make_model(size, method, dm.vocab_size)
    loader = dm.train_dataloader()
    peak = peak_memory_during(lambda: plain_loop(model, loader, steps, warmup=0))
    print(json.dumps({"peak_bytes": peak}))


def deep_supervision_vs_standard(data: Path, sizes: list[str], rounds: int, steps: int, warmup: int):
    rows = []
    for size in sizes:
        bs = SIZES[size]["batch_size"]
        dm = make_data(data, bs, bs * (steps + 1))
        times: dict[str, list[float]] = {"standard": [], "deep_supervision": []}
        for _ in range(rounds):
            for method in times:
                model = make_model(size, method, dm.vocab_size)
                times[method].append(plain_loop(model, dm.train_dataloader(), steps, warmup) / (steps - warmup))
        memory = {}
        for method in times:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.speed", "--memory-child", size, method, "--data", str(data)],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
        ratios = [d / s for d, s in zip(times["deep_supervision"], times["standard"])]
        rows.append(
            {
                "comparison": "deep_supervision_vs_standard",
                "size": size,
                "vocab_size": dm.vocab_size,
                **{k: v for k, v in SIZES[size].items() if k != "ds_stages"},
                "ds_exit_layers": [b for _, b in SIZES[size]["ds_stages"]],
                "standard_step_s": summary(times["standard"]),
                "deep_supervision_step_s": summary(times["deep_supervision"]),
                "step_time_ratio": summary(ratios),
                "standard_peak_mib": memory["standard"] / 2**20,
                "deep_supervision_peak_mib": memory["deep_supervision"] / 2**20,
                "memory_ratio": memory["deep_supervision"] / memory["standard"],
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    trainer_rows = [r for r in rows if r["comparison"] == "lightning_vs_plain"]
    ds_rows = [r for r in rows if r["comparison"] == "deep_supervision_vs_standard"]
    lines = [
        "# Speed ratios",
        "",
        f"Every ratio is of two things measured in the same run ({args.rounds} alternating rounds, "
        f"{args.steps - args.warmup} timed steps after {args.warmup} warm-up steps). Absolute figures are "
        "for orientation only: the machine is shared and noisy.",
        "",
        "## Lightning Trainer against a plain PyTorch loop (target: at least 0.95)",
        "",
        "Same model (standard, 3 layers, d_model 64, WikiText-2 vocabulary), same batches (64 x 32), same loss code "
        "and AdamW groups. Ratio = plain seconds / Lightning seconds for the same steps.",
        "",
        "| TensorBoard logger | plain tokens/s | Lightning tokens/s | ratio per round | median ratio |",
        "|---|---|---|---|---|",
    ]
    for r in trainer_rows:
        per_round = ", ".join(f"{v:.3f}" for v in r["ratio"]["values"])
        lines.append(
            f"| {'on' if r['tensorboard_logger'] else 'off'} | {fmt(r['plain_tokens_per_s'], 0)} | "
            f"{fmt(r['lightning_tokens_per_s'], 0)} | {per_round} | {r['ratio_median']:.3f} |"
        )
    lines += [
        "",
        "## Deep supervision (3 exits) against standard",
        "",
        "Step time from the plain loop (forward, backward, AdamW step); peak memory from a fresh process per model "
        "(peak resident memory during training above what was resident before the first step, so it includes "
        "optimizer state, activations, logits and allocator slack).",
        "",
        "| size | exits | standard s/step | deep supervision s/step | step-time ratio | standard peak MiB "
        "| deep supervision peak MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ds_rows:
        size = f"d_model {r['d_model']}, {r['n_layers']} layers, vocab {r['vocab_size']}, batch {r['batch_size']}x32"
        cells = [
            size,
            str(r["ds_exit_layers"]),
            fmt(r["standard_step_s"], 3),
            fmt(r["deep_supervision_step_s"], 3),
            fmt(r["step_time_ratio"], 2),
            f"{r['standard_peak_mib']:.0f}",
            f"{r['deep_supervision_peak_mib']:.0f}",
            f"{r['memory_ratio']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    meets = all(r["ratio_median"] >= 0.95 for r in trainer_rows)
    medians = ", ".join(f"{r['ratio_median']:.3f}" for r in trainer_rows)
    lines += [
        "",
        "## What this shows",
        "",
        f"- The Lightning Trainer {'meets' if meets else 'does not meet'} the 0.95 target at the research size "
        f"(median ratios without and with the TensorBoard logger: {medians}).",
    ]
    for r in ds_rows:
        lines.append(
            f"- {r['size']} size: deep supervision takes {r['step_time_ratio']['mean']:.2f}x the step time and "
            f"{r['memory_ratio']:.2f}x the peak memory of standard training; each extra exit runs the "
            f"{r['vocab_size']}-word head forward and backward; the chunked exit loss keeps none of its logits."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("SIZE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--name", default="speed")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child, data=str(args.data), steps=4)
        return
    rows = trainer_vs_plain(args.data, args.rounds, args.steps, args.warmup)
    sizes = ["research"] if args.skip_large else ["research", "large"]
    ds_steps = {"research": args.steps, "large": max(args.warmup + 3, args.steps // 3)}
    for size in sizes:
        rows += deep_supervision_vs_standard(args.data, [size], args.rounds, ds_steps[size], args.warmup)
    path = write_results(args.name, rows, markdown(rows, args))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
