"""Every notebook runs top to bottom, and is committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_the_three_walkthroughs_are_here():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "ashem", "dropin"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def kernel():
    """One kernel for every notebook: each starts from an empty namespace (``%reset``), but torch and Lightning
    are imported once. It inherits this process's environment: offline datasets, the tests' own cache."""
    manager = KernelManager(kernel_name="python3")
    manager.start_kernel(cwd=str(REPO))
    yield manager
    manager.shutdown_kernel(now=True)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, kernel):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))  # nothing a notebook before it defined
    NotebookClient(nb, km=kernel, timeout=900, resources={"metadata": {"path": str(REPO)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any(
        o.output_type == "display_data" or "image/png" in o.get("data", {})
        for c in nb.cells
        for o in c.get("outputs", [])
    )  # it drew at least one figure
