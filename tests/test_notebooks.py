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
def test_notebook_executes(
    path: Path, smol_dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs a copy in tmp_path (the tracked file stays byte for byte as committed); every plotly
    figure also comes out as a static PNG, and no cell warns "IProgress not found"."""
    monkeypatch.setenv("GEAR_LAB_DUMP", str(smol_dump))
    monkeypatch.setenv("GEAR_LAB_FAST", "1")
    second = tmp_path / "second.h5"  # presets_pareto's two-dump section, on a second path
    second.write_bytes(smol_dump.read_bytes())
    monkeypatch.setenv("GEAR_LAB_SECOND_DUMP", str(second))
    committed = path.read_bytes()
    copy = tmp_path / path.name
    copy.write_bytes(committed)
    nb = nbformat.read(copy, as_version=4)
    # an extra last cell reports which interpreter ran the kernel: it must be this venv's
    nb.cells.append(nbformat.v4.new_code_cell("import sys, json; print(json.dumps(sys.prefix))"))
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    nbformat.write(nb, copy)
    assert path.read_bytes() == committed, "running a notebook must not modify the tracked file"

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
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    plotly_outputs = [out for out in outputs if PLOTLY_MIME in out.get("data", {})]
    assert all("image/png" in out["data"] for out in plotly_outputs), "a figure without a PNG"
    streams = "".join(out.get("text", "") for out in outputs if out.get("output_type") == "stream")
    assert "IProgress not found" not in streams
