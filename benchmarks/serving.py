"""GEAR's memory and throughput experiment (Kang et al., 2024, section 4.4), scaled to this machine.

Workload (the paper's shape): a prompt of ``--prompt-tokens`` tokens of the corpus, repeated
across the batch, then greedy decoding to ``prompt + --new-tokens`` tokens, prefilled in chunks of
``--chunk`` tokens. Every (cache, batch) runs in its own process (:func:`gear_lab.serving.probe`,
whose docstring says what is measured: ``peak`` RSS above the loaded model, ``held`` resident
cache bytes, decode ``tok/s``); ``GEAR_LAB_THREADS=1`` limits each process to one torch thread.

Two studies, ratios against ``DynamicCache`` measured in the same run:

(a) ``--study batch``: every cache at ``--batch``;
(b) ``--study budget``: for each budget in ``--budgets-mib``, the largest batch each cache fits
    (searched by measurement: batches are doubled, then bisected, each probe its own process) and
    its total tokens/s;
(c) ``--study speed``: decode tokens/s alone at ``--batch``, every cache in this process with
    their steps interleaved (:func:`gear_lab.serving.interleaved_speed`), so load from other
    jobs on a shared machine falls on all alike.

    python benchmarks/serving.py --study batch [--model smollm2-135m] [--batch 8]
    python benchmarks/serving.py --study budget --budgets-mib 256,512,1024 [--plot serving.html]
    python benchmarks/serving.py --study speed --batch 1 --caches "DynamicCache,GEAR 2-bit"
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from gear_lab.errors import GearLabError
from gear_lab.serving import (
    Probe,
    add_workload_arguments,
    interleaved_speed,
    probe,
    workload_from,
)

CACHES = {
    "DynamicCache": "dynamic",
    "QuantizedCache quanto 2-bit": "quantized:quanto:2:64",
    "KIVI-style 2-bit": "kivi",
    "GEAR 2-bit": "gear:bits=2",
    "GEAR-L 2-bit": "gear-l:bits=2",
    "GEAR 2-bit workspace": "gear:bits=2,workspace=1",  # the speed option: decompressed workspace
}


def run_probe(spec: str, batch: int, args: argparse.Namespace) -> Probe:
    """One (cache, batch) measured in a fresh process (:func:`gear_lab.serving.probe`)."""
    try:
        result = probe(spec, batch, workload_from(args))
    except GearLabError as err:
        raise SystemExit(f"serving: {err}") from None
    print(
        f"  {spec:24} batch {batch:3}: peak {result.peak_mib:8.1f} MiB, held "
        f"{result.held_mib:7.1f} MiB, {result.tok_s:6.1f} tok/s",
        file=sys.stderr,
    )
    return result


# ------------------------------------------------------------------------------------- search


def largest_batch(
    measure: Callable[[int], float], budget: float, max_batch: int, known: dict[int, float]
) -> int:
    """Largest batch ``b <= max_batch`` whose measured peak ``measure(b)`` is within ``budget``.

    Peak memory grows with the batch, so batches are doubled until one does not fit, then the
    gap is bisected. ``known`` (batch -> measured peak) is reused and extended, so a sweep over
    several budgets measures each batch once. Returns 0 when even batch 1 does not fit.
    """

    def fits(b: int) -> bool:
        if b not in known:
            known[b] = measure(b)
        return known[b] <= budget

    if not fits(1):
        return 0
    lo = 1
    while lo < max_batch and fits(min(2 * lo, max_batch)):
        lo = min(2 * lo, max_batch)
    if lo == max_batch:
        return lo
    hi = min(2 * lo, max_batch)  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ------------------------------------------------------------------------------------- studies


def study_batch(args: argparse.Namespace, caches: dict[str, str]) -> None:
    probes = {label: run_probe(spec, args.batch, args) for label, spec in caches.items()}
    ref = probes.get("DynamicCache")
    print(
        f"\n(a) equal batch {args.batch}: {args.model}, prompt {args.prompt_tokens} + "
        f"{args.new_tokens} new tokens, prefill chunks of {args.chunk}, one process per row"
    )
    print(
        "peak: peak memory above the loaded model; total: plus the model process's memory; "
        "held: the cache's resident bytes at the end (GearCache: compressed + index + buffers "
        "+ transient)"
    )
    print(
        f"{'cache':28} {'peak MiB':>9} {'x lower':>8} {'total MiB':>10} {'x lower':>8} "
        f"{'held MiB':>9} {'x lower':>8} {'tok/s':>7} {'x speed':>8}"
    )
    nan = float("nan")
    for label, p in probes.items():
        total, ref_total = p.model_mib + p.peak_mib, ref.model_mib + ref.peak_mib if ref else nan
        peak_x = ref.peak_mib / p.peak_mib if ref else nan
        held_x = ref.held_mib / p.held_mib if ref else nan
        speed_x = p.tok_s / ref.tok_s if ref else nan
        print(
            f"{label:28} {p.peak_mib:9.1f} {peak_x:8.2f} {total:10.1f} {ref_total / total:8.2f} "
            f"{p.held_mib:9.1f} {held_x:8.2f} {p.tok_s:7.1f} {speed_x:8.2f}"
        )


def study_budget(args: argparse.Namespace, caches: dict[str, str]) -> list[dict]:
    budgets = [float(b) for b in args.budgets_mib.split(",")]
    rows: list[dict] = []
    for label, spec in caches.items():
        print(f"{label}:", file=sys.stderr)
        probes: dict[int, Probe] = {}

        def measure(b: int, spec: str = spec, probes: dict[int, Probe] = probes) -> float:
            probes[b] = run_probe(spec, b, args)
            return probes[b].peak_mib

        known: dict[int, float] = {}
        for budget in budgets:
            b = largest_batch(measure, budget, args.max_batch, known)
            tok_s = probes[b].tok_s if b else 0.0
            rows.append({"cache": label, "budget_mib": budget, "batch": b, "tok_s": tok_s})
    ref = {r["budget_mib"]: r["tok_s"] for r in rows if r["cache"] == "DynamicCache"}
    print(
        f"\n(b) fixed memory budget: {args.model}, prompt {args.prompt_tokens} + "
        f"{args.new_tokens} new tokens; largest batch whose measured peak fits"
    )
    print(f"{'cache':28} {'budget MiB':>10} {'batch':>6} {'tok/s':>8} {'x DynamicCache':>15}")
    for r in rows:
        base = ref.get(r["budget_mib"]) or float("nan")
        print(
            f"{r['cache']:28} {r['budget_mib']:10.0f} {r['batch']:6d} {r['tok_s']:8.1f} "
            f"{r['tok_s'] / base:15.2f}"
        )
    return rows


def study_speed(args: argparse.Namespace, caches: dict[str, str]) -> None:
    workload = workload_from(args)
    threads = os.environ.get("GEAR_LAB_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    speed = interleaved_speed(list(caches.values()), args.batch, workload)
    ref = speed.get(caches.get("DynamicCache", ""), float("nan"))
    print(
        f"\n(c) decode speed at batch {args.batch}: {args.model}, prompt {args.prompt_tokens} + "
        f"{args.new_tokens} new tokens, every cache in one process, steps interleaved, median step"
    )
    print(f"{'cache':28} {'tok/s':>7} {'x speed':>8}")
    for label, spec in caches.items():
        print(f"{label:28} {speed[spec]:7.1f} {speed[spec] / ref:8.2f}")


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s against budget, one line per cache (plotly HTML)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for label in dict.fromkeys(r["cache"] for r in rows):
        pts = [r for r in rows if r["cache"] == label]
        fig.add_scatter(
            x=[r["budget_mib"] for r in pts],
            y=[r["tok_s"] for r in pts],
            mode="lines+markers",
            name=label,
            text=[f"batch {r['batch']}" for r in pts],
        )
    fig.update_layout(
        xaxis_title="peak memory budget above the model (MiB)",
        yaxis_title="decode tokens/s (whole batch)",
        template="plotly_white",
    )
    fig.write_html(path, include_plotlyjs="cdn")
    print(f"plot written to {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=("batch", "budget", "speed"), default="batch")
    add_workload_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="batch of study (a)")
    parser.add_argument("--budgets-mib", default="256,512,1024,2048")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--caches", default=",".join(CACHES), help="labels to run")
    parser.add_argument("--plot", type=Path, help="HTML file for the budget study's curve")
    args = parser.parse_args(argv)
    for name in ("batch", "max_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        workload_from(args)
    except GearLabError as err:
        parser.error(str(err))
    labels = [c.strip() for c in args.caches.split(",")]
    unknown = [c for c in labels if c not in CACHES]
    if unknown:
        parser.error(f"unknown cache(s) {unknown}; choose from {list(CACHES)}")
    caches = {label: CACHES[label] for label in labels}
    if args.study == "batch":
        study_batch(args, caches)
    elif args.study == "speed":
        study_speed(args, caches)
    else:
        rows = study_budget(args, caches)
        if args.plot:
            plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
