"""What every benchmark shares: the machine it ran on, its command, and how results are written.

Each benchmark writes ``benchmarks/results/<name>.json`` (command, git sha, date, machine,
versions, rows with every seed's value plus mean and spread) and ``<name>.md`` (the same
table for people, with the research's figure beside ours and a few sentences on what holds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "wikitext-2"


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A ``Trainer`` that logs, checkpoints, summarises and draws nothing (``kwargs`` may turn any back on).

    A benchmark records what it measures itself (:class:`ValidationHistory`, its own callbacks),
    so Lightning's own outputs would only cost time and disk.
    """
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(**{**quiet, **kwargs})


class ValidationHistory(Callback):
    """Records every validation: phase, epoch, val/ppl, its accuracy, seconds since training started.

    The accuracy is the one that goes with the logged ``val/ppl``: the routed model's when
    routing is on, else the deepest exit reported.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []
        self.start = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.start = time.perf_counter()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self.phase_at_start = getattr(pl_module, "phase", 1)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        # The phase may have just changed: read the accuracy that goes with the val/ppl just logged.
        deepest = max(k for k in pl_module.config.exit_layers if f"val/exit{k}/acc" in m)
        acc_key = "val/routed/acc" if "val/routed/acc" in m else f"val/exit{deepest}/acc"
        self.history.append(
            {
                "phase": self.phase_at_start,
                "epoch": trainer.current_epoch,
                "ppl": float(m["val/ppl"]),
                "acc": float(m[acc_key]),
                "time_s": time.perf_counter() - self.start,
            }
        )

    def phase(self, phase: int) -> list[dict[str, Any]]:
        return [h for h in self.history if h["phase"] == phase]


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(field)


def peak_memory_during(fn: Any) -> int:
    """Peak resident memory while ``fn()`` runs, above what was resident just before (bytes, Linux).

    Reads ``VmHWM`` after resetting it through ``/proc/self/clear_refs``. (``ru_maxrss``
    survives fork and exec, so in a child process it reports the parent's peak.) On a GPU the
    peak of ``torch.cuda.max_memory_allocated`` is what counts instead.
    """
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        return torch.cuda.max_memory_allocated() - before
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


QUIET_TRAINER = (
    "--trainer.logger",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
)


def config_cli(config: str, data: Path, seed: int, work: str, *overrides: str) -> Any:
    """A committed config through the ``lego`` CLI classes, not run: no logger, quiet, files under ``work``."""
    from lego_lightning.cli import LegoCLI

    # A benchmark gives the CLI its arguments on purpose: Lightning's warning about sys.argv says nothing here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    args = [
        "--config",
        str(REPO / "configs" / f"{config}.yaml"),
        "--data.path",
        str(data),
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        work,
        *QUIET_TRAINER,
        *overrides,
    ]
    return LegoCLI(args=args, run=False)


def training_step_fn(module: Any, x: Any, y: Any) -> Callable[[], None]:
    """One plain training step of ``module`` on a fixed batch: its weighted exit losses, backward, AdamW.

    Only what ``requires_grad`` is optimised, so a frozen module spends no optimizer time either.
    """
    import torch

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    weights = dict(zip(module.config.exit_layers, module.exit_loss_weights))

    def step() -> None:
        losses = module.exit_losses(x, y)
        loss = sum(weights[k] * v for k, v in losses.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def alternating_step_times(steps: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step of each named step, timed in turn within every round after one warm-up each.

    Alternating in one process is what lets two steps be compared as a ratio on a shared machine:
    whatever else loads the cores loads both alike. Ratios pair the lists round by round.
    """
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def machine() -> str:
    """CPU model and cores, or the GPU's name when one is used."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lego_lightning"], cwd=REPO, capture_output=True, text=True
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# Taken when the benchmark starts: a run of hours can outlive later commits.
GIT_SHA_AT_START = git_sha()


def command() -> str:
    """The command line that ran this benchmark: ``python -m <module> ...``, or the script's path."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)  # None under `python script.py` and `-c`
    program = ["-m", spec.name] if spec is not None else [sys.argv[0]]
    return "python " + " ".join(shlex.quote(a) for a in [*program, *sys.argv[1:]])


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Every seed's value, their mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def differ(a: Sequence[float], b: Sequence[float], floor: float = 0.0) -> tuple[float, bool]:
    """Mean of ``a`` minus mean of ``b``, and whether that can be told from no change.

    It can when it exceeds ``floor`` and both seeds' standard deviations added (each mean one
    spread away from the other). With one seed on either side the spread is 0, so anything beyond
    ``floor`` counts; :func:`versus` says "one seed" there instead of a verdict.
    """
    sa, sb = summary(a), summary(b)
    diff = sa["mean"] - sb["mean"]
    return diff, abs(diff) > max(floor, sa["std"] + sb["std"])


def versus(a: Sequence[float], b: Sequence[float], digits: int = 1) -> str:
    """``a`` against ``b`` for a sentence: the difference of means and whether the seeds' spread covers it."""
    diff, told_apart = differ(a, b)
    if min(len(a), len(b)) == 1:
        return f"{diff:+.{digits}f}, one seed"
    return f"{diff:+.{digits}f}, {'beyond' if told_apart else 'within'} the seed spread"


def grouped_verdict(groups: Sequence[tuple[str, Sequence[Any]]], seeds: int) -> str:
    """A verdict sentence from ``(label, items)`` groups, e.g. ``higher at exits [1, 2]; not told apart at exits
    [3]`` (empty groups left out); with fewer than 2 seeds, none."""
    if seeds < 2:
        return "one seed, so no verdict"
    return "; ".join(f"{label} {list(items)}" for label, items in groups if items)


def runs_of(runs: list[dict[str, Any]], method: str, patience: int) -> list[dict[str, Any]]:
    """The stored runs of ``method`` at ``patience``, one per seed, in the order they were measured."""
    return [r for r in runs if r["method"] == method and r["patience"] == patience]


def direction(a: Sequence[float], b: Sequence[float]) -> str:
    """``a`` against ``b`` as a conclusion: "lower", "higher", "not told apart", or "one seed" (no verdict)."""
    if min(len(a), len(b)) == 1:
        return "one seed"
    diff, told_apart = differ(a, b)
    return ("lower" if diff < 0 else "higher") if told_apart else "not told apart"


def agreement(said: Sequence[str]) -> str:
    """Whether :func:`direction`'s verdicts under two settings agree: "holds", "changes" or "needs more seeds"."""
    if "one seed" in said:
        return "needs more seeds"
    return "holds" if len(set(said)) == 1 else "changes"


def fmt(s: dict[str, Any], digits: int = 2) -> str:
    """``mean ± std`` for a markdown table."""
    if len(s["values"]) == 1:
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def add_resume_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """``--name``, ``--resume`` and ``--merge``: how a benchmark keeps, resumes and joins its runs.

    A long grid can run in parallel lanes: each lane writes its own ``--name``, and a last
    ``--resume --merge LANE ...`` joins their runs into one report.
    """
    parser.add_argument("--name", default=name, help=f"results file stem under benchmarks/results (default {name})")
    parser.add_argument("--resume", action="store_true", help="keep the runs in the results JSON, run the rest")
    parser.add_argument(
        "--merge", nargs="+", default=[], metavar="NAME", help="with --resume: also keep the runs in NAME.json"
    )


def resumed_runs(
    args: argparse.Namespace, key: str, settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """:func:`earlier_runs` for the options :func:`add_resume_arguments` added; none without ``--resume``."""
    if args.merge and not args.resume:
        raise SystemExit("--merge needs --resume")
    return earlier_runs(args.name, key, settings, args.merge) if args.resume else ([], [])


def index_runs(
    runs: Sequence[dict[str, Any]], run_key: Callable[[dict[str, Any]], Hashable]
) -> dict[Hashable, dict[str, Any]]:
    """The runs by ``run_key``; a run stored twice (merged lanes that overlap) is refused, not averaged in twice."""
    by_key: dict[Hashable, dict[str, Any]] = {}
    for run in runs:
        k = run_key(run)
        if k in by_key:
            raise SystemExit(f"--resume: the run {k} is stored twice; merge files that do not overlap")
        by_key[k] = run
    return by_key


def earlier_runs(
    name: str, key: str, settings: dict[str, Any], merge: Sequence[str] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For ``--resume``: the runs an earlier, interrupted invocation wrote to ``<name>.json``.

    Returns those runs (the list stored under ``key``) and where they came from: every earlier
    invocation's command, git sha, date and machine, so the results say which runs a later command
    did not measure itself. ``settings`` are the options every run must share (sizes, epochs);
    runs measured under others are refused rather than mixed in. Write them back with
    ``extra={"settings": settings}``.

    ``merge`` names other results files, written by invocations that ran part of the same grid
    in parallel (``--name``); their runs join these under the same checks.
    """
    runs, earlier = _stored_runs(name, key, settings, must_exist=False)
    for other in merge:
        more, their = _stored_runs(other, key, settings, must_exist=True)
        runs, earlier = runs + more, earlier + their
    return runs, earlier


def _stored_runs(
    name: str, key: str, settings: dict[str, Any], must_exist: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        if must_exist:
            raise SystemExit(f"--merge: {path} does not exist")
        return [], []
    data = json.loads(path.read_text())
    stored = data.get("settings")
    if stored is not None and stored != settings:
        differ = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        raise SystemExit(
            f"--resume: {path} was measured with other settings (earlier, now): {differ}; "
            "rerun without --resume or with the earlier settings"
        )
    runs = data.get(key, [])
    earlier = data.get("resumed_from", [])
    measured = len(runs) - sum(e["runs"] for e in earlier)  # by the invocation that wrote the file itself
    if measured == 0:  # it only rewrote the report
        return runs, earlier
    # The machine goes with the runs: the report's own Machine line is the rewriting invocation's.
    where = {k: data[k] for k in ("command", "git_sha", "date", "machine") if k in data}
    return runs, [*earlier, where | {"runs": measured}]


def write_results(name: str, rows: list[dict[str, Any]], markdown: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` under ``benchmarks/results/``.

    ``extra["resumed_from"]`` (from :func:`earlier_runs`) is listed in the header.
    """
    import lightning
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command(),
        "git_sha": GIT_SHA_AT_START,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **(extra or {}), "rows": rows}, indent=2) + "\n")
    header = (
        f"<!-- written by `{meta['command']}`; do not edit by hand -->\n\n"
        f"Command: `{meta['command']}`  \nMachine: {meta['machine']}  \n"
        f"torch {meta['torch']}, lightning {meta['lightning']}, git {meta['git_sha']}, {meta['date']}\n\n"
    )
    for earlier in (extra or {}).get("resumed_from", []):
        header += (
            f"Resumed: {earlier['runs']} run{'s' if earlier['runs'] != 1 else ''} measured earlier by "
            f"`{earlier['command']}` "
            f"(git {earlier['git_sha']}, finished {earlier['date']}"
            + (f", on {earlier['machine']}" if "machine" in earlier else "")
            + ").  \n"
        )
    if (extra or {}).get("resumed_from"):
        header += "\n"
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown.strip() + "\n")
    return path
