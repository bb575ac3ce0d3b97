"""``gear-lab needle``: passkey / needle retrieval at long context through a compressed KV cache.

Runs :func:`gear_lab.retrieval.run_retrieval` over tasks x lengths x depths x seeds with the
cache of ``--method`` (or a ``--baseline``) and, unless ``--no-full-precision``, a full-precision
cache; prints accuracy per task, cache and length, and writes one row per trial to ``--out``.

Tasks:

  passkey   the KIVI / landmark-attention pass key in "The grass is green..." filler
  needle    a special magic number in pydoc text
  multikey  pass keys for four names; the three others are distractors
  vartrack  a chain of variable assignments (RULER style); the last variable's value
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gear_lab.cli._help import HelpFormatter, plain
from gear_lab.cli.check import add_model_args, cache_spec_from_args
from gear_lab.cli.sweep import FORMATS, check_out, write_table
from gear_lab.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``needle`` subcommand."""
    parser = subparsers.add_parser(
        "needle",
        help="passkey / needle retrieval at long context through a compressed cache",
        description=plain(__doc__.split("\n\n", 1)[1]),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--tasks", default="passkey", help="comma-separated tasks (default: passkey)"
    )
    parser.add_argument(
        "--lengths", default="1k,2k,4k", help="prompt lengths in tokens, e.g. 512,1k,4k"
    )
    parser.add_argument(
        "--depths", default="0.1,0.5,0.9", help="needle depths in [0, 1] (default: 0.1,0.5,0.9)"
    )
    parser.add_argument("--seeds", default="0", help="seeds of the random keys (default: 0)")
    parser.add_argument(
        "--prompt-compression",
        default="blockwise",
        help=(
            "how a GearCache compresses the prompt: blockwise (n_b-token blocks, GEAR "
            "streaming), oneshot (one block, as QuantizedCache), or both: blockwise,oneshot"
        ),
    )
    parser.add_argument(
        "--chat-template", action="store_true", help="wrap each prompt in the chat template"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=8, help="greedy answer tokens (default: 8)"
    )
    parser.add_argument(
        "--storage-dtype",
        choices=("float16", "bfloat16"),
        help="dtype GearCache blocks are compressed in (default: the model's)",
    )
    parser.add_argument(
        "--no-full-precision",
        action="store_true",
        help="skip the full-precision reference run",
    )
    parser.add_argument(
        "--out", type=Path, help=f"write one row per trial ({' or '.join(FORMATS)}, atomically)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_model_args(parser)
    parser.set_defaults(func=run)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _numbers(name: str, text: str, kind: type) -> tuple:
    try:
        return tuple(kind(part) for part in _split(text))
    except ValueError:
        raise ConfigError(f"bad --{name} {text!r}: expected comma-separated numbers") from None


def run(args: argparse.Namespace) -> int:
    """Check every input, load the model, run the grid, print the summary, write the table."""
    import torch

    from gear_lab.models import load_model
    from gear_lab.retrieval import RetrievalGrid, parse_length, run_retrieval, summarize

    spec = cache_spec_from_args(args)
    grid = RetrievalGrid(
        tasks=tuple(_split(args.tasks)),
        lengths=tuple(parse_length(part) for part in _split(args.lengths)),
        depths=_numbers("depths", args.depths, float),
        seeds=_numbers("seeds", args.seeds, int),
        prompt_compression=tuple(_split(args.prompt_compression)),
        chat_template=args.chat_template,
        max_new_tokens=args.max_new_tokens,
    )
    out = None if args.out is None else check_out(args.out, args.overwrite)
    caches = [spec] if args.no_full_precision else ["dynamic", spec]
    model, tokenizer = load_model(args.model, device=args.device)
    df = run_retrieval(
        model,
        tokenizer,
        caches,
        grid,
        model_name=args.model,
        storage_dtype=None if args.storage_dtype is None else getattr(torch, args.storage_dtype),
    )
    if out is not None:
        write_table(df, out)
    table = summarize(df)
    if args.json:
        print(json.dumps(table.to_dict(orient="records")))
        return 0
    print(table.drop(columns="model").to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    failures = df[~df["correct"]]
    for row in failures.itertuples():
        print(
            f"miss: {row.task} {row.length} depth {row.depth:g} seed {row.seed} {row.cache} "
            f"({row.prompt_compression}): expected {row.expected}, got {row.answer!r}"
        )
    if out is not None:
        print(f"wrote {len(df)} rows to {out}")
    return 0
