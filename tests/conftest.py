"""Shared fixtures: tiny corpora on disk, an isolated datasets cache, no network."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

# Nothing may download at test time, and the tests' datasets cache is their own; set before
# `datasets` is imported anywhere (it reads these once, at import).
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lego-test-hf-")
os.environ["LEGO_CACHE"] = tempfile.mkdtemp(prefix="lego-test-cache-")  # tokenizers and token arrays
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (make test): torch's own threads in each would only contend for the same cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

import pytest

REPO = Path(__file__).resolve().parent.parent

WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "as",
    "with",
    "by",
    "at",
    "from",
    "his",
    "an",
    "that",
    "it",
    "were",
    "which",
    "be",
    "this",
    "are",
    "river",
    "city",
    "army",
    "king",
    "song",
    "game",
    "film",
    "team",
    "war",
    "season",
    "house",
    "road",
    "church",
    "station",
    "line",
    "ship",
    "played",
    "built",
    "wrote",
    "won",
    "scored",
    "named",
    "opened",
    "found",
    "moved",
    "took",
    "made",
    "led",
    "held",
]


def write_corpus(folder: Path, n_train_lines: int = 120, n_valid_lines: int = 30, seed: int = 0) -> Path:
    """A small word-level corpus in the layout of ../shared/data/wikitext-2."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", n_train_lines), ("valid.txt", n_valid_lines)):
        lines = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 25))) + " " for _ in range(n)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def no_process_group_outlives_its_test():
    """Destroy the process group and launcher variables that a test's in-process DDP run (devices=1) leaves.

    Lightning keeps its process group after fit. A later ``ddp_fork`` test in the same pytest worker would
    fork ranks that inherit that group, whose threads do not survive the fork: they wait on it forever.
    """
    import torch.distributed as dist

    from tests.helpers import LAUNCHER_VARS

    launcher = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in launcher.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def demo_checkpoint(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make demo`'s config (ASHEM on words), two short phases: a real ``lego fit`` checkpoint with its tokenizer."""
    from lego_lightning.cli import LegoCLI
    from tests.helpers import cli_args

    logs = tmp_path_factory.mktemp("demo")
    extra = ["--model.phase1_max_epochs", "1", "--model.phase2_max_epochs", "1", "--data.calibration_samples", "4",
             "--trainer.limit_train_batches", "2"]  # fmt: skip
    cli = LegoCLI(args=cli_args("fit", "ashem.yaml", corpus, logs, *extra))
    return Path(cli.trainer.checkpoint_callback.last_model_path)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))
