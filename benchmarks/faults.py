"""Fault matrix: real SIGKILLs of the real ``lego`` CLI, a full disk, and bad input, each with its verdict.

    python -m benchmarks.faults                      # everything (about 15 minutes on 2 CPU cores)
    python -m benchmarks.faults --only kills         # or disk, inputs

**Kills.** Each case runs ``lego fit`` as a subprocess with :class:`KillAt` among its
callbacks, which sends SIGKILL to its own process at one point of the run (nothing is flushed
or cleaned up: the process is gone), then resumes with ``--ckpt_path .../last.ckpt`` and
compares the end of the resumed run with an uninterrupted run of the same command: every
weight and optimizer tensor bit for bit, the step, the threshold and hard-token set (ASHEM),
every TensorBoard scalar, and the final table. Both configs keep their dropout (0.1).

**Full disk.** The log folder on a small tmpfs (needs ``mount``, so root): 40 MB under
``configs/standard.yaml`` at the research size, where one checkpoint does not fit, and a
tmpfs that holds two checkpoints but not a third. Each says what the run printed, which
checkpoint files are left and whether each loads, and whether a resume from what is left
works.

**Bad input.** Each case runs the CLI once and gets a verdict: ``clean error`` (non-zero
exit, the message once, no traceback), ``traceback``, or ``accepted`` (exit 0).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from benchmarks.common import DEFAULT_DATA, REPO, write_results
from lego_lightning.checkpoint_io import AtomicCheckpointIO, CheckpointError, read_checkpoint, temporary_path

KILL_POINTS = ("train_batch", "batch_start", "validation", "phase_switch", "checkpoint_write", "final_validation")


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _KillMidWrite(AtomicCheckpointIO):
    """The library's checkpoint writer, killed after half of the bytes of the checkpoint at ``step`` went to disk.

    The bytes go to the writer's own temporary file, exactly where a kill during a real write
    leaves them.
    """

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if checkpoint.get("global_step") == self.step:
            buffer = io.BytesIO()
            torch.save(checkpoint, buffer)
            data = buffer.getvalue()
            with temporary_path(Path(path)).open("wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            _die()
        super().save_checkpoint(checkpoint, path, storage_options)


class KillAt(Callback):
    """Sends SIGKILL to its own process at one point of a run.

    ``point``:
      * ``train_batch``: after the optimizer step that makes the global step ``step``;
      * ``batch_start``: when the batch of global step ``step + 1`` starts (after every
        checkpoint of step ``step`` is written);
      * ``validation``: after the first batch of the validation at global step ``step``;
      * ``phase_switch``: while the first checkpoint of phase 2 is being assembled (the phase
        change is done, nothing of it is on disk);
      * ``checkpoint_write``: half-way through writing the checkpoint of step ``step``;
      * ``final_validation``: during the evaluation the ``lego`` command runs after training.
    """

    def __init__(self, point: str, step: int = 0) -> None:
        if point not in KILL_POINTS:
            raise ValueError(f"KillAt.point={point!r} is not one of {KILL_POINTS}")
        self.point, self.step = point, step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.point == "checkpoint_write":
            trainer.strategy.checkpoint_io = _KillMidWrite(self.step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.point == "train_batch" and trainer.global_step == self.step:
            _die()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.point == "batch_start" and trainer.global_step == self.step:
            _die()

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.sanity_checking:
            return
        fitting = trainer.state.fn == "fit"
        if (self.point == "validation" and fitting and trainer.global_step == self.step) or (
            self.point == "final_validation" and not fitting
        ):
            _die()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.point == "phase_switch" and getattr(pl_module, "phase", 1) >= 2:
            _die()


# ------------------------------------------------------------------------------------ running lego
def lego(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``lego <args>`` in a subprocess from the repository root, this checkout importable (for :class:`KillAt`)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "default"}
    for launcher in ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(launcher, None)
    cmd = [sys.executable, "-m", "lego_lightning.cli", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def scenario_args(name: str, data: Path, logs: Path) -> list[str]:
    """A small run of a committed config on WikiText-2 that changes phase and writes step checkpoints."""
    common = [
        "--data.path",
        str(data),
        "--data.max_train_samples",
        "160",
        "--data.max_val_samples",
        "32",
        "--data.batch_size",
        "16",
        "--data.max_vocab_size",
        "2048",
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "2",
        "--checkpoint.every_n_train_steps",
        "4",
    ]
    if name == "standard":
        return ["fit", "--config", "configs/standard.yaml", *common, "--trainer.max_epochs", "3"]
    if name == "standard-ddp":  # each of 2 CPU processes takes every other batch: 5 steps per epoch
        ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
        return [*scenario_args("standard", data, logs), *ddp]
    return [
        "fit",
        "--config",
        "configs/ashem.yaml",
        *common,
        "--data.calibration_samples",
        "32",
        "--model.phase1_max_epochs",
        "2",
        "--model.phase2_max_epochs",
        "2",
    ]


# (scenario, what, point, step): 10 batches per epoch (5 under DDP); ASHEM changes phase after step 20.
KILLS: list[tuple[str, str, str, int]] = [
    ("standard", "mid-epoch (step 17; step checkpoints every 4)", "train_batch", 17),
    ("standard", "during validation (end of epoch 2)", "validation", 20),
    ("standard", "half-way through writing a checkpoint (step 20)", "checkpoint_write", 20),
    ("standard", "right after the epoch-1 checkpoint", "batch_start", 20),
    ("standard-ddp", "both DDP processes, mid-epoch (step 9; step checkpoints every 4)", "train_batch", 9),
    ("ashem", "phase 1, mid-epoch (step 14)", "train_batch", 14),
    ("ashem", "at the phase switch, before its checkpoint", "phase_switch", 0),
    ("ashem", "right after the phase-switch checkpoint", "batch_start", 20),
    ("ashem", "phase 2, mid-epoch (step 27)", "train_batch", 27),
    ("ashem", "phase 2, during validation (step 30)", "validation", 30),
    ("ashem", "half-way through writing a phase-2 checkpoint (step 30)", "checkpoint_write", 30),
    ("ashem", "during the final evaluation, after the last checkpoint", "final_validation", 0),
]


def run_folder(logs: Path) -> Path:
    folders = sorted(logs.glob("*/version_*"))
    if len(folders) != 1:
        raise RuntimeError(f"expected one version folder under {logs}, found {folders}")
    return folders[0]


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run folder, as TensorBoard shows it (purged steps hidden)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def final_table(output: str) -> str:
    """The end-of-run table the ``lego`` command prints (ASHEM; Lightning's log goes to stderr), or ``""``."""
    match = re.search(r"ASHEM two-stage evaluation.*?compute of the routed model[^\n]*", output, re.S)
    return match.group(0) if match else ""


def identical(a: Any, b: Any) -> bool:
    """Equal to the bit: tensors with ``torch.equal``, nested in dicts and lists like a checkpoint's state."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    return a == b


def end_state(folder: Path) -> dict[str, Any]:
    """What must match between a resumed and an uninterrupted run: the last checkpoint's training state."""
    ckpt = read_checkpoint(folder / "checkpoints" / "last.ckpt")
    return {
        "weights": ckpt["state_dict"],
        "optimizer": ckpt["optimizer_states"],
        "step": ckpt["global_step"],
        "epoch": ckpt["epoch"],
        "threshold": ckpt.get("routing_threshold"),
        "hard_set": ckpt.get("hard_tokens"),  # a phased module's own hard-token set
    }


def leftovers(folder: Path) -> dict[str, Any]:
    """Checkpoint files that do not load, and temporary files, left in a run's checkpoint folder."""
    broken = []
    for file in sorted((folder / "checkpoints").glob("*.ckpt")):
        try:
            read_checkpoint(file)
        except CheckpointError:
            broken.append(file.name)
    temporary = sorted(p.name for p in (folder / "checkpoints").glob(".*.tmp"))
    return {"unloadable_ckpt": broken, "temporary_files": temporary}


def kills(data: Path, work: Path) -> list[dict[str, Any]]:
    rows = []
    reference: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(kill[0] for kill in KILLS):
        logs = work / f"{name}-uninterrupted"
        done = lego(scenario_args(name, data, logs))
        if done.returncode != 0:
            raise RuntimeError(f"the uninterrupted {name} run failed:\n{done.stderr[-3000:]}")
        folder = run_folder(logs)
        reference[name] = {"state": end_state(folder), "scalars": scalars(folder), "table": final_table(done.stderr)}
    for name, what, point, step in KILLS:
        logs = work / f"{name}-{point}-{step}"
        args = scenario_args(name, data, logs)
        start = time.perf_counter()
        killed = lego([*args, "--trainer.callbacks+=benchmarks.faults.KillAt", f"--trainer.callbacks.point={point}",
                       f"--trainer.callbacks.step={step}"])  # fmt: skip
        folder = run_folder(logs)
        after_kill = leftovers(folder)
        resumed = lego([*args, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])
        row: dict[str, Any] = {
            "scenario": name,
            "kill": what,
            "point": point,
            "step": step,
            "killed_by_sigkill": killed.returncode == -signal.SIGKILL,
            "resumed_exit": resumed.returncode,
            "left_after_kill": after_kill,
            "seconds": round(time.perf_counter() - start, 1),
        }
        if resumed.returncode == 0:
            ref = reference[name]
            state = end_state(run_folder(logs))
            row.update(
                version_folders=len(list(logs.glob("*/version_*"))),
                same={key: identical(state[key], ref["state"][key]) for key in ref["state"]},
                same_scalars=scalars(run_folder(logs)) == ref["scalars"],
                # Only ASHEM prints a final table; a run without one has nothing to compare.
                same_table=final_table(resumed.stderr) == ref["table"] if ref["table"] else None,
                left_after_resume=leftovers(run_folder(logs)),
            )
            same = all(row["same"].values()) and row["same_scalars"] and row["same_table"] is not False
            row["exact"] = row["killed_by_sigkill"] and same  # a run the kill never reached proves nothing
        else:
            row["error"] = resumed.stderr[-1500:]
            row["exact"] = False
        rows.append(row)
        print(f"kill {name} {point}@{step}: exact={row['exact']}", flush=True)
    return rows


# --------------------------------------------------------------------------------------- full disk
@contextlib.contextmanager
def tmpfs(size_bytes: int, read_only: bool = False) -> Iterator[Path | None]:
    """A tmpfs of ``size_bytes`` mounted on a fresh folder, or ``None`` where mounting is not allowed."""
    folder = Path(tempfile.mkdtemp(prefix="lego-tmpfs-"))
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    try:
        yield folder if mounted.returncode == 0 else None
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(folder)], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def research_standard(data: Path, logs: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        "configs/standard.yaml",
        "--data.path",
        str(data),
        "--trainer.logger.init_args.save_dir",
        str(logs),
        "--trainer.limit_train_batches",
        "4",
        "--trainer.limit_val_batches",
        "4",
        "--trainer.max_epochs",
        "3",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.log_every_n_steps",
        "2",
        *extra,
    ]


def checkpoint_files(logs: Path) -> dict[str, str]:
    """Every ``*.ckpt`` under ``logs`` and whether it loads."""
    verdicts = {}
    for file in sorted(logs.rglob("*.ckpt")):
        try:
            read_checkpoint(file)
            verdicts[file.name] = "loads"
        except CheckpointError as err:
            verdicts[file.name] = f"broken: {err}"
    return verdicts


def last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lego: error:") or "Error" in line.split(":")[0]]
    return (errors or lines or [""])[-1]


def full_disk(data: Path, work: Path) -> list[dict[str, Any]]:
    sized = lego(research_standard(data, work / "measure", "--trainer.max_epochs", "1"))
    if sized.returncode != 0:
        raise RuntimeError(f"the sizing run failed:\n{sized.stderr[-3000:]}")
    size = max(f.stat().st_size for f in (work / "measure").rglob("*.ckpt"))
    rows = []
    for what, capacity in (
        ("40 MB tmpfs: the first checkpoint does not fit", 40 * 2**20),
        ("tmpfs for 2.5 checkpoints: epoch 0's best and last fit, the next write does not", int(2.5 * size)),
    ):
        with tmpfs(capacity) as disk:
            if disk is None:
                rows.append({"case": what, "ran": False, "why": "mounting a tmpfs is not allowed here"})
                continue
            run = lego(research_standard(data, disk / "logs"))
            files = checkpoint_files(disk / "logs")
            temporary = [p.name for p in (disk / "logs").rglob(".*.tmp")]
            resumed = None
            last = next((disk / "logs").rglob("last.ckpt"), None)
            if last is not None:
                keep = work / f"resume-{len(rows)}"
                shutil.copytree(last.parent.parent, keep / "standard" / last.parent.parent.name)
                again = lego(
                    research_standard(data, keep, "--ckpt_path", str(keep / "standard" / last.parent.parent.name /
                                                                      "checkpoints" / "last.ckpt"))
                )  # fmt: skip
                resumed = {"exit": again.returncode, "error": last_error_line(again.stderr) if again.returncode else ""}
            rows.append(
                {
                    "case": what,
                    "ran": True,
                    "capacity_mb": round(capacity / 2**20, 1),
                    "checkpoint_mb": round(size / 2**20, 1),
                    "exit": run.returncode,
                    "traceback": "Traceback" in run.stderr,
                    "message": last_error_line(run.stderr),
                    "files": files,
                    "temporary_files": temporary,
                    "corrupt_files": sum(v.startswith("broken") for v in files.values()),
                    "resume_from_last": resumed,
                }
            )
            print(f"disk: {what}: exit {run.returncode}, files {files}", flush=True)
    return rows


# --------------------------------------------------------------------------------------- bad input
def bad_inputs(data: Path, work: Path) -> list[dict[str, Any]]:
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    lines = (data / "train.txt").read_text(encoding="utf-8").splitlines()[:400]
    (corpus / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (corpus / "valid.txt").write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    latin1 = work / "latin1"
    shutil.copytree(corpus, latin1)
    (latin1 / "train.txt").write_bytes("caf\xe9 na\xefve\n".encode("latin-1") * 50)
    empty = work / "empty"
    shutil.copytree(corpus, empty)
    (empty / "train.txt").write_text("\n\n")
    logs = work / "logs"
    quick = ["--data.path", str(corpus), "--trainer.logger.init_args.save_dir", str(logs), "--trainer.max_epochs",
             "1", "--trainer.enable_progress_bar", "false", "--data.batch_size", "8"]  # fmt: skip
    trained = lego(["fit", "--config", "configs/deep_supervision.yaml", *quick])
    if trained.returncode != 0:
        raise RuntimeError(f"the run that writes the test checkpoint failed:\n{trained.stderr[-3000:]}")
    good = run_folder(logs) / "checkpoints" / "last.ckpt"
    blob = good.read_bytes()
    (work / "empty.ckpt").write_bytes(b"")
    (work / "truncated.ckpt").write_bytes(blob[: len(blob) // 2])
    (work / "text.ckpt").write_text("not a checkpoint\n")
    (work / "a_file").write_text("x")
    other_data = work / "other_data"
    shutil.copytree(corpus, other_data)
    (other_data / "train.txt").write_text((corpus / "train.txt").read_text() + " zebra quagga okapi\n")

    def fit(config: str, *extra: str) -> list[str]:
        held_out = ["--data.calibration_samples", "32"] if config == "ashem.yaml" else []  # the corpus is small
        return ["fit", "--config", f"configs/{config}", *quick, *held_out, *extra]

    def validate(config: str, ckpt: Path | str, *extra: str) -> list[str]:
        return ["validate", "--config", f"configs/{config}", *quick, "--ckpt_path", str(ckpt), *extra]

    cases: list[tuple[str, list[str]]] = [
        ("routing_threshold out of range", fit("standard.yaml", "--model.routing_threshold", "1.5")),
        ("unknown confidence measure", fit("standard.yaml", "--model.confidence", "maxprob")),
        ("stages with a gap", fit("standard.yaml", "--model.stages", "[{layers: [1, 1]}, {layers: [3, 3]}]")),
        ("seq_len above the model's context", fit("standard.yaml", "--data.seq_len", "64")),
        ("hard_ratio outside (0, 1)", fit("ashem.yaml", "--model.hard_ratio", "0")),
        ("phase 2 not deeper than phase 1", fit("ashem.yaml", "--model.phase2_layers", "2")),
        ("a phase with max_epochs 0", fit("ashem.yaml", "--model.phase1_max_epochs", "0")),
        ("option the model does not have", fit("standard.yaml", "--model.n_layer", "3")),
        ("option of the wrong type", fit("standard.yaml", "--model.d_model", "sixty-four")),
        ("config file that does not exist", ["fit", "--config", "configs/nope.yaml", *quick]),
        ("data folder that does not exist", fit("standard.yaml", "--data.path", str(work / "nowhere"))),
        ("data path that is a file", fit("standard.yaml", "--data.path", str(work / "a_file"))),
        ("corpus that is not UTF-8", fit("standard.yaml", "--data.path", str(latin1))),
        ("corpus split with no text", fit("standard.yaml", "--data.path", str(empty))),
        ("calibration_samples larger than the data", fit("ashem.yaml", "--data.calibration_samples", "100000")),
        ("batch_size 0", fit("standard.yaml", "--data.batch_size", "0")),
        ("checkpoint that does not exist", validate("deep_supervision.yaml", work / "missing.ckpt")),
        ("empty checkpoint", validate("deep_supervision.yaml", work / "empty.ckpt")),
        ("truncated checkpoint", validate("deep_supervision.yaml", work / "truncated.ckpt")),
        ("file that is not a checkpoint", validate("deep_supervision.yaml", work / "text.ckpt")),
        ("resume from a truncated checkpoint", fit("deep_supervision.yaml", "--ckpt_path",
                                                   str(work / "truncated.ckpt"))),
        ("checkpoint of another model class", validate("ashem.yaml", good)),
        ("checkpoint of another size", validate("deep_supervision.yaml", good, "--model.d_model", "32")),
        ("checkpoint trained on other data", ["validate", "--config", "configs/deep_supervision.yaml",
                                              *quick[2:], "--data.path", str(other_data), "--ckpt_path", str(good)]),
        ("plain ddp for ASHEM (2 processes)", fit("ashem.yaml", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                                                  "--trainer.accelerator", "cpu")),
        ("log folder under a regular file", fit("standard.yaml", "--trainer.logger.init_args.save_dir",
                                                str(work / "a_file" / "logs"))),
        ("trainer.max_epochs 0", fit("standard.yaml", "--trainer.max_epochs", "0")),
        ("trainer.max_steps 0", fit("standard.yaml", "--trainer.max_steps", "0")),
        ("trainer.limit_train_batches 0", fit("standard.yaml", "--trainer.limit_train_batches", "0")),
        ("GPU accelerator on a machine without one", fit("standard.yaml", "--trainer.accelerator", "gpu")
         if not torch.cuda.is_available() else fit("standard.yaml", "--trainer.accelerator", "tpu")),
        ("unknown strategy", fit("standard.yaml", "--trainer.strategy", "dpp")),
    ]  # fmt: skip
    rows = []
    with tmpfs(2**20, read_only=True) as read_only:
        if read_only is not None:
            cases.append(("log folder on a read-only disk", fit("standard.yaml", "--trainer.logger.init_args.save_dir",
                                                                 str(read_only / "logs"))))  # fmt: skip
        for what, args in cases:
            result = lego(args, timeout=600)
            out = result.stdout + result.stderr
            messages = out.count("lego: error:")
            if result.returncode == 0:
                verdict = "accepted"
            elif "Traceback" in out:
                verdict = "traceback"
            elif messages <= 1:
                verdict = "clean error"
            else:
                verdict = f"clean error, printed {messages} times"
            rows.append({"case": what, "verdict": verdict, "exit": result.returncode,
                         "message": last_error_line(result.stderr)})  # fmt: skip
            print(f"input: {what}: {verdict}", flush=True)
    if read_only is None:
        rows.append({"case": "log folder on a read-only disk", "verdict": "not run (mount not allowed)", "exit": None,
                     "message": ""})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ report
def _yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def report(kill_rows: list[dict], disk_rows: list[dict], input_rows: list[dict]) -> str:
    out = ["# Faults: kills, a full disk, bad input", ""]
    if kill_rows:
        exact = sum(r["exact"] for r in kill_rows)
        out += [
            "## Kills",
            "",
            f"**{exact} of {len(kill_rows)} SIGKILLs resumed exactly**: the resumed run's last checkpoint has the "
            "uninterrupted run's weights and optimizer state bit for bit, the same step (and threshold and hard-token "
            "set), TensorBoard shows the same scalars in one version folder, and the final table (ASHEM's) is the "
            "same. "
            "The runs are `configs/standard.yaml` (also on 2 DDP processes, both killed) and `configs/ashem.yaml`, "
            "both with their dropout of 0.1, on 160 training blocks of WikiText-2 (vocabulary capped at 2,048): 10 "
            "batches per epoch, step checkpoints every 4 steps, ASHEM at most 2 epochs per phase.",
            "",
            "| run | killed | by SIGKILL | resumed | weights, optimizer, step | TensorBoard | table | "
            "unloadable .ckpt after kill | temporary files after resume |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in kill_rows:
            same = r.get("same", {})
            out.append(
                f"| {r['scenario']} | {r['kill']} | {_yes(r['killed_by_sigkill'])} | exit {r['resumed_exit']} | "
                f"{_yes(bool(same) and all(same.values()))} | "
                f"{_yes(r.get('same_scalars', False))} ({r.get('version_folders', '?')} folder) | "
                f"{'none printed' if r.get('same_table') is None else _yes(r['same_table'])} | "
                f"{len(r['left_after_kill']['unloadable_ckpt'])} | "
                f"{len(r.get('left_after_resume', {}).get('temporary_files', []))} |"
            )
        out.append("")
    if disk_rows:
        out += ["## Full disk", ""]
        for r in disk_rows:
            if not r["ran"]:
                out.append(f"- {r['case']}: not run ({r['why']}).")
                continue
            files = ", ".join(f"`{k}` {v.split(':')[0]}" for k, v in r["files"].items()) or "none"
            resume = r["resume_from_last"]
            resumed = "no last.ckpt to resume from" if resume is None else (
                "resumed from it to the end (exit 0)" if resume["exit"] == 0 else f"resume failed: {resume['error']}"
            )  # fmt: skip
            out.append(
                f"- {r['case']} ({r['capacity_mb']} MB, one checkpoint is {r['checkpoint_mb']} MB): exit {r['exit']}, "
                f"{'a traceback' if r['traceback'] else 'no traceback'}; message: `{r['message']}`. "
                f"Checkpoint files left: {files}; corrupt: {r['corrupt_files']}; temporary files: "
                f"{len(r['temporary_files'])}. {resumed.capitalize()}."
            )
        out.append("")
    if input_rows:
        clean = sum(r["verdict"] == "clean error" for r in input_rows)
        out += [
            "## Bad input",
            "",
            f"**{clean} of {len(input_rows)} bad inputs end with a clean error** (non-zero exit, the message once, "
            "no traceback).",
            "",
            "| input | verdict | exit | message |",
            "|---|---|---|---|",
        ]
        for r in input_rows:
            message = r["message"].replace("|", "\\|")
            out.append(f"| {r['case']} | {r['verdict']} | {r['exit']} | {message} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="word-level WikiText-2 folder")
    parser.add_argument("--only", choices=("kills", "disk", "inputs"), action="append", help="run only these parts")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    parts = set(args.only or ("kills", "disk", "inputs"))
    work = args.work or Path(tempfile.mkdtemp(prefix="lego-faults-"))
    kill_rows = kills(args.data, work / "kills") if "kills" in parts else []
    disk_rows = full_disk(args.data, work / "disk") if "disk" in parts else []
    input_rows = bad_inputs(args.data, work / "inputs") if "inputs" in parts else []
    rows = [*({"part": "kill", **r} for r in kill_rows), *({"part": "disk", **r} for r in disk_rows),
            *({"part": "input", **r} for r in input_rows)]  # fmt: skip
    path = write_results("faults", rows, report(kill_rows, disk_rows, input_rows))
    print(path.read_text())


if __name__ == "__main__":
    main()
