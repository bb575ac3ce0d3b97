"""Sweep throughput: the Ray executor with N local workers next to the serial executor, on the
same sweep, measured in one run, with the tables checked equal row for row.

Ray's start-up (``ray.init`` and N workers importing torch and gear-lab) is timed apart and left
out of the Ray throughput. The serial sweep runs in this process with torch's default threads
(what a user gets), and again with one thread, as each Ray worker runs (Ray gives a worker of one
CPU one thread). Target (issue 17): Ray with 2 local workers >= 1.7x the serial throughput.

    python benchmarks/sweep_scale.py DUMP.h5 [DUMP.h5 ...] [--layers 0-7] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from gear_lab.errors import GearLabError
from gear_lab.executors import RayExecutor
from gear_lab.sweeps import parse_grid, sweep

TARGET = 1.7


def _warm(_: int) -> int:
    """Occupy one worker for a moment after importing what a sweep task imports."""
    import gear_lab.sweeps  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dumps", nargs="+", type=Path, help="dumps to sweep (one table)")
    parser.add_argument("--grid", default="method=gear,kivi;bits=2,4;rank=0,2")
    parser.add_argument("--layers", default="0-7", help="layers of each dump (default: 0-7)")
    parser.add_argument("--workers", type=int, default=2, help="local Ray workers (default: 2)")
    args = parser.parse_args(argv)
    import ray

    options = dict(grid=parse_grid(args.grid), layers=args.layers, progress=False)
    try:
        threads = torch.get_num_threads()
        sweep(args.dumps, **options)  # warm-up: page cache, lazy imports, first-call set-up
        start = time.perf_counter()
        serial = sweep(args.dumps, **options)
        serial_s = time.perf_counter() - start
        torch.set_num_threads(1)
        start = time.perf_counter()
        sweep(args.dumps, **options)
        one_thread_s = time.perf_counter() - start
        torch.set_num_threads(threads)

        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        pids = ray.get([ray.remote(num_cpus=1)(_warm).remote(i) for i in range(args.workers)])
        startup_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as shards:
            start = time.perf_counter()
            parallel = sweep(args.dumps, executor=RayExecutor(shards=Path(shards)), **options)
            ray_s = time.perf_counter() - start
        ray.shutdown()
    except GearLabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pd.testing.assert_frame_equal(parallel, serial)

    rows, tasks = len(serial), serial.groupby(["dump", "sample", "layer"]).ngroups
    print(f"sweep: {', '.join(map(str, args.dumps))}; layers {args.layers}; grid {args.grid}")
    print(f"{rows} rows, {tasks} tasks; torch {torch.__version__}, {threads} threads")
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs at the end")
    print(f"serial           {serial_s:7.1f} s  {rows / serial_s:7.1f} rows/s")
    print(f"serial, 1 thread {one_thread_s:7.1f} s  {rows / one_thread_s:7.1f} rows/s")
    print(f"ray start-up     {startup_s:7.1f} s  ({len(set(pids))} workers, excluded)")
    print(f"ray, {args.workers} workers   {ray_s:7.1f} s  {rows / ray_s:7.1f} rows/s")
    speedup = serial_s / ray_s
    verdict = "met" if speedup >= TARGET else "NOT met"
    print(f"speed-up {speedup:.2f}x (target >= {TARGET}x: {verdict}); tables equal row for row")
    print(f"speed-up over serial with 1 thread: {one_thread_s / ray_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
