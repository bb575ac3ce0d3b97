"""``gear-lab ppl``: perplexity, KL and top-1 agreement of a compressed prefill cache.

The protocol of the reference table in ``gear-notes.md`` (:func:`gear_lab.perplexity_check`):
windows of pydoc text, prefill compressed, continuation teacher-forced through it.
"""

from __future__ import annotations

import argparse
import json

from gear_lab.cli.check import add_model_args, cache_spec_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``ppl`` subcommand."""
    parser = subparsers.add_parser(
        "ppl",
        help="perplexity / KL / top-1 of a compressed prefill cache vs full precision",
        description=(
            "Prefill PREFILL tokens of each pydoc window, compress the whole prefill cache "
            "(GearCache of --method or of a per-layer --allocation, or a --baseline), "
            "teacher-force the next CONTINUATION "
            "tokens through it and compare with full precision."
        ),
    )
    parser.add_argument("--windows", type=int, default=8, help="corpus windows (default: 8)")
    parser.add_argument("--prefill", type=int, default=512, help="prefill tokens (default: 512)")
    parser.add_argument(
        "--continuation", type=int, default=128, help="scored tokens per window (default: 128)"
    )
    add_model_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure and print; library errors propagate to the CLI's one-line handler."""
    from gear_lab.fidelity import perplexity_check, validate_protocol
    from gear_lab.models import load_model

    spec = cache_spec_from_args(args)
    validate_protocol(args.windows, args.prefill, args.continuation)
    model, tokenizer = load_model(args.model, device=args.device)
    result = perplexity_check(
        model,
        tokenizer,
        spec,
        windows=args.windows,
        prefill=args.prefill,
        continuation=args.continuation,
        pre_rope=args.pre_rope,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(
        f"{result.method}: {result.windows} windows x (prefill {result.prefill} + "
        f"{result.continuation} scored) of {result.corpus}, {result.seconds:.0f} s"
    )
    print(
        f"bits/entry {result.bits_per_entry:.2f}  perplexity {result.perplexity_full:.2f} full -> "
        f"{result.perplexity_compressed:.2f} compressed  KL {result.kl:.4g}  "
        f"top-1 {result.top1_agreement:.1%}"
    )
    print(
        f"KL median {result.kl_median:.4g}  p99 {result.kl_p99:.4g}  p99.9 {result.kl_p999:.4g}  "
        f"same top token {result.top1_agreement:.2%}  delta perplexity "
        f"{result.delta_perplexity:+.3f} +/- {result.delta_perplexity_ci:.3f} (95 %, across "
        f"windows)  {result.scored_tokens} scored tokens"
    )
    return 0
