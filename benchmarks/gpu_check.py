"""The check to run when a task is lent a CUDA GPU: training speed and memory, and generation speed (issue 28).

On one GPU, in under 8 minutes:

* ``configs/bpe/standard.yaml`` trained for ``--steps`` steps (WikiText-2, BPE 8K) at
  ``bf16-mixed`` and ``32-true``, eager and compiled (``torch.compile`` of the loss): tokens per
  second after ``--warmup`` steps, and peak memory (``torch.cuda.max_memory_allocated``);
* deep supervision (``configs/bpe/deep_supervision.yaml``) beside standard: its peak memory and
  speed, bf16-mixed, eager;
* generation of ``configs/bpe/layerskip.yaml``'s model (the trained one of
  ``benchmarks/layerskip.py`` when its folder is there, else freshly initialised, where drafts
  are rarely kept) at full depth, routed (max-prob 0.5) and self-speculative (draft exit 4,
  K = 4), at batch 1 and 8: tokens per second, as a ratio over full depth in the same run;
* with two GPUs or more, ``configs/bpe/standard.yaml`` on 2 processes (DDP): its tokens per second.

It writes ``benchmarks/results/gpu_check.{md,json}``. Without CUDA it says so, exits with status 1
and writes nothing. Nothing in ``make test`` runs it. ``--smoke`` runs every path on the CPU in a
few steps and prints the tables, writing nothing: a check of the script itself.

    python -m benchmarks.gpu_check          # or: make gpu-check
    python -m benchmarks.gpu_check --smoke --steps 6 --warmup 2 --new-tokens 8
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import DEFAULT_DATA, REPO, RESULTS, config_cli, write_results

LAYERSKIP_MODEL = REPO / "benchmarks" / "checkpoints" / "layerskip" / "layerskip_seed0"
# "cuda"; "cpu" for --smoke, which runs every path on the CPU in a few steps to find what breaks.
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


class StepClock(Callback):
    """Seconds from the end of step ``warmup`` to the end of the last step, CUDA synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        sync()
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.end, self.steps = time.perf_counter(), trainer.global_step - self.warmup


def train(config: str, precision: str, compiled: bool, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        cli = config_cli(
            config, args.data, 0, work, "--trainer.accelerator", "gpu" if DEVICE == "cuda" else "cpu",
            "--trainer.devices", "1",
            "--trainer.precision", precision, "--trainer.max_steps", str(args.steps), "--trainer.max_epochs", "-1",
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0", "--trainer.callbacks=[]",
            "--trainer.enable_checkpointing", "false",
        )  # fmt: skip
        clock = StepClock(args.warmup)
        cli.trainer.callbacks.append(clock)
        if compiled:
            cli.model.exit_losses = torch.compile(cli.model.exit_losses)
        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        tokens = cli.datamodule.batch_size * cli.datamodule.seq_len * clock.steps
    return {
        "kind": "training", "config": config, "precision": precision, "compiled": compiled, "steps": args.steps,
        "tokens_per_s": tokens / (clock.end - clock.start), "peak_memory_gb": peak_memory_gb(),
    }  # fmt: skip


@torch.no_grad()
def generation(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lego_lightning import ExitTransformer
    from lego_lightning.decoding import generate

    if (LAYERSKIP_MODEL / "config.json").is_file():
        model, source = ExitTransformer.from_pretrained(LAYERSKIP_MODEL), str(LAYERSKIP_MODEL.relative_to(REPO))
    else:
        with tempfile.TemporaryDirectory() as work:
            model = config_cli("bpe/layerskip", args.data, 0, work).model.model
        source = "configs/bpe/layerskip.yaml, freshly initialised"
    model = model.to(DEVICE).eval()
    rows = []
    settings = {"full depth": {}, "routed (max-prob 0.5)": {"threshold": 0.5},
                "self-speculative (exit 4, K=4)": {"draft_exit": 4, "num_speculations": 4}}  # fmt: skip
    for batch in (1, 8):
        prompt = torch.randint(1, model.config.vocab_size, (batch, 32), device=DEVICE)
        times = {}
        for name, kwargs in settings.items():
            generate(model, prompt, 8, **kwargs)  # warm-up
            best = float("inf")
            for _ in range(3):
                sync()
                start = time.perf_counter()
                generate(model, prompt, args.new_tokens, **kwargs)
                sync()
                best = min(best, time.perf_counter() - start)
            times[name] = best
        for name, seconds in times.items():
            rows.append({"kind": "generation", "model": source, "batch": batch, "setting": name,
                         "tokens_per_s": batch * args.new_tokens / seconds,
                         "over_full_depth": times["full depth"] / seconds})  # fmt: skip
    return rows


def ddp(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "lego_lightning.cli", "fit", "--config", str(REPO / "configs/bpe/standard.yaml"),
               "--data.path", str(args.data), "--trainer.accelerator", "gpu", "--trainer.devices", "2",
               "--trainer.strategy", "ddp", "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
               "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks=[]",
               "--trainer.default_root_dir", work]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    return {"kind": "ddp", "devices": 2, "steps": args.steps, "returncode": proc.returncode, "wall_s": seconds,
            "tail": proc.stderr[-500:] if proc.returncode else ""}  # fmt: skip


def report(rows: list[dict[str, Any]]) -> str:
    out = ["# GPU check", "", "## Training (tokens/s after the warm-up steps, peak memory)", "",
           "| config | precision | compiled | tokens/s | peak memory (GB) |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["kind"] == "training":
            out.append(f"| {r['config']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | "
                       f"{r['tokens_per_s']:,.0f} | {r['peak_memory_gb']:.2f} |")  # fmt: skip
    out += ["", "## Generation (same run; ratio over full depth)", "",
            "| batch | decoding | tokens/s | over full depth |", "|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if r["kind"] == "generation":
            out.append(f"| {r['batch']} | {r['setting']} | {r['tokens_per_s']:,.0f} | {r['over_full_depth']:.2f}x |")
    source = next((r["model"] for r in rows if r["kind"] == "generation"), None)
    if source:
        out += ["", f"Generation model: {source}."]
    for r in rows:
        if r["kind"] == "ddp":
            status = "ran" if r["returncode"] == 0 else f"failed (exit {r['returncode']})"
            out += ["", f"DDP on 2 GPUs: {r['steps']} steps {status} in {r['wall_s']:.0f} s of wall time."]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50, help="steps before the clock starts (compilation, caches)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--smoke", action="store_true", help="every path on the CPU, printed, nothing written")
    args = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing measured, nothing written",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
    rows = [
        train("bpe/standard", "bf16-mixed", False, args),
        train("bpe/standard", "bf16-mixed", True, args),
        train("bpe/standard", "32-true", False, args),
        train("bpe/standard", "32-true", True, args),
        train("bpe/deep_supervision", "bf16-mixed", False, args),
        *generation(args),
    ]
    if torch.cuda.device_count() >= 2:
        rows.append(ddp(args))
    if args.smoke:
        print(report(rows))
        return
    write_results("gpu_check", rows, report(rows))
    print(f"wrote {RESULTS / 'gpu_check'}.md")


if __name__ == "__main__":
    main()
