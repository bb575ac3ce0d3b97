"""Compression speed next to a device copy of the same tensor, measured in the same run.

For each shape (a Llama-2-7B layer, a Llama-3-8B layer, a real SmolLM2 layer) the keys and
values of one layer (``[batch, kv_heads, seq, head_dim]`` float16) are

* copied (``dst.copy_(src)``): the device's memory-copy rate, the baseline every ratio uses;
* compressed and decompressed with the plain torch implementation (``gear_lab.compression``
  forced to its reference, impl ``torch``), for every preset, block-wise with n_b = 64 (GEAR
  streaming, Kang et al. 2024);
* on CPU, the same calls on the compiled CPU path (``gear_lab.compression.cpu_kernel``, impl
  ``compiled``), which ``compress`` uses by default where it covers the settings;
* compressed and decompressed with the fused Triton kernel (``gear_lab.kernels``) where CUDA
  and Triton are present.

Throughput is GB/s of float16 input (``bytes of K and V / best seconds``), for the copy too,
so ``% copy`` is the share of a plain copy's speed (the copy moves twice these bytes). Every
measurement times the copy alongside, in alternating rounds (``seconds``): a row's ``copy
GB/s`` is the best copy of its own rounds and its ratios use it, so that a slow stretch of a
shared machine weighs on both sides of a ratio alike; the ``copy`` row is the best copy of
the shape.
Targets (issues 3, 7 and 17): on CPU >= 10 % of copy (compression) and >= 20 %
(decompression); fused on GPU >= 25 % (compression), >= 40 % (decompression) and >= 50x torch,
for 2-bit GEAR, G = 64, s = 2 %, r = 2, n_b = 64 (the ``gear-2bit`` row).

    python benchmarks/speed.py [--device cpu|cuda|auto] [--quick] [--dump DUMP.h5] [--shape NAME]
                               [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gear_lab.compression import CompressionConfig, compress, get_preset, list_presets
from gear_lab.compression.cpu_kernel import kernel_unavailable_reason, reference
from gear_lab.errors import GearLabError
from gear_lab.kernels import compress_fused, decompress_fused, fused_unavailable_reason
from gear_lab.models import cache_dir, resolve_device

TARGET = "gear-2bit"
BLOCK = 64
ROUNDS = 4  # alternating rounds per measurement (see seconds)


def configs(quick: bool) -> dict[str, CompressionConfig]:
    """The target GEAR setting first, then every preset (block-wise, n_b = 64)."""
    target = get_preset("gear", bits=2, group_size=64, outliers=0.02, rank=2, block_size=BLOCK)
    out = {TARGET: target}
    names = ["kivi"] if quick else [n for n in list_presets() if n != "none"]
    for name in names:
        out[name] = get_preset(name, block_size=BLOCK)
    return out


def shapes(
    device: torch.device, dump: Path | None, only: str | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (keys, values) float16 on ``device``; the real layer only when ``only`` (a part
    of the shape names to keep) is ``None`` or names it."""
    batch = 8 if device.type == "cuda" else 1
    gen = torch.Generator().manual_seed(0)

    def synthetic(*shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Heavy-tailed channel scales, like real keys (a few outlier channels).
        scales = torch.exp(torch.randn(shape[-1], generator=gen))
        k = torch.randn(*shape, generator=gen) * scales
        v = torch.randn(*shape, generator=gen)
        return k.to(device, torch.float16), v.to(device, torch.float16)

    out = {
        f"llama2-7b [{batch},32,4096,128]": synthetic(batch, 32, 4096, 128),
        "llama3-8b [1,8,4096,128]": synthetic(1, 8, 4096, 128),
    }
    if only is None or only in "smollm2 dump":
        k, v = smollm2_layer(dump)
        out[f"smollm2 dump {list(k.shape)}"] = (k.to(device), v.to(device))
    return out


def smollm2_layer(dump: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of layer 15 of a real SmolLM2-135M dump, ``[1, 3, seq, 64]`` float16.

    Without ``dump``, a 512-token pydoc dump is captured once into gear-lab's cache.
    """
    from gear_lab.dump import capture_dump, open_dump

    if dump is None:
        dump = cache_dir() / "benchmarks" / "smollm2-pydoc-512.h5"
        if not dump.exists():
            dump.parent.mkdir(parents=True, exist_ok=True)
            capture_dump(dump, corpus="pydoc", samples=1, max_tokens=512, device="cpu")
    with open_dump(dump) as d:
        layer = d.layers[len(d.layers) // 2]
        k = d.load("keys", layer, dtype=torch.float16)[None]
        v = d.load("values", layer, dtype=torch.float16)[None]
    return k, v


def seconds(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    budget: float,
    reps: int,
    clock: Callable[[], float] = time.perf_counter,
    rounds: int = ROUNDS,
) -> list[float]:
    """Best time of each of ``fns`` on ``clock`` (wall time by default), measured in ``rounds``
    alternating rounds: per round each fn is called once untimed (compiles kernels, warms its
    caches; skipped after a first call slower than a round's budget) and then timed back to
    back, at most ``reps // rounds`` times and until ``budget / rounds`` wall seconds are spent
    (at least once). A slow stretch of a shared machine so falls on all of them alike, not on
    whichever ran then. The best, not the median, because shared machines add noise only
    upwards."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = [math.inf] * len(fns)
    slow = [False] * len(fns)
    per_round, share = max(1, reps // rounds), budget / rounds
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            if not slow[i]:
                start = time.perf_counter()
                fn()
                sync()
                slow[i] = time.perf_counter() - start > share
            start, calls = time.perf_counter(), 0
            while calls < per_round and (calls < 1 or time.perf_counter() - start < share):
                t0 = clock()
                fn()
                sync()
                best[i] = min(best[i], clock() - t0)
                calls += 1
    return best


@dataclass
class Row:
    shape: str
    method: str
    impl: str
    comp_gbs: float
    decomp_gbs: float
    bits: float
    copy_gbs: float
    torch_comp: float | None = None

    def cells(self) -> list[str]:
        pct = lambda v: f"{100 * v / self.copy_gbs:7.2f}%"  # noqa: E731
        speedup = f"{self.comp_gbs / self.torch_comp:7.1f}x" if self.torch_comp else ""
        return [
            self.shape,
            self.method,
            self.impl,
            f"{self.copy_gbs:8.3f}",
            f"{self.comp_gbs:8.3f}",
            pct(self.comp_gbs),
            f"{self.decomp_gbs:8.3f}",
            pct(self.decomp_gbs),
            f"{self.bits:5.2f}",
            speedup,
        ]


HEADER = [
    "shape",
    "method",
    "impl",
    "copy GB/s",
    "comp GB/s",
    "% copy",
    "decomp GB/s",
    "% copy",
    "bits",
    "x torch",
]


def bench_shape(
    name: str,
    kv: tuple[torch.Tensor, torch.Tensor],
    cfgs: dict[str, CompressionConfig],
    device: torch.device,
    fast: list[tuple[str, Callable, Callable]],
    budget: float,
    reps: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Row]:
    k, v = kv
    gbytes = (k.nbytes + v.nbytes) / 1e9
    dk, dv = torch.empty_like(k), torch.empty_like(v)

    def copy() -> None:
        dk.copy_(k)
        dv.copy_(v)

    copy_best = math.inf

    def paired(fn: Callable[[], object]) -> tuple[float, float]:
        """Best seconds of fn and of the copy, timed in alternating rounds."""
        nonlocal copy_best
        t_copy, t_fn = seconds([copy, fn], device, budget, reps, clock)
        copy_best = min(copy_best, t_copy)
        return t_fn, t_copy

    rows = []
    impls = [("torch", on_reference(compress), on_reference(lambda c: c.decompress())), *fast]
    for method, cfg in cfgs.items():
        torch_comp = None
        for impl, comp_fn, decomp_fn in impls:
            try:
                ck, cv = comp_fn(k, cfg, kind="keys"), comp_fn(v, cfg, kind="values")
            except GearLabError as err:  # the fused kernel covers a subset of settings
                print(f"  {name} {method} {impl}: skipped ({err})", file=sys.stderr)
                continue
            t_comp, copy_comp = paired(
                lambda cfg=cfg, f=comp_fn: (f(k, cfg, kind="keys"), f(v, cfg, kind="values"))
            )
            t_dec, copy_dec = paired(lambda ck=ck, cv=cv, f=decomp_fn: (f(ck), f(cv)))
            bits = 8 * (ck.nbytes + cv.nbytes) / (ck.numel + cv.numel)
            copy_gbs = gbytes / min(copy_comp, copy_dec)
            row = Row(name, method, impl, gbytes / t_comp, gbytes / t_dec, bits, copy_gbs)
            if impl == "torch":
                torch_comp = row.comp_gbs
            else:
                row.torch_comp = torch_comp
            rows.append(row)
            print(" | ".join(row.cells()), file=sys.stderr, flush=True)
    best = gbytes / copy_best
    return [Row(name, "copy", "torch", best, best, 16.0, best), *rows]


def on_reference(fn: Callable) -> Callable:
    """``fn`` forced onto the torch reference (not the compiled CPU path)."""

    def run(*args, **kwargs):
        with reference():
            return fn(*args, **kwargs)

    return run


def table(rows: list[Row]) -> str:
    cells = [HEADER, *[r.cells() for r in rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    parser.add_argument("--quick", action="store_true", help="only the GEAR target and KIVI")
    parser.add_argument("--dump", type=Path, help="SmolLM2 dump (default: capture one, cached)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--shape", help="only the shapes whose name contains this (e.g. llama3)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time (default), or this process's CPU time: GB per CPU-second for copy and "
        "methods alike, on a CPU shared with other work (with --threads 1: idle OpenMP "
        "threads may spin and count)",
    )
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except GearLabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 2.0)
    # as many timed calls as the copy gets (its best of 20 is the baseline), in ROUNDS rounds:
    # best-of-5 against best-of-20 understated fast methods on a noisy machine; --quick only
    # shortens the budget, which stops slow calls early
    reps = 20
    reason = fused_unavailable_reason(device)
    if device.type != "cuda":
        reason = "needs CUDA (Triton's CPU interpreter is for tests, not speed)"
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    threads = torch.get_num_threads()
    load = "" if not hasattr(os, "getloadavg") else f", load {os.getloadavg()[0]:.2f}"
    print(f"device: {name} ({device}), torch {torch.__version__}, {threads} threads{load}")
    print(f"clock: {args.clock} time")
    print(f"fused kernel: {'yes' if reason is None else 'no: ' + reason}")
    fast: list[tuple[str, Callable, Callable]] = []
    if reason is None:
        fast.append(("fused", compress_fused, decompress_fused))
    if device.type == "cpu":
        compiled = kernel_unavailable_reason()
        print(f"compiled CPU path: {'yes' if compiled is None else 'no: ' + compiled}")
        if compiled is None:
            fast.append(("compiled", compress, lambda c: c.decompress()))
    rows: list[Row] = []
    for shape_name, kv in shapes(device, args.dump, args.shape).items():
        if args.shape and args.shape not in shape_name:
            continue
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        rows += bench_shape(shape_name, kv, configs(args.quick), device, fast, budget, reps, clock)
        del kv
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
