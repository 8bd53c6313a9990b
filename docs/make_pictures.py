"""Make the README's pictures: a threshold sweep figure and two TensorBoard screenshots.

Trains a small deep-supervision + early-exit model on a slice of WikiText-2 (a couple of minutes
on 2 CPU cores) with the CLI's default loggers, draws the sweep with ``lego_lightning.viz``, then
starts a real TensorBoard on the run and photographs it with headless Chromium (Debian's
``chromium`` package; skipped with a message when it is missing).

    python docs/make_pictures.py [--data ../shared/data/wikitext-2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent


def train(data: Path, logs: Path) -> Path:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lego_lightning import Stage, SupervisedExitLM
    from lego_lightning.callbacks import ExitDiagnostics
    from lego_lightning.data import TextDataModule

    dm = TextDataModule(
        path=str(data), seq_len=32, batch_size=32, max_train_samples=1500, max_val_samples=200, max_vocab_size=4000
    )
    L.seed_everything(0, verbose=False)
    model = SupervisedExitLM(
        vocab_size=dm.vocab_size,
        n_layers=3,
        d_model=64,
        n_heads=4,
        max_seq_len=32,
        lr=3e-3,
        routing_threshold=0.3,
        stages=[Stage((1, 1), 1 / 3), Stage((2, 2), 1 / 3), Stage((3, 3), 1 / 3)],
    )
    logger = TensorBoardLogger(str(logs), name="deed", default_hp_metric=False)
    trainer = L.Trainer(
        max_epochs=6,
        logger=logger,
        log_every_n_steps=5,
        enable_progress_bar=False,
        callbacks=[ExitDiagnostics(max_batches=4)],
    )
    trainer.fit(model, dm)
    sweep_figure(model, dm)
    return Path(logger.log_dir)


def sweep_figure(model, dm) -> None:
    import torch

    from lego_lightning import viz
    from lego_lightning.evaluation import collect_exit_outputs, threshold_sweep

    outputs = collect_exit_outputs(model, dm.val_dataloader())
    thresholds = sorted({0.0, 1.0, *torch.quantile(outputs.confidence[0], torch.linspace(0, 1, 21)).tolist()})
    sweep = threshold_sweep(outputs, model.config, thresholds)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    viz.sweep_curve({"FLOPs, everything counted": sweep}, x="flops_ratio", title="What early exit costs", ax=axes[0])
    viz.sweep_curve({"layers only (the research)": sweep}, x="layers_ratio", title="What it looks like", ax=axes[1])
    viz.save(fig, DOCS / "sweep.png")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshots(logs: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("chromium not found: no TensorBoard screenshots (apt-get install chromium)")
        return
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/scalars/tags", timeout=5) as r:
                    if b"val/ppl" in r.read():
                        break
            except OSError:
                pass
            time.sleep(0.5)
        pages = {
            "tensorboard_scalars.png": f"http://127.0.0.1:{port}/#scalars&tagFilter=val%2F(exit%5Cd%2Fppl%7Crouted%2F)",
            "tensorboard_figures.png": f"http://127.0.0.1:{port}/#images&tagFilter=exits%2F(sweep%7Cconfidence)",
        }
        for name, url in pages.items():
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run(
                    [
                        browser,
                        "--headless",
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-quic",
                        "--no-first-run",
                        "--disable-background-networking",
                        "--disable-component-update",
                        "--disable-sync",
                        f"--user-data-dir={profile}",
                        "--hide-scrollbars",
                        "--window-size=1400,900",
                        "--virtual-time-budget=15000",
                        f"--screenshot={DOCS / name}",
                        url,
                    ],
                    check=True,
                    capture_output=True,
                    timeout=180,
                )
            print("wrote", DOCS / name)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as logs:
        train(args.data, Path(logs))
        screenshots(Path(logs))
    print("wrote", DOCS / "sweep.png")


if __name__ == "__main__":
    main()
