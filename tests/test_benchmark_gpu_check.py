"""benchmarks.gpu_check on a machine without CUDA: it says so, fails, and writes nothing."""

import subprocess
import sys

from benchmarks.common import RESULTS
from tests.conftest import REPO
from tests.helpers import subprocess_env


def test_without_cuda_it_says_so_exits_non_zero_and_writes_nothing():
    before = {p: p.stat().st_mtime_ns for p in RESULTS.glob("gpu_check*")}
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert "no CUDA device here" in proc.stderr and "nothing written" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in RESULTS.glob("gpu_check*")} == before
