"""Execute every notebook under notebooks/ from top to bottom."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Notebooks read the real GDSC files from MTL4C_DATA (default: ../shared/data next to the repo).
DATA = Path(os.environ.get("MTL4C_DATA", ROOT.parent / "shared" / "data"))
if not DATA.is_absolute():
    DATA = ROOT / "notebooks" / DATA


def _source(nb) -> str:
    return "\n".join(cell.source for cell in nb.cells)


def _text(cell) -> str:
    """Everything a code cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    # One torch thread in the kernel, as in every other test: the suite runs in two
    # workers on 2 cores, and two-thread kernels competing for them slow down manyfold.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if "MTL4C_DATA" in _source(nb) and not DATA.is_dir():
        pytest.skip(f"real GDSC data not found at {DATA}")
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "coverage" in _text(code[-1]), "the last cell should print a summary with coverage"
