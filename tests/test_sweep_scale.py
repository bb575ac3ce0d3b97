"""benchmarks/sweep_scale.py runs its parts on the real demo dump and checks its own tables: the
batched sweep against one at a time, compress_ranks against one compression, and the package of
issue 17's filing (from git history) against this tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "sweep_scale.py"


def test_sweep_scale_parts_run_and_compare_tables(smol_dump: Path) -> None:
    filed = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", "236fc56^{commit}"], capture_output=True
    )
    if filed.returncode:
        pytest.skip("needs the git history holding commit 236fc56")
    grid = "method=gear,kivi;bits=2;rank=0,2,4"
    args = [sys.executable, str(SCRIPT), str(smol_dump), "--layers", "0", "--grid", grid]
    out = subprocess.run(
        [*args, "--parts", "batch,ranks,filed", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    assert "tables equal to rtol 1e-05" in text
    assert "3 ranks / one compression" not in text and "2 ranks / one compression" in text
    assert "at 236fc56" in text and "this tree" in text
    # 2 methods x ranks 0 and 4 x 2 kinds x 3 heads
    assert "24 rows (rank 0 and the largest) equal" in text
