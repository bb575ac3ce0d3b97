"""``gear-lab info DUMP``: validate a dump and print its layers, shapes and metadata."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``info`` subcommand."""
    parser = subparsers.add_parser(
        "info",
        help="validate a dump and print its layers, shapes and metadata",
        description="Open DUMP (validating its schema) and print its summary.",
    )
    parser.add_argument("dump", metavar="DUMP", help="a dump written by gear-capture")
    parser.add_argument(
        "--layers", action="store_true", help="also print each layer's attention type and window"
    )
    parser.add_argument("--json", action="store_true", help="print the metadata as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary (or the metadata as JSON); a bad dump raises DumpError -> exit 2."""
    from gear_lab.dump import open_dump

    with open_dump(args.dump) as dump:
        if args.json:
            meta = dump.metadata
            meta["layer_info"] = {str(i): dump.layer_info(i) for i in dump.layers}
            print(json.dumps(meta, indent=2, sort_keys=True))
            return 0
        print(dump.summary())
        if args.layers:
            for layer in dump.layers:
                info = dump.layer_info(layer)
                window = info["sliding_window"] or "-"
                print(
                    f"  layer {layer:3d}  {info['attention_type']:<18} window {window!s:>5}  "
                    f"rope_theta {info['rope_theta']:g}  scaling {info['scaling']:.6g}"
                )
    return 0
