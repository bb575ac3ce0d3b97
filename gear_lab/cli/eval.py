"""``gear-lab eval DUMP``: compress each selected layer with one method and print its errors.

Prints, per layer and kind, the measured bits per entry, the reconstruction metrics and (when
the dump has queries) the attention metrics, as an aligned table or ``--json`` records.
"""

from __future__ import annotations

import argparse

from gear_lab.cli._method_args import (
    add_dump_work_args,
    add_method_args,
    config_from_args,
    dump_work_from_args,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser(
        "eval",
        help="compress a dump's layers with one method; print errors and measured bits",
        description=(
            "Compress every selected layer of DUMP (all KV heads at once) with one method and "
            "print, per layer and kind, the measured bits per entry, reconstruction errors and, "
            "when the dump holds queries, attention errors (keys rows use exact values and "
            "vice versa)."
        ),
    )
    parser.add_argument("dump", metavar="DUMP", help="a dump written by gear-capture")
    add_method_args(parser)
    add_dump_work_args(parser)
    parser.add_argument("--sample", type=int, default=0, help="sample index (default: 0)")
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of records (NaN and inf as null)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print; library errors propagate to the CLI's one-line handler."""
    from gear_lab.sweeps import ATTENTION_COLUMNS, RECONSTRUCTION_COLUMNS, sweep

    config = config_from_args(args)
    df = sweep(
        args.dump,
        [config],
        samples=(args.sample,),
        per_head=False,
        **dump_work_from_args(args),
    )
    if args.json:
        print(df.to_json(orient="records"))
        return 0
    print(f"{config.name}: sample {args.sample} of {args.dump}")
    columns = ["layer", "kind", "bits_per_entry", *RECONSTRUCTION_COLUMNS, *ATTENTION_COLUMNS]
    print(df[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
