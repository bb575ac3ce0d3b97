"""benchmarks/speed.py times each method alongside the copy it is compared with, in alternating
rounds: checked with a fake clock (call order, bests, warm-ups) and by one short real run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from benchmark_module import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speed.py"


def test_seconds_alternates_rounds_and_keeps_each_best(monkeypatch) -> None:
    speed = load_benchmark("speed")
    now, calls = [0.0], []
    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])  # budgets run on it too

    def timed(name: str, durations: list[float]):
        def fn() -> None:
            calls.append(name)
            now[0] += durations.pop(0)

        return fn

    def flat(rounds: list[list[float]]) -> list[float]:
        return [d for durations in rounds for d in durations]

    # a round's budget is 4 s / 4 rounds; at most 8 // 4 timed calls per round (durations
    # are binary fractions: the fake clock's sums stay exact)
    # copy: per round a warm-up and two timed calls; the fastest is round 3's second
    copy = timed(
        "copy", flat([[0.5, 0.25, 0.25], [0.5, 0.5, 0.5], [0.5, 0.25, 0.0625], [0.5, 0.25, 0.25]])
    )
    # slow: its first call outlasts a round's budget, so no more warm-ups, and each round
    # stops after one timed call
    slow = timed("slow", flat([[3.0, 7.0], [1.5], [9.0], [2.0]]))
    best = speed.seconds([copy, slow], torch.device("cpu"), 4.0, 8, clock=lambda: now[0], rounds=4)
    assert best == [0.0625, 1.5]
    assert calls == ["copy"] * 3 + ["slow"] * 2 + (["copy"] * 3 + ["slow"]) * 3


def test_speed_quick_run_prints_paired_copies() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--shape", "llama3",
         "--budget", "0.05", "--threads", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split("|") for line in out.stdout.splitlines()]
    table = [[cell.strip() for cell in row] for row in rows if len(row) == 10]
    header, body = table[0], table[1:]
    assert header[:5] == ["shape", "method", "impl", "copy GB/s", "comp GB/s"]
    copy_row = next(row for row in body if row[1] == "copy")
    methods = [row for row in body if row[1] != "copy"]
    assert {(row[1], row[2]) for row in methods} >= {("gear-2bit", "torch"), ("kivi", "torch")}
    for row in methods:  # each ratio against the row's own copy, at most the best copy
        copy_gbs, comp, share = float(row[3]), float(row[4]), float(row[5].rstrip("%"))
        assert 0 < copy_gbs <= float(copy_row[3])
        assert abs(share - 100 * comp / copy_gbs) < 0.01 + 1e-3 * share
