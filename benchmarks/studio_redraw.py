"""How fast the studio redraws when a user moves a widget, on a real dump.

Drives the Error explorer and the Spectra pages headless through ``streamlit.testing.v1.AppTest``
on ``--dump`` (default: the demo dump, 512-token SmolLM2 layers) and times each rerun after one
widget changes. The baseline of every ratio is a rerun with nothing changed (the page's fixed
cost), measured in the same run. The target of the studio issue: a slider move on a layer-sized
tensor redraws in well under a second.

    python benchmarks/studio_redraw.py [--dump dumps/smollm2-135m-pydoc.h5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from streamlit.testing.v1 import AppTest

from gear_lab.constants import DEFAULT_MODEL
from gear_lab.studio import STUDIO_SCRIPT


def timed_run(at: AppTest) -> float:
    """Seconds of one rerun; fails loudly if the page raised."""
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise SystemExit(f"studio_redraw: the page raised: {at.exception[0].message}")
    return seconds


def measure(at: AppTest, change: Callable[[AppTest, int], None], repeat: int) -> float:
    """Median seconds of ``repeat`` reruns, each after ``change(at, i)``."""
    times = []
    for i in range(repeat):
        change(at, i)
        times.append(timed_run(at))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dump", type=Path, default=Path("dumps") / f"{DEFAULT_MODEL}-pydoc.h5")
    parser.add_argument("--repeat", type=int, default=3, help="reruns per row (median)")
    args = parser.parse_args()
    if not args.dump.is_file():
        print(f"studio_redraw: no dump at {args.dump} (run `make demo` first)", file=sys.stderr)
        return 2
    os.environ["GEAR_LAB_DUMP"] = str(args.dump.resolve())
    print(f"dump {args.dump}; median of {args.repeat} reruns; ratio = seconds / unchanged rerun")
    print(f"{'page':<10} {'widget change':<34} {'seconds':>8} {'ratio':>6}")
    for page, rows in PAGES.items():
        at = AppTest.from_file(str(STUDIO_SCRIPT), default_timeout=600).run()
        at.switch_page(f"app_pages/{page}.py").run()
        for _ in range(2):  # warm the caches of the page's default view
            timed_run(at)
        base = measure(at, lambda at, i: None, args.repeat)
        print(f"{page:<10} {'(nothing: baseline)':<34} {base:8.3f} {1:6.2f}")
        for label, change in rows.items():
            seconds = measure(at, change, args.repeat)
            print(f"{page:<10} {label:<34} {seconds:8.3f} {seconds / base:6.2f}")
    return 0


def _slider(suffix: str, values: tuple[float, ...]) -> Callable[[AppTest, int], None]:
    """Set the first slider whose key ends with ``suffix`` to ``values[i % len(values)]``."""

    def change(at: AppTest, i: int) -> None:
        key = next(s.key for s in at.slider if s.key and s.key.endswith(suffix))
        at.slider(key=key).set_value(values[i % len(values)])

    return change


def _select(suffix: str) -> Callable[[AppTest, int], None]:
    """Step the first select box whose key ends with ``suffix`` through its options."""

    def change(at: AppTest, i: int) -> None:
        box = next(s for s in at.selectbox if s.key and s.key.endswith(suffix))
        box.set_value(box.options[(i + 1) % len(box.options)])

    return change


PAGES: dict[str, dict[str, Callable[[AppTest, int], None]]] = {
    "explorer": {
        "rank slider (new setting)": _slider("-rank", (1, 3, 5)),
        "rank slider (seen setting)": _slider("-rank", (1, 3, 5)),
        "head select": _select("-head"),
    },
    "spectra": {
        "head select": _select("-head"),
        "energy share slider": _slider("spectra-share", (0.8, 0.95, 0.99)),
    },
}


if __name__ == "__main__":
    sys.exit(main())
