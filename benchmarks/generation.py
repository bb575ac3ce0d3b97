"""Decode speed and cache size of compressed caches, as ratios against ``DynamicCache`` in one run.

SmolLM2-135M-Instruct prefills ``--prompt-tokens`` tokens of pydoc text, then decodes
``--new-tokens`` tokens greedily (one forward per token, timed separately from the prefill) with:

* transformers' ``DynamicCache`` (full precision, the baseline of every ratio);
* transformers' ``QuantizedCache`` (quanto and hqq backends, 4 bits, G = 64, residual 64:
  a KIVI-like baseline; skipped with a message where the ``baselines`` extra is missing);
* :class:`gear_lab.GearCache` presets (n_b = 64, the GEAR paper's streaming, Kang et al. 2024).

GearCache rows run memory-true (the default); one more row runs GEAR 2-bit with
``workspace=True`` (the speed option). Per row: decode tokens/s, cache bytes *held* after
decoding (``KiB``: K/V measured from the tensors kept, compressed blocks plus buffers), both as
ratios to ``DynamicCache``, the bytes *resident* (``res KiB``: plus any workspace, the shared
transient and the block index), and how many greedy tokens match ``DynamicCache``'s before the
first difference.
Runs on the CPU, and on CUDA as well when present (``--device``).

    python benchmarks/generation.py [--device cpu,cuda] [--prompt-tokens 256] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from gear_lab import load_model
from gear_lab.cache import GearCache, cache_kwarg
from gear_lab.cache_specs import cache_nbytes, cache_resident_nbytes, make_cache
from gear_lab.compression import get_preset
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.corpus import pydoc_topic
from gear_lab.errors import GearLabError
from gear_lab.metrics import token_agreement

GEAR_ROWS = {
    "GearCache kivi (2-bit, G 32)": get_preset("kivi"),
    "GearCache quant (4-bit, G 64)": get_preset("quant", block_size=64),
    "GearCache gear (4-bit, s 2%, r 4)": get_preset("gear", block_size=64),
    "GearCache gear 2-bit": get_preset("gear", bits=2, block_size=64),
    "GearCache gear-l 2-bit, r 2": get_preset("gear-l", bits=2, rank=2, block_size=64),
    "GearCache fp8": get_preset("fp8", block_size=64),
}
BASELINES = {
    "QuantizedCache quanto 4-bit": "quantized:quanto:4:64",
    "QuantizedCache hqq 4-bit": "quantized:hqq:4:64",
}


@dataclass
class Row:
    """One measured cache."""

    device: str
    cache: str
    decode_tok_s: float
    speed_ratio: float
    cache_bytes: int
    bytes_ratio: float
    resident_bytes: int
    agree_until: int
    new_tokens: int


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode(model, ids: torch.Tensor, cache, new_tokens: int) -> tuple[list[int], float, int, int]:
    """Prefill ``ids`` then greedy-decode: (tokens, decode seconds, bytes held and bytes resident
    at the end)."""
    key = cache_kwarg(model)
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits
    token = logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    _sync(ids.device)
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = model(input_ids=token, use_cache=True, **{key: cache}).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    _sync(ids.device)
    seconds = time.perf_counter() - start
    return tokens, seconds, cache_nbytes(cache), cache_resident_nbytes(cache)


def run_device(device: str, prompt_tokens: int, new_tokens: int) -> list[Row]:
    """Every cache on one device; ratios against DynamicCache measured in this run."""
    model, tokenizer = load_model(DEFAULT_MODEL, device=device)
    text = "".join(pydoc_topic(name) for name in ("for", "while", "if"))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :prompt_tokens].to(model.device)
    factories: dict[str, Callable] = {"DynamicCache": lambda: make_cache("dynamic", model)}
    for name, spec in BASELINES.items():
        factories[name] = lambda spec=spec: make_cache(spec, model)
    for name, config in GEAR_ROWS.items():
        factories[name] = lambda config=config: GearCache(config, model_config=model.config)
    factories["GearCache gear 2-bit, workspace"] = lambda: GearCache(
        GEAR_ROWS["GearCache gear 2-bit"], model_config=model.config, workspace=True
    )
    decode(model, ids, make_cache("dynamic", model), 4)  # warm-up
    rows: list[Row] = []
    ref_tokens: list[int] = []
    ref_speed = ref_bytes = 0.0
    for name, factory in factories.items():
        try:
            cache = factory()
        except GearLabError as err:
            print(f"[{device}] skipped {name}: {err}", file=sys.stderr)
            continue
        tokens, seconds, nbytes, resident = decode(model, ids, cache, new_tokens)
        speed = (new_tokens - 1) / seconds
        if name == "DynamicCache":
            ref_tokens, ref_speed, ref_bytes = tokens, speed, nbytes
        _, divergence = token_agreement(ref_tokens, tokens)
        same = new_tokens if divergence is None else divergence
        rows.append(
            Row(
                device,
                name,
                speed,
                speed / ref_speed,
                nbytes,
                nbytes / ref_bytes,
                resident,
                same,
                new_tokens,
            )
        )
        print(f"[{device}] {name}: {speed:.1f} tok/s, {nbytes / 2**10:.0f} KiB", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_devices = "cpu,cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_devices, help=f"(default: {default_devices})")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print JSON records instead")
    args = parser.parse_args(argv)
    rows = [
        row
        for device in args.device.split(",")
        for row in run_device(device.strip(), args.prompt_tokens, args.new_tokens)
    ]
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    print(
        f"SmolLM2-135M-Instruct, prompt {args.prompt_tokens} tokens, {args.new_tokens} greedy "
        "decoding steps; ratios against DynamicCache of the same run"
    )
    header = (
        f"{'device':6} {'cache':36} {'tok/s':>7} {'x speed':>8} {'KiB':>7} {'x bytes':>8} "
        f"{'res KiB':>8} agree"
    )
    print(header)
    for r in rows:
        print(
            f"{r.device:6} {r.cache:36} {r.decode_tok_s:7.1f} {r.speed_ratio:8.2f} "
            f"{r.cache_bytes / 2**10:7.0f} {r.bytes_ratio:8.3f} {r.resident_bytes / 2**10:8.0f} "
            f"{r.agree_until}/{r.new_tokens}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
