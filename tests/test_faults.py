"""Small versions of ``benchmarks/faults.py``: real SIGKILLs of the real ``lego`` CLI, and a full disk.

A killed run resumed from its ``last.ckpt`` must end exactly where the uninterrupted run ends
(weights, optimizer, step, threshold, hard set, TensorBoard scalars in one folder, the final
table), with dropout on; a write that fails must leave no partial checkpoint behind.
"""

import resource
import signal
import subprocess
import sys

import pytest

from benchmarks import faults
from lego_lightning.checkpoint_io import read_checkpoint
from tests.conftest import REPO
from tests.helpers import cli_args, subprocess_env


def args_for(config, corpus, logs, *extra):
    """A small fit with step checkpoints every 3 steps; ASHEM 2 + 1 epochs, standard 2."""
    if config == "ashem.yaml":
        length = ["--data.calibration_samples", "4", "--model.phase1_max_epochs", "2", "--model.phase2_max_epochs", "1"]
    else:
        length = ["--trainer.max_epochs", "2"]
    return cli_args("fit", config, corpus, logs, "--checkpoint.every_n_train_steps", "3", *length, *extra)


def lego(args, **kwargs):
    proc = subprocess.run(
        [sys.executable, "-m", "lego_lightning.cli", *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )
    return proc


def killed_then_resumed(config, corpus, logs, point, step):
    args = args_for(config, corpus, logs)
    killed = lego([*args, "--trainer.callbacks+=benchmarks.faults.KillAt", f"--trainer.callbacks.point={point}",
                   f"--trainer.callbacks.step={step}"])  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = faults.run_folder(logs)
    assert faults.leftovers(folder)["unloadable_ckpt"] == []  # whatever the kill hit, every .ckpt loads
    resumed_from = read_checkpoint(folder / "checkpoints" / "last.ckpt")["global_step"]
    resumed = lego([*args, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return folder, resumed, resumed_from


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    runs = {}
    for config in ("standard.yaml", "ashem.yaml"):
        logs = tmp_path_factory.mktemp(config.removesuffix(".yaml"))
        done = lego(args_for(config, corpus, logs))
        assert done.returncode == 0, done.stderr[-2000:]
        folder = faults.run_folder(logs)
        runs[config] = {"state": faults.end_state(folder), "scalars": faults.scalars(folder), "log": done.stderr}
    return runs


def assert_same_end(folder, resumed, reference):
    state = faults.end_state(folder)
    for key, value in reference["state"].items():
        assert faults.identical(state[key], value), key
    assert faults.scalars(folder) == reference["scalars"]  # one folder, nothing logged twice
    assert faults.final_table(resumed.stderr) == faults.final_table(reference["log"])
    assert len(list(folder.parent.glob("version_*"))) == 1


def test_standard_killed_mid_epoch_resumes_bit_for_bit(corpus, tmp_path, uninterrupted):
    # 15 batches per epoch: step 20 is in epoch 1, whose step checkpoints are at 18 and 21.
    folder, resumed, resumed_from = killed_then_resumed("standard.yaml", corpus, tmp_path, "train_batch", 20)
    assert resumed_from == 18
    assert_same_end(folder, resumed, uninterrupted["standard.yaml"])


@pytest.mark.parametrize(("point", "step"), [("phase_switch", 0), ("checkpoint_write", 28)])
def test_ashem_killed_at_the_phase_switch_or_mid_write_resumes_bit_for_bit(
    corpus, tmp_path, uninterrupted, point, step
):
    folder, resumed, _ = killed_then_resumed("ashem.yaml", corpus, tmp_path, point, step)
    assert_same_end(folder, resumed, uninterrupted["ashem.yaml"])
    assert "ASHEM two-stage evaluation (phase 2" in resumed.stderr
    assert faults.leftovers(folder) == {"unloadable_ckpt": [], "temporary_files": []}


def test_a_write_that_fails_leaves_earlier_checkpoints_whole_and_says_which_file(corpus, tmp_path):
    args = args_for("standard.yaml", corpus, tmp_path)
    first = lego([*args, "--trainer.max_epochs", "1"])
    assert first.returncode == 0, first.stderr[-2000:]
    folder = faults.run_folder(tmp_path)
    before = {p.name: p.read_bytes() for p in (folder / "checkpoints").glob("*.ckpt")}
    size = min(len(b) for b in before.values())

    def limit_file_size():  # a full disk, for one file: writes past the limit fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, resource.RLIM_INFINITY))

    resumed = lego([*args, "--ckpt_path", str(folder / "checkpoints" / "last.ckpt")], preexec_fn=limit_file_size)
    assert resumed.returncode == 2
    assert "Traceback" not in resumed.stderr
    assert "lego: error: could not write the checkpoint " + str(folder / "checkpoints") in resumed.stderr
    assert "File too large" in resumed.stderr
    after = {p.name: p.read_bytes() for p in (folder / "checkpoints").iterdir()}
    assert after == before  # nothing new, nothing partial, the old ones byte for byte


def test_a_full_tmpfs_leaves_no_truncated_checkpoint(corpus, tmp_path):
    measured = lego(args_for("standard.yaml", corpus, tmp_path / "measure", "--trainer.max_epochs", "1"))
    assert measured.returncode == 0, measured.stderr[-2000:]
    size = max(p.stat().st_size for p in (tmp_path / "measure").rglob("*.ckpt"))
    with faults.tmpfs(int(2.5 * size)) as disk:
        if disk is None:
            pytest.skip("mounting a tmpfs is not allowed here")
        run = lego(args_for("standard.yaml", corpus, disk / "logs"))
        assert run.returncode == 2 and "No space left on device" in run.stderr
        files = faults.checkpoint_files(disk / "logs")
        assert files and all(verdict == "loads" for verdict in files.values()), files
        assert not list((disk / "logs").rglob(".*.tmp"))
