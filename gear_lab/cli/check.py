"""``gear-lab check``: generate with a full-precision and a compressed KV cache, side by side.

Prints both greedy continuations, their token agreement and first divergence, the teacher-forced
KL and top-1 agreement, cache bytes and tokens per second (:func:`gear_lab.check_generation`).
The model / device / ``--baseline`` / ``--allocation`` flags defined here are shared with
``gear-lab ppl``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import TYPE_CHECKING

from gear_lab.cli._method_args import add_method_args, config_from_args
from gear_lab.compression import CompressionConfig
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.errors import ConfigError

if TYPE_CHECKING:
    from gear_lab.cache_specs import CacheSpec


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, the method flags, ``--baseline`` and ``--allocation``."""
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model name or path (default: {DEFAULT_MODEL})"
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda or auto (default: auto, cuda when present)"
    )
    add_method_args(parser)
    parser.add_argument(
        "--baseline",
        metavar="BACKEND:BITS[:GROUP]",
        help=(
            "instead of --method, transformers' QuantizedCache, e.g. quanto:4 or hqq:2:32 "
            "(needs the baselines extra)"
        ),
    )
    parser.add_argument(
        "--allocation",
        metavar="FILE",
        help="instead of --method, a per-layer allocation written by gear-lab allocate",
    )
    parser.add_argument(
        "--pre-rope",
        action="store_true",
        help="quantize keys before RoPE, rotating them back at attention time (KVQuant)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def cache_spec_from_args(args: argparse.Namespace) -> CacheSpec:
    """The cache spec of :func:`gear_lab.cache_specs.make_cache`: a config, a per-layer
    allocation, or a baseline string."""
    from gear_lab.allocation import load_allocation
    from gear_lab.cache_specs import parse_quantized_spec
    from gear_lab.compression import get_preset

    if args.allocation is not None:
        method_given = args.method != "gear" or config_from_args(args) != get_preset("gear")
        if args.baseline is not None or method_given:
            raise ConfigError(
                "--allocation sets every layer's method: drop --method, --baseline and the "
                "compression flags"
            )
        allocation = load_allocation(args.allocation)
        if allocation.model != args.model:
            raise ConfigError(
                f"{args.allocation} was measured on {allocation.model}, not {args.model}: pass "
                f"--model {allocation.model}"
            )
        return allocation
    if args.baseline is None:
        return config_from_args(args)
    spec = f"quantized:{args.baseline}"
    parse_quantized_spec(spec)  # bad input fails before the model loads
    if args.pre_rope:
        raise ConfigError("--pre-rope applies to GearCache methods, not to --baseline")
    return spec


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``check`` subcommand."""
    parser = subparsers.add_parser(
        "check",
        help="generate with a full-precision and a compressed cache; compare the two",
        description=(
            "Greedy generation of PROMPT with a full-precision cache and with a compressed one "
            "(GearCache of --method, or a --baseline), then KL(full || compressed) and top-1 "
            "agreement teacher-forced along the full-precision continuation."
        ),
    )
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens to generate (default: 32)"
    )
    add_model_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check and print; library errors propagate to the CLI's one-line handler."""
    import warnings

    from gear_lab.cache import DEFAULT_BLOCK_SIZE
    from gear_lab.cache_specs import QUANTIZED_RESIDUAL_LENGTH
    from gear_lab.errors import NothingCompressedWarning
    from gear_lab.fidelity import check_generation
    from gear_lab.models import load_model
    from gear_lab.units import format_bytes

    spec = cache_spec_from_args(args)
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model, device=args.device)
    with warnings.catch_warnings(record=True) as caught:  # said below, in the CLI's words
        warnings.simplefilter("always", NothingCompressedWarning)
        # a bar of forward steps on stderr: 3 passes of --max-new-tokens at most
        check = check_generation(
            model, tokenizer, args.prompt, spec, args.max_new_tokens, pre_rope=args.pre_rope
        )
    nothing = False
    for w in caught:
        if issubclass(w.category, NothingCompressedWarning):
            nothing = True
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if args.json:
        print(json.dumps(check.to_dict()))
        return 0
    divergence = "none" if check.first_divergence is None else f"at token {check.first_divergence}"
    print(f"method {check.method}: prompt {check.prompt!r}")
    for title, text in (("full precision", check.full_text), ("compressed", check.compressed_text)):
        print(f"\n--- {title} ---")
        print(textwrap.fill(text, width=100) if text.strip() else "(empty)")
    print()
    print(
        f"same tokens {check.token_agreement:.1%}, first divergence {divergence}; "
        f"teacher-forced mean KL {check.mean_kl:.4g}, top-1 {check.top1_agreement:.1%}"
    )
    if check.kl:
        tail = check.kl_statistics()
        print(
            f"KL median {tail['kl_median']:.4g}, p99 {tail['kl_p99']:.4g}, "
            f"p99.9 {tail['kl_p999']:.4g} over {len(check.kl)} scored tokens"
        )
    ratio = check.full_cache_bytes / max(check.compressed_cache_bytes, 1)
    print(
        f"cache held (K/V: compressed blocks + buffers) {format_bytes(check.full_cache_bytes)} "
        f"full vs {format_bytes(check.compressed_cache_bytes)} compressed ({ratio:.2f}x smaller); "
        f"resident (+ transient / workspace) {format_bytes(check.full_resident_bytes)} vs "
        f"{format_bytes(check.compressed_resident_bytes)}; "
        f"{check.full_tokens_per_s:.1f} vs {check.compressed_tokens_per_s:.1f} tok/s"
    )
    if nothing and isinstance(spec, CompressionConfig):
        print(
            f"note: nothing was compressed: the cache keeps its newest n_b = "
            f"{spec.block_size or DEFAULT_BLOCK_SIZE} tokens in full precision; use a longer "
            "prompt or a smaller --block-size"
        )
    elif nothing:
        print(
            f"note: nothing was compressed: the baseline keeps its newest "
            f"{QUANTIZED_RESIDUAL_LENGTH} tokens in full precision; use a longer prompt"
        )
    return 0
