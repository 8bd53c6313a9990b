"""Data preparation at scale (issues 17 and 27): time, throughput and peak memory at 1x, 10x (and 100x) WikiText-2.

The training split is N concatenated copies of WikiText-2's, made at run time in a temporary
folder (never committed); validation is WikiText-2's. For each scale and tokenizer (word level,
byte-level BPE and unigram of 8,192 tokens), one fresh process prepares the data (trains the tokenizer,
tokenizes every split into arrays on disk) and iterates one epoch of training blocks (batch
64 x 32); a second process does the same with the cache the first one left. For BPE and unigram,
another fresh process does the same work with Hugging Face ``tokenizers`` alone, the reference
preparation is measured against: it trains the same tokenizer on the training file
(``Tokenizer.train``) and ``encode_batch_fast``-s every split's lines, a batch at a time as
preparation does, reading each batch's ids out. Each reports its
wall time and peak resident memory (``ru_maxrss``, the process's own, imports included) and the
peak memory its tokenizing workers add: the sum of their unique set sizes (pages no other process
shares; a forked worker shares its parent's until it writes them), sampled every 0.1 s. Where a split
is large enough to be tokenized in a process per core, a first run in one process, with a cache
of its own, gives the speed-up of the parallel one measured in the same benchmark run.

    python -m benchmarks.data_scale                     # 1x and 10x, word, bpe and unigram
    python -m benchmarks.data_scale --scales 1 10 100   # 100x: 1 GB of text on disk, minutes
    python -m benchmarks.data_scale --resume --scales 100 --tokenizers unigram8k   # a row more, the rest kept
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_DATA, REPO, add_resume_arguments, index_runs, resumed_runs, write_results
from lego_lightning.data.token_cache import tokenize_processes

TOKENIZERS = {
    "word": {"tokenizer": "word"},
    "bpe8k": {"tokenizer": "bpe", "max_vocab_size": 8192},
    "unigram8k": {"tokenizer": "unigram", "max_vocab_size": 8192},
}
# The tokenizers Hugging Face tokenizers trains: each is measured against it doing the same work directly.
TOKENIZERS_TRAINED = ("bpe8k", "unigram8k")


class WorkerMemory:
    """The largest sum, over this process's children, of their unique set sizes, sampled in a thread."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.peak_bytes, self.most_workers = 0, 0
        self._interval_s, self._stop = interval_s, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(self._interval_s):
            total, alive = 0, 0
            for worker in me.children(recursive=True):
                try:
                    total += worker.memory_full_info().uss
                    alive += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue  # it ended between the listing and the reading
            self.peak_bytes, self.most_workers = max(self.peak_bytes, total), max(self.most_workers, alive)


def prepare_and_iterate(folder: str, cache: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run in a child process: prepare the data, iterate one epoch, report times and peak memory."""
    from lego_lightning.data import token_cache

    start = time.perf_counter()
    with WorkerMemory() as workers:
        dm = text_data(folder, cache, settings)
    prepared = time.perf_counter() - start
    start = time.perf_counter()
    tokens = 0
    for batch in dm.train_dataloader():
        tokens += batch["input_ids"].numel()
    iterated = time.perf_counter() - start
    return {
        "prepare_s": prepared,
        "epoch_s": iterated,
        "epoch_tokens": tokens,
        "train_tokens": len(dm.splits["train"]) * 32,
        "vocab_size": dm.vocab_size,
        "tokenize_processes": token_cache.tokenize_processes(dm.corpus.size("train"), dm.kind, dm.tokenize_processes),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_peak_uss_mib": workers.peak_bytes / 2**20,
        "workers_seen": workers.most_workers,
    }


def direct(folder: str, cache: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run in a child process: the reference, ``tokenizers`` alone doing what preparation does (module docstring)."""
    from lego_lightning.data.token_cache import LINES_PER_BATCH
    from lego_lightning.data.tokenizer import untrained_tokenizer

    tokenizer, trainer = untrained_tokenizer(settings["tokenizer"], settings["max_vocab_size"])
    start = time.perf_counter()
    tokenizer.train([str(Path(folder) / "train.txt")], trainer)
    trained = time.perf_counter() - start
    tokens = 0
    for split in ("train.txt", "valid.txt"):
        with open(Path(folder) / split, encoding="utf-8") as lines:
            while batch := [line for _, line in zip(range(LINES_PER_BATCH), lines)]:
                tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(batch, add_special_tokens=False))
    return {"prepare_s": time.perf_counter() - start, "train_tokenizer_s": trained, "tokens": tokens}


def mine(folder: str, cache: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Run in a child process, after the data is cached: mark the hard tokens of the whole training split.

    The model is small (d_model 16, untrained, seed 0) and its confidence is the learned exit
    classifier's at exit 1, so no vocabulary-sized head runs: what is measured is the memory and
    time of scoring every training token and keeping the set, not the set's quality.
    """
    import lightning as L

    from lego_lightning import SupervisedExitLM
    from lego_lightning.callbacks.hard_example_mining import mark_tokens

    dm = text_data(folder, cache, settings)
    L.seed_everything(0, verbose=False)
    model = SupervisedExitLM(
        vocab_size=dm.vocab_size,
        n_layers=2,
        d_model=16,
        n_heads=2,
        max_seq_len=32,
        stages=[{"layers": [1, 1]}, {"layers": [2, 2]}],
        confidence="learned",  # a classifier on exit 1's hidden state: no vocabulary-sized head runs
    ).eval()
    start = time.perf_counter()
    hard = mark_tokens(dm.splits["train"], lambda ids: model.token_confidence(ids, 1), 0.5, batch_size=256)
    return {
        "mine_s": time.perf_counter() - start,
        "mined_tokens": len(hard) * hard.seq_len,
        "hard_frac": hard.fraction(),
        "set_mib": hard.bits.numel() / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def text_data(folder: str, cache: str, settings: dict[str, Any]) -> Any:
    from lego_lightning.data import TextDataModule

    dm = TextDataModule(path=folder, seq_len=32, batch_size=64, cache_dir=cache, **settings)
    dm.setup("fit")
    return dm


def child(folder: Path, cache: Path, settings: dict[str, Any], job: str = "prepare_and_iterate") -> dict[str, Any]:
    code = (
        f"import json, sys; from benchmarks.data_scale import {job}; print(json.dumps({job}(*json.loads(sys.argv[1]))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps([str(folder), str(cache), settings])],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_corpus(source: Path, folder: Path, copies: int) -> int:
    """``copies`` of ``source``'s training split as one train.txt, its validation split as is; bytes of train."""
    folder.mkdir(parents=True)
    train = (source / "train.txt").read_bytes()
    with open(folder / "train.txt", "wb") as f:
        for _ in range(copies):
            f.write(train)
    shutil.copy(source / "valid.txt", folder / "valid.txt")
    return len(train) * copies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    parser.add_argument("--mine", nargs="*", default=["bpe8k"], choices=list(TOKENIZERS), help="tokenizers to mine at")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--repeats", type=int, default=3, help="first runs of BPE and unigram, each beside a direct one (medians)"
    )
    add_resume_arguments(parser, "data_scale")
    args = parser.parse_args()
    settings: dict[str, Any] = {}
    rows, resumed_from = resumed_runs(args, "rows", settings)
    done = index_runs(rows, lambda r: (r["scale"], r["tokenizer"]))
    extra = {"settings": settings, "resumed_from": resumed_from}
    with tempfile.TemporaryDirectory() as work:
        for scale in args.scales:
            todo = [name for name in args.tokenizers if (scale, name) not in done]
            if not todo:
                continue
            folder = Path(work) / f"x{scale}"
            text_bytes = make_corpus(args.data, folder, scale)
            for name in todo:
                cache = Path(work) / f"cache-x{scale}-{name}"
                serial = None
                if tokenize_processes(text_bytes, TOKENIZERS[name]["tokenizer"]) > 1:  # a process per core here
                    serial = child(folder, Path(work) / "serial", {**TOKENIZERS[name], "tokenize_processes": 1})
                    shutil.rmtree(Path(work) / "serial")
                first = child(folder, cache, TOKENIZERS[name])
                second = child(folder, cache, TOKENIZERS[name])
                reference = None
                if name in TOKENIZERS_TRAINED:  # in turn with more first runs: seconds-long runs vary by tenths
                    reference = child(folder, cache, TOKENIZERS[name], "direct")
                    reference["runs_s"], first["runs_s"] = [reference["prepare_s"]], [first["prepare_s"]]
                    for _ in range(args.repeats - 1):
                        again = Path(work) / "again"
                        first["runs_s"].append(child(folder, again, TOKENIZERS[name])["prepare_s"])
                        shutil.rmtree(again)
                        reference["runs_s"].append(child(folder, cache, TOKENIZERS[name], "direct")["prepare_s"])
                mined = child(folder, cache, TOKENIZERS[name], "mine") if name in args.mine else None
                row = {
                    "scale": scale,
                    "tokenizer": name,
                    "train_mb": text_bytes / 1e6,
                    "serial": serial,
                    "first": first,
                    "cached": second,
                    "direct": reference,
                    "mined": mined,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(cache)
                rows.sort(key=lambda r: (r["scale"], list(TOKENIZERS).index(r["tokenizer"])))
                write_results(args.name, rows, report(rows), extra=extra)  # after every row
            shutil.rmtree(folder)
    write_results(args.name, rows, report(rows), extra=extra)


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tokenizer | scale | train MB | vocab | first run: processes | prepare s | MB/s | epoch s | peak RSS MiB "
        "| workers' peak unique memory MiB | one process: prepare s | speed-up | cached run: prepare s | peak RSS MiB "
        "| peak RSS vs 1x (first run) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["tokenizer"]: r["first"]["peak_rss_mib"] for r in rows if r["scale"] == 1}
    for r in rows:
        f, c, one = r["first"], r["cached"], r.get("serial")
        ratio = f["peak_rss_mib"] / base[r["tokenizer"]] if r["tokenizer"] in base else float("nan")
        workers = f.get("workers_peak_uss_mib") if f.get("workers_seen") else None
        one_s = f"{one['prepare_s']:.1f}" if one else "n/a"
        speedup = f"{one['prepare_s'] / f['prepare_s']:.2f}x" if one else "n/a"
        lines.append(
            f"| {r['tokenizer']} | {r['scale']}x | {r['train_mb']:.0f} | {f['vocab_size']} "
            f"| {f.get('tokenize_processes', 1)} | {f['prepare_s']:.1f} | {r['train_mb'] / f['prepare_s']:.1f} "
            f"| {f['epoch_s']:.1f} | {f['peak_rss_mib']:.0f} | {'none' if workers is None else f'{workers:.0f}'} "
            f"| {one_s} | {speedup} "
            f"| {c['prepare_s']:.1f} | {c['peak_rss_mib']:.0f} | {ratio:.2f} |"
        )
    direct = [
        "| tokenizer | scale | train MB | runs each | this library: prepare s | MB/s | tokenizers directly: s "
        "| of it training (first run) | MB/s | this library / directly (throughput) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if d := r.get("direct"):
            ours, theirs = (statistics.median(x.get("runs_s", [x["prepare_s"]])) for x in (r["first"], d))
            direct.append(
                f"| {r['tokenizer']} | {r['scale']}x | {r['train_mb']:.0f} | {len(d.get('runs_s', [1]))} | "
                f"{ours:.1f} | {r['train_mb'] / ours:.2f} | {theirs:.1f} | {d['train_tokenizer_s']:.1f} | "
                f"{r['train_mb'] / theirs:.2f} | {theirs / ours:.2f}x |"
            )
    mining = [
        "| tokenizer | scale | tokens mined | seconds | hard fraction | set MiB | peak RSS MiB | peak RSS vs 1x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mined_base = {r["tokenizer"]: r["mined"]["peak_rss_mib"] for r in rows if r["scale"] == 1 and r["mined"]}
    for r in rows:
        if m := r["mined"]:
            ratio = m["peak_rss_mib"] / mined_base.get(r["tokenizer"], float("nan"))
            mining.append(
                f"| {r['tokenizer']} | {r['scale']}x | {m['mined_tokens']:,} | {m['mine_s']:.1f} | "
                f"{m['hard_frac']:.1%} | {m['set_mib']:.2f} | {m['peak_rss_mib']:.0f} | {ratio:.2f} |"
            )
    return "\n\n".join(
        [
            "# Data preparation at scale (issue 17)",
            "The training split is N copies of WikiText-2's; each row's first run trains the tokenizer and "
            "tokenizes every split into arrays on disk, then iterates one epoch of training blocks (64 x 32); the "
            "cached run does the same with what the first left. Peak RSS is each process's own (imports "
            "included); the workers' column is what the processes forked to tokenize add to it: the largest sum of "
            "their unique set sizes (pages they share with no other process), sampled every 0.1 s. MB/s is "
            "training-split megabytes over the first "
            "run's preparation time (validation and, for BPE, training the tokenizer included in the time). "
            "Where the library tokenizes the split in a process per core, the same preparation in one process "
            "(`tokenize_processes: 1`, a cache of its own) gives the speed-up.",
            "\n".join(lines),
            "## Against Hugging Face tokenizers doing the same work directly\n\n"
            "Each trained tokenizer's first run (a fresh cache) against another fresh process that does the same "
            "work with `tokenizers` alone: `Tokenizer.train` of the same model and trainer on the training file, "
            "then `encode_batch_fast` over every split's lines in batches of 8,192, reading the ids out. The two "
            "run in turn, `runs each` times (`--repeats`), and the times are their medians. The library's "
            "preparation also checks the text is UTF-8, fingerprints it, counts each token's bytes (for bits per "
            "byte) and writes the arrays to disk.",
            "\n".join(direct),
            "## Mining the whole training split\n\n"
            "An untrained model (d_model 16) scores every training token with the learned exit classifier at "
            "exit 1 (threshold 0.5); the set keeps one bit per token. Peak RSS is the mining process's own "
            "(imports included).",
            "\n".join(mining),
        ]
    )


if __name__ == "__main__":
    main()
