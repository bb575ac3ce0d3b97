"""``gear-capture``: run a real model over prompts or a corpus and write an HDF5 dump."""

from __future__ import annotations

import argparse
import sys

from gear_lab.constants import DEFAULT_MODEL
from gear_lab.corpus import CORPORA


def build_capture_parser() -> argparse.ArgumentParser:
    """The ``gear-capture`` parser; ``func`` runs the capture."""
    parser = argparse.ArgumentParser(
        prog="gear-capture",
        description=(
            "Capture per-layer keys and values (optionally post-RoPE queries and pre-RoPE keys) "
            "from a real forward pass into an HDF5 dump (schema: dumps/README.md)."
        ),
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registry name (gear-lab models), local HF folder, .gguf file or hub id "
        f"(default: {DEFAULT_MODEL})",
    )
    text = parser.add_mutually_exclusive_group()
    text.add_argument(
        "--prompt", action="append", dest="prompts", metavar="TEXT", help="a prompt (repeatable)"
    )
    text.add_argument(
        "--prompts-file",
        metavar="PATH",
        help=".txt (one prompt per blank-line-separated block) or .jsonl (a 'text' field per line)",
    )
    text.add_argument(
        "--corpus", choices=CORPORA, help="built-in text (default when no prompt is given: pydoc)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=512, help="tokens per sample (default: 512)"
    )
    parser.add_argument(
        "--samples", type=int, default=1, help="corpus windows to capture (default: 1)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="model dtype (default: float32)",
    )
    parser.add_argument("--layers", help="layers to keep, e.g. 0,5,10-12 (default: all)")
    parser.add_argument(
        "--with-queries",
        action="store_true",
        help="also store post-RoPE queries (needed for attention metrics)",
    )
    parser.add_argument(
        "--pre-rope-keys", action="store_true", help="also store keys before the rotary embedding"
    )
    parser.add_argument(
        "--out", metavar="PATH", help="output file (default: dumps/<model>-<source>.h5)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Capture, then print the dump's summary."""
    from gear_lab.capture import read_prompts
    from gear_lab.dump import capture_dump, default_out, open_dump

    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompts
    corpus = None if prompts is not None else args.corpus or "pydoc"
    source = "prompts" if prompts is not None else corpus
    out = args.out or default_out(args.model, source)
    path = capture_dump(
        out,
        model=args.model,
        prompts=prompts,
        corpus=corpus,
        samples=args.samples,
        max_tokens=args.max_tokens,
        layers=args.layers,
        with_queries=args.with_queries,
        pre_rope_keys=args.pre_rope_keys,
        device=args.device,
        dtype=args.dtype,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    with open_dump(path) as dump:
        print(dump.summary())
    print(f"wrote {path}", file=sys.stderr)
    return 0
