"""GEAR's memory and throughput experiment (Kang et al., 2024, section 4.4), scaled to this machine.

Workload (the paper's shape): a prompt of ``--prompt-tokens`` tokens of the corpus, repeated
across the batch, then greedy decoding to ``prompt + --new-tokens`` tokens. The prompt is
prefilled in chunks of ``--chunk`` tokens, so the attention transients of a whole-prompt prefill
do not hide the cache in the peak. Every (cache, batch) runs in its own process, which reports:

- ``peak_mib``: the process's peak RSS during prefill and decoding minus its RSS after loading the
  model and one warm-up forward (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``; glibc's
  mmap threshold fixed at 64 KiB so freed temporaries leave the RSS); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory held after loading;
- ``held_mib``: the bytes the cache says it holds at the end (``resident_nbytes`` where a cache
  has it: compressed blocks, buffers and any workspace; every tensor it keeps otherwise);
- ``tok_s``: decode tokens per second over the whole batch (prefill excluded).

Two studies, ratios against ``DynamicCache`` measured in the same run:

(a) ``--study batch``: every cache at ``--batch``;
(b) ``--study budget``: for each budget in ``--budgets-mib``, the largest batch each cache fits
    (searched by measurement: batches are doubled, then bisected, each probe its own process) and
    its total tokens/s.

    python benchmarks/serving.py --study batch [--model smollm2-135m] [--batch 8]
    python benchmarks/serving.py --study budget --budgets-mib 256,512,1024 [--plot serving.html]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gear_lab.constants import DEFAULT_MODEL

CACHES = {
    "DynamicCache": "dynamic",
    "QuantizedCache quanto 2-bit": "quantized:quanto:2:64",
    "KIVI-style 2-bit": "kivi",
    "GEAR 2-bit": "gear:bits=2",
    "GEAR-L 2-bit": "gear-l:bits=2",
    "GEAR 2-bit workspace": "gear:bits=2,workspace=1",  # the speed option: decompressed workspace
}


@dataclass
class Probe:
    """What one process measured for one cache at one batch size."""

    cache: str
    batch: int
    peak_mib: float
    held_mib: float
    tok_s: float
    device: str
    model_mib: float = 0.0  # memory after loading the model (RSS; CUDA: allocated)


# ------------------------------------------------------------------------------------- worker


def _rss_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def build_cache(spec: str, model: torch.nn.Module):
    """``"preset:key=value,..."`` -> a GearCache of that preset (integer overrides, and
    ``workspace=1`` for the workspace mode); other specs via make_cache. The workload's rows are
    unpadded copies of one prompt, which a GearCache is told (``set_padding(None)``)."""
    from gear_lab.cache import GearCache
    from gear_lab.cache_specs import make_cache

    name, _, options = spec.partition(":")
    if name in {"dynamic", "quantized"} or not options:
        cache = make_cache(spec, model)
    else:
        overrides = {k: int(v) for k, v in (kv.split("=") for kv in options.split(","))}
        cache = GearCache(name, model_config=model.config, **overrides)
    if isinstance(cache, GearCache):
        cache.set_padding(None)
    return cache


@torch.inference_mode()
def worker(spec: str, model_name: str, batch: int, prompt: int, new: int, chunk: int, device: str):
    """Measure one (cache, batch) in this process and return a :class:`Probe`."""
    from gear_lab import load_model
    from gear_lab.cache import cache_kwarg
    from gear_lab.cache_specs import cache_resident_nbytes
    from gear_lab.corpus import corpus_ids

    torch.manual_seed(0)
    model, tokenizer = load_model(model_name, device=device)
    ids = corpus_ids(tokenizer)[:prompt].to(model.device).expand(batch, -1).contiguous()
    key = cache_kwarg(model)
    # warm-up: the first forward faults the memory-mapped weights in; the base excludes them
    model(input_ids=ids[:1, :8], **{key: build_cache("dynamic", model)})
    gc.collect()
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_kib = _rss_kib("VmRSS")
    _reset_peak()
    cache = build_cache(spec, model)
    for start in range(0, prompt, chunk):
        logits = model(input_ids=ids[:, start : start + chunk], logits_to_keep=1, **{key: cache})
    token = logits.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new):
        token = model(input_ids=token, **{key: cache}).logits[:, -1:].argmax(-1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_rss_kib("VmHWM") - base_kib) / 2**10
    return Probe(
        spec,
        batch,
        peak,
        cache_resident_nbytes(cache) / 2**20,
        batch * new / seconds,
        model.device.type,
        (base if cuda else base_kib * 2**10) / 2**20,
    )


def run_probe(spec: str, batch: int, args: argparse.Namespace) -> Probe:
    """One (cache, batch) measured in a fresh process."""
    cmd = [sys.executable, __file__, "--worker", spec, "--batch", str(batch)]
    for name in ("model", "prompt_tokens", "new_tokens", "chunk", "device"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    # a fixed mmap threshold: glibc returns freed large temporaries to the OS, so the peak RSS
    # measures live memory rather than what the allocator kept after a transient was freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"serving: {spec} at batch {batch} failed: {last}")
    probe = Probe(**json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"  {spec:24} batch {batch:3}: peak {probe.peak_mib:8.1f} MiB, held "
        f"{probe.held_mib:7.1f} MiB, {probe.tok_s:6.1f} tok/s",
        file=sys.stderr,
    )
    return probe


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
    parser.add_argument("--study", choices=("batch", "budget"), default="batch")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=500)
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk (tokens)")
    parser.add_argument("--batch", type=int, default=8, help="batch of study (a)")
    parser.add_argument("--budgets-mib", default="256,512,1024,2048")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--caches", default=",".join(CACHES), help="labels to run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--plot", type=Path, help="HTML file for the budget study's curve")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "new_tokens", "chunk", "batch", "max_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.worker:
        torch.set_num_threads(int(os.environ.get("GEAR_LAB_THREADS", torch.get_num_threads())))
        probe = worker(
            args.worker,
            args.model,
            args.batch,
            args.prompt_tokens,
            args.new_tokens,
            args.chunk,
            args.device,
        )
        print(json.dumps(asdict(probe)))
        return 0
    labels = [c.strip() for c in args.caches.split(",")]
    unknown = [c for c in labels if c not in CACHES]
    if unknown:
        parser.error(f"unknown cache(s) {unknown}; choose from {list(CACHES)}")
    caches = {label: CACHES[label] for label in labels}
    if args.study == "batch":
        study_batch(args, caches)
    else:
        rows = study_budget(args, caches)
        if args.plot:
            plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
