"""Every notebook in notebooks/ runs top to bottom on the session's real dump; a failing cell fails.

The notebooks read their dump from ``GEAR_LAB_DUMP`` (default: the ``make demo`` dump) and shrink
their work when ``GEAR_LAB_FAST=1`` (fewer grid points, small perplexity windows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def test_the_three_notebooks_exist() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["error_vs_rank", "error_vs_sparsity", "presets_pareto"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                "strip outputs before commit"
            )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path: Path, smol_dump: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEAR_LAB_DUMP", str(smol_dump))
    monkeypatch.setenv("GEAR_LAB_FAST", "1")
    nb = nbformat.read(path, as_version=4)
    # an extra last cell reports which interpreter ran the kernel: it must be this venv's
    nb.cells.append(nbformat.v4.new_code_cell("import sys, json; print(json.dumps(sys.prefix))"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    assert json.loads(nb.cells[-1].outputs[0]["text"]) == sys.prefix
    figures = [
        out["data"][PLOTLY_MIME]
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if PLOTLY_MIME in out.get("data", {})
    ]
    assert figures, "each notebook shows at least one plotly figure"
    assert all(fig["data"] for fig in figures), "a figure without traces"
