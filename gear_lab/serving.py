"""Peak memory and decode speed of one cache, each measured in its own process.

The measurement behind GEAR's memory and throughput experiment (Kang et al., 2024, section 4.4),
scaled to a CPU: a prompt of ``prompt_tokens`` corpus tokens repeated across a batch, prefilled
in chunks of ``chunk`` tokens (so the activations of a whole-prompt prefill do not hide the cache
in the peak), then greedy decoding of ``new_tokens`` tokens, and as many more timed. With ``gqa``
(the default) attention reads each KV head in place for its group of query heads, as GQA-aware
serving kernels do, where transformers' SDPA path would otherwise materialize repeated copies of
the layer's K/V whenever a mask is passed (every prefill chunk after the first): 3x the layer's
K/V on SmolLM2, a temporary that sets the prefill peak of a compressed cache.
:func:`probe` runs :func:`measure` in a fresh process (``python -m gear_lab.serving``), which
reports a :class:`Probe`:

- ``peak_mib``: the process's peak RSS during prefill and decoding minus its RSS after loading the
  model and one warm-up forward (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; glibc's
  mmap threshold fixed at 64 KiB so freed temporaries leave the RSS); on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory held after loading;
- ``held_mib``: the bytes the cache keeps allocated at the end
  (:func:`~gear_lab.cache_specs.cache_resident_nbytes`);
- ``tok_s``: decode tokens per second over the whole batch (prefill excluded), timed over
  ``new_tokens`` further steps after the memory is measured, with glibc's allocator set as a
  long-running process settles (large blocks reused from the heap, nothing returned to the OS):
  the fixed 64 KiB threshold makes every fresh tensor above it fault its pages in again, which
  on this machine costs more than the decode step's arithmetic (about 1.3 ms per 768 KiB);
- ``model_mib``: the process's memory after loading the model (RSS; CUDA: allocated).

:func:`interleaved_speed` compares decode speed alone, every cache in one process with their steps
interleaved (robust to load from other jobs). ``benchmarks/serving.py`` runs the equal-batch,
fixed-budget and interleaved-speed studies on them; the studio's Live page shows the
equal-batch figure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from gear_lab.constants import DEFAULT_MODEL
from gear_lab.errors import CacheError, ConfigError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


@dataclass
class Probe:
    """What one process measured for one cache spec at one batch size."""

    cache: str
    batch: int
    peak_mib: float
    held_mib: float
    tok_s: float
    device: str
    model_mib: float = 0.0


@dataclass(frozen=True)
class Workload:
    """The serving workload: ``prompt_tokens`` corpus tokens repeated across the batch, prefilled
    in chunks of ``chunk`` tokens, then ``new_tokens`` greedy steps of ``model`` on ``device``;
    ``gqa``: grouped-query attention without repeated K/V (see the module docstring)."""

    model: str = DEFAULT_MODEL
    prompt_tokens: int = 1000
    new_tokens: int = 500
    chunk: int = 64
    device: str = "cpu"
    gqa: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


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


def _settled_allocator() -> None:
    """glibc only: serve allocations below 32 MiB from the heap and keep freed memory (as its
    dynamic thresholds settle in a long-running process), ending the measuring threshold."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)


@contextlib.contextmanager
def _attention(workload: Workload) -> Iterator[None]:
    """Within: transformers' SDPA attention passes ``enable_gqa`` to torch even with a mask (its
    ``TRANSFORMERS_SDPA_FORCE_GQA`` switch) when ``workload.gqa``, instead of ``repeat_kv``."""
    saved = os.environ.get(_FORCE_GQA)
    os.environ[_FORCE_GQA] = "1" if workload.gqa else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[_FORCE_GQA]
        else:
            os.environ[_FORCE_GQA] = saved


def build_cache(spec: str, model: torch.nn.Module):
    """The cache a probe spec names: a :class:`~gear_lab.compression.CompressionConfig` as JSON,
    ``"<preset>:key=value,..."`` (integer :func:`~gear_lab.compression.get_preset` overrides;
    ``workspace=1`` for the workspace mode), or a string :func:`~gear_lab.cache_specs.make_cache`
    takes (``dynamic``, ``quantized:...``, a preset). The workload's rows are unpadded copies of
    one prompt, which a GearCache is told (``set_padding(None)``)."""
    from gear_lab.cache import GearCache
    from gear_lab.cache_specs import make_cache
    from gear_lab.compression import CompressionConfig

    name, _, options = spec.partition(":")
    if spec.startswith("{"):
        cache = GearCache(CompressionConfig.from_json(spec), model_config=model.config)
    elif name in {"dynamic", "quantized"} or not options:
        cache = make_cache(spec, model)
    else:
        try:
            overrides = {k: int(v) for k, v in (kv.split("=") for kv in options.split(","))}
        except ValueError:
            raise ConfigError(f"bad probe spec {spec!r}: use <preset>:key=int,...") from None
        cache = GearCache(name, model_config=model.config, **overrides)
    if isinstance(cache, GearCache):
        cache.set_padding(None)
    return cache


def _inputs(workload: Workload, batch: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The workload's model, its prompt ids ``[batch, prompt_tokens]`` and the cache keyword."""
    from gear_lab import load_model
    from gear_lab.cache import cache_kwarg
    from gear_lab.corpus import corpus_ids

    model, tokenizer = load_model(workload.model, device=workload.device)
    ids = corpus_ids(tokenizer)[: workload.prompt_tokens].to(model.device)
    return model, ids.expand(batch, -1).contiguous(), cache_kwarg(model)


@torch.inference_mode()
def measure(spec: str, batch: int, workload: Workload) -> Probe:
    """Measure one (cache spec, batch) in this process (see the module docstring): prefill and
    ``new_tokens`` decode steps for the peak and held memory, then ``new_tokens`` more timed."""
    torch.manual_seed(0)
    model, ids, key = _inputs(workload, batch)
    # warm-up: the first forward faults the memory-mapped weights in; the base excludes them
    model(input_ids=ids[:1, :8], **{key: build_cache("dynamic", model)})
    gc.collect()
    with _attention(workload):
        return _measure(spec, batch, workload, model, ids, key)


def _measure(
    spec: str, batch: int, workload: Workload, model: torch.nn.Module, ids: torch.Tensor, key: str
) -> Probe:
    """:func:`measure` after loading and warm-up: ``ids`` ``[batch, prompt_tokens]``."""
    from gear_lab.cache_specs import cache_resident_nbytes

    chunk = workload.chunk
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    base_kib = _rss_kib("VmRSS")
    _reset_peak()
    cache = build_cache(spec, model)
    for start in range(0, ids.shape[1], chunk):
        logits = model(input_ids=ids[:, start : start + chunk], logits_to_keep=1, **{key: cache})
    token = logits.logits[:, -1:].argmax(-1)

    def decode() -> None:
        nonlocal token
        for _ in range(workload.new_tokens):
            token = model(input_ids=token, **{key: cache}).logits[:, -1:].argmax(-1)
        if cuda:
            torch.cuda.synchronize()

    decode()
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_rss_kib("VmHWM") - base_kib) / 2**10
    held = cache_resident_nbytes(cache) / 2**20
    _settled_allocator()
    t0 = time.perf_counter()
    decode()
    seconds = time.perf_counter() - t0
    return Probe(
        spec,
        batch,
        peak,
        held,
        batch * workload.new_tokens / seconds,
        model.device.type,
        (base if cuda else base_kib * 2**10) / 2**20,
    )


@torch.inference_mode()
def interleaved_speed(specs: Sequence[str], batch: int, workload: Workload) -> dict[str, float]:
    """Decode tokens per second of each cache spec at ``batch``, all in this process with their
    steps interleaved (step 1 of every cache, then step 2, ...) and the median step time taken,
    so load from other jobs falls on every cache alike. Memory is not measured here (every
    cache lives in this process): that is :func:`probe`'s job."""
    model, ids, key = _inputs(workload, batch)
    with _attention(workload):
        return _interleave(specs, batch, workload, model, ids, key)


def _interleave(
    specs: Sequence[str],
    batch: int,
    workload: Workload,
    model: torch.nn.Module,
    ids: torch.Tensor,
    key: str,
) -> dict[str, float]:
    """:func:`interleaved_speed` after loading: ``ids`` ``[batch, prompt_tokens]``."""
    caches, tokens = {}, {}
    for spec in specs:
        caches[spec] = build_cache(spec, model)
        for start in range(0, ids.shape[1], workload.chunk):
            chunk = ids[:, start : start + workload.chunk]
            logits = model(input_ids=chunk, logits_to_keep=1, **{key: caches[spec]}).logits
        tokens[spec] = logits[:, -1:].argmax(-1)
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for _ in range(workload.new_tokens):
        for spec in specs:
            t0 = time.perf_counter()
            logits = model(input_ids=tokens[spec], **{key: caches[spec]}).logits
            tokens[spec] = logits[:, -1:].argmax(-1)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times[spec].append(time.perf_counter() - t0)
    return {spec: batch / statistics.median(times[spec]) for spec in specs}


_WORKLOAD_HELP = {
    "model": "model id (gear-lab models)",
    "prompt_tokens": "prompt length P (corpus tokens, the same prompt in every row)",
    "new_tokens": "greedy decode steps N measured (and as many more timed)",
    "chunk": "prefill chunk (tokens)",
    "device": "cpu, cuda or auto",
    "gqa": "grouped-query attention without repeated K/V (--no-gqa: transformers' repeat_kv)",
}


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`Workload` field (``--prompt-tokens``, ``--gqa/--no-gqa``, ...),
    defaulting to the field's default; :func:`workload_from` reads them back."""
    for f in fields(Workload):
        flag, help_ = f"--{f.name.replace('_', '-')}", _WORKLOAD_HELP[f.name]
        if isinstance(f.default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_
            )
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help_)


def workload_from(args: argparse.Namespace) -> Workload:
    """The :class:`Workload` of parsed :func:`add_workload_arguments` options (checked)."""
    return Workload(**{f.name: getattr(args, f.name) for f in fields(Workload)})


def workload_argv(workload: Workload) -> list[str]:
    """The options that :func:`add_workload_arguments` parses back into ``workload``."""
    argv = []
    for name, value in asdict(workload).items():
        flag = name.replace("_", "-")
        argv += (
            [f"--{'' if value else 'no-'}{flag}"]
            if isinstance(value, bool)
            else [f"--{flag}", str(value)]
        )
    return argv


def probe(spec: str, batch: int, workload: Workload, *, threads: int | None = None) -> Probe:
    """:func:`measure` in a fresh process (torch limited to ``threads`` threads when given);
    a failed run raises :class:`CacheError` with its last line of output."""
    cmd = [sys.executable, "-m", "gear_lab.serving", spec, "--batch", str(batch)]
    cmd += workload_argv(workload)
    # a fixed mmap threshold: glibc returns freed large temporaries to the OS, so the peak RSS
    # measures live memory rather than what the allocator kept after a transient was freed
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if threads is not None:
        env["GEAR_LAB_THREADS"] = str(threads)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise CacheError(f"probe of {spec} at batch {batch} failed: {last}")
    return Probe(**json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    """The probe process: ``python -m gear_lab.serving SPEC --batch B [workload options]``
    prints one :class:`Probe` as JSON (torch threads from ``GEAR_LAB_THREADS`` when set)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("spec")
    parser.add_argument("--batch", type=int, default=1)
    add_workload_arguments(parser)
    args = parser.parse_args(argv)
    threads = os.environ.get("GEAR_LAB_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    print(json.dumps(asdict(measure(args.spec, args.batch, workload_from(args)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
