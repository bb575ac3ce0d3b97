"""benchmarks/serving.py: the largest-batch search (pure, with a fake measure) and one real probe."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "serving.py"
TINY = ["--prompt-tokens", "64", "--new-tokens", "4", "--chunk", "32"]


@pytest.fixture(scope="module")
def serving():
    spec = importlib.util.spec_from_file_location("serving_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("budget", "max_batch", "want"),
    [(0.5, 64, 0), (1.0, 64, 1), (7.5, 64, 7), (10.0, 64, 10), (100.0, 64, 64), (7.5, 5, 5)],
)
def test_largest_batch_search(serving, budget, max_batch, want):
    """Peak = batch: the search returns the largest fitting batch, measures each
    batch once, and reuses what earlier budgets measured."""
    calls: list[int] = []

    def measure(batch: int) -> float:
        calls.append(batch)
        return float(batch)

    known: dict[int, float] = {}
    assert serving.largest_batch(measure, budget, max_batch, known) == want
    assert len(calls) == len(set(calls)) <= 2 * max_batch.bit_length()
    again = len(calls)
    assert serving.largest_batch(measure, budget, max_batch, known) == want
    assert len(calls) == again  # all known


def test_tiny_probe_runs_in_its_own_process(serving):
    """One real probe: SmolLM2, GEAR 2-bit, batch 2, 64 prompt + 4 new tokens."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--worker", "gear:bits=2", "--batch", "2", *TINY],
        capture_output=True,
        text=True,
        check=True,
    )
    probe = serving.Probe(**json.loads(out.stdout.strip().splitlines()[-1]))
    assert probe.batch == 2 and probe.cache == "gear:bits=2" and probe.device == "cpu"
    assert probe.tok_s > 0 and probe.held_mib > 0 and probe.peak_mib < 400
