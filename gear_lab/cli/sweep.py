"""``gear-lab sweep DUMP --grid ... --out FILE``: a grid of methods over a dump -> CSV / Parquet.

Grid grammar (see :func:`gear_lab.sweeps.parse_grid`): ``NAME=V1,V2,...`` entries joined by
``;``, where NAME is ``method`` or a preset override (``bits``, ``group-size``, ``rank``,
``outliers``, ``key-bits``, ``block-size``, ...); values are integers, floats, ``none``,
``true``/``false`` or words. Every combination is one config, e.g.
``--method gear --grid 'bits=2,4;rank=0,2,4'`` -> six configs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gear_lab.cli._method_args import add_dump_work_args, dump_work_from_args
from gear_lab.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

FORMATS = (".csv", ".parquet")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of methods over a dump; write one tidy row per head/kind/config",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dump", metavar="DUMP", help="a dump written by gear-capture")
    parser.add_argument(
        "--grid", required=True, help="e.g. 'bits=2,4;rank=0,2,4' (NAME=V1,V2;NAME=...)"
    )
    parser.add_argument(
        "--method",
        help="base preset(s), comma-separated (default: gear; or give method=... in --grid)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output table, .csv or .parquet (written atomically)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_dump_work_args(parser)
    parser.add_argument("--samples", default="0", help="sample indices, e.g. 0,1 (default: 0)")
    parser.add_argument("--heads", help="KV-head indices, e.g. 0,2 (default: all)")
    parser.add_argument(
        "--no-attention", action="store_true", help="skip the attention metrics (faster)"
    )
    parser.set_defaults(func=run)


def _ints(name: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"bad --{name} {text!r}: expected comma-separated integers") from None


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an unknown format, a missing folder, or an existing file without ``overwrite``."""
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"--out must end in {' or '.join(FORMATS)}, got {out.name!r}")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {str(out.parent)!r} does not exist")
    if out.exists() and not overwrite:
        raise ConfigError(f"{str(out)!r} exists; pass --overwrite to replace it")


def write_table(df: pd.DataFrame, out: Path) -> None:
    """Write ``df`` to ``out`` (CSV or Parquet) through a temporary file and an atomic rename."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        if out.suffix.lower() == ".parquet":
            try:
                df.to_parquet(tmp, index=False)
            except ImportError as err:
                raise ConfigError(f"Parquet output needs pyarrow ({err})") from None
        else:
            df.to_csv(tmp, index=False)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    """Parse the grid, run the sweep with a progress bar, write the table."""
    from gear_lab.sweeps import parse_grid, sweep

    check_out(args.out, args.overwrite)
    grid = parse_grid(args.grid)
    if args.method is not None:
        if "method" in grid:
            raise ConfigError("give the preset either with --method or as method=... in --grid")
        grid["method"] = [m.strip() for m in args.method.split(",") if m.strip()]
    df = sweep(
        args.dump,
        grid,
        samples=_ints("samples", args.samples),
        heads=_ints("heads", args.heads),
        attention=not args.no_attention,
        **dump_work_from_args(args),
    )
    write_table(df, args.out)
    configs = df["config_index"].nunique()
    print(f"wrote {len(df)} rows ({configs} configs) to {args.out}")
    return 0
