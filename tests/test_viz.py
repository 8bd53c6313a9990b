"""Figures have the expected size and curves; TensorBoard gets our tags, read back through a real server."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from lego_lightning import Stage, viz
from lego_lightning.callbacks import ExitDiagnostics
from tests.helpers import quiet_trainer, synthetic, tiny_lm

SWEEP = [{"flops_ratio": r, "ppl": 10 + 5 * r, "threshold": t} for r, t in ((0.6, 0.1), (0.8, 0.4), (1.0, 1.0))]


def test_figures_have_their_size_and_one_line_per_curve():
    fig = viz.sweep_curve({"ashem": SWEEP, "baseline": SWEEP[:2]}, points={"full": (1.0, 9.0)})
    assert [round(v) for v in fig.get_size_inches() * fig.dpi] == [650, 420]
    assert len(fig.axes[0].lines) == 3 and fig.axes[0].get_legend_handles_labels()[1] == ["ashem", "baseline", "full"]
    hist = viz.confidence_histogram({2: torch.rand(500), 4: torch.rand(500)}, threshold=0.3)
    assert len(hist.axes[0].patches) == 2 * 60 and len(hist.axes[0].lines) == 1  # two exits' bars, the threshold line
    stacked = viz.exit_fractions({2: [(0, 0.7), (10, 0.6)], 4: [(0, 0.3), (10, 0.4)]})
    assert len(stacked.axes[0].collections) == 2
    curves = viz.metric_curves({"val/exit2/ppl": [(0, 30.0), (5, 20.0)], "val/exit4/ppl": [(0, 28.0), (5, 18.0)]})
    assert len(curves.axes[0].lines) == 2


def fit_with_diagnostics(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    lm = tiny_lm(stages=[Stage((1, 1), 0.5), Stage((2, 3), 0.5)], routing_threshold=0.05)
    logger = TensorBoardLogger(str(tmp_path), name="run", default_hp_metric=False)
    trainer = quiet_trainer(
        tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[ExitDiagnostics(max_batches=2)]
    )
    trainer.fit(lm, synthetic())
    return logger.log_dir


def test_diagnostics_write_histograms_figures_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(fit_with_diagnostics(tmp_path), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "exits/exit1_confidence" in tags["histograms"]
    assert {"exits/confidence", "exits/sweep", "exits/fractions"} <= set(tags["images"])
    assert len(events.Images("exits/sweep")) == 2  # one per epoch
    assert "hp/ppl" in tags["scalars"] and "val/routed/exit1_frac" in tags["scalars"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url, timeout=60):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_a_real_tensorboard_server_serves_our_tags(tmp_path):
    log_dir = fit_with_diagnostics(tmp_path)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(tmp_path / "run"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/data/plugin"
        scalars = {}
        for _ in range(60):  # the server loads event files in the background
            scalars = get_json(f"{base}/scalars/tags")
            if scalars and "train/loss" in next(iter(scalars.values())):
                break
            time.sleep(0.5)
        run = next(iter(scalars))
        assert {"train/loss", "val/ppl", "val/exit1/ppl", "val/routed/flops_ratio"} <= set(scalars[run])
        histograms = get_json(f"{base}/histograms/tags")
        assert "exits/exit1_confidence" in histograms[run]
        series = get_json(f"{base}/scalars/scalars?run={run}&tag=val/ppl")
        assert len(series) == 2 and all(point[2] > 0 for point in series)  # [wall_time, step, value] per epoch
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert log_dir


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer"):
        ExitDiagnostics(every_n_epochs=0)
