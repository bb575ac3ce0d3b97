"""``gear-lab sweep DUMP [DUMP ...] --grid ... --out FILE``: a grid of methods over one or more
dumps -> one CSV / Parquet table (``model`` and ``dump`` columns tell the dumps apart).

Grid grammar (see :func:`gear_lab.sweeps.parse_grid`): ``NAME=V1,V2,...`` entries joined by
semicolons, where NAME is ``method`` or any setting of ``gear-lab eval``'s flags (``bits``,
``group-size``, ``rank``, ``outliers``, ``fp8``, ``factor-dtype``, ``key-bits``, ``block-size``,
...); values are integers, floats, ``none``, ``true``/``false`` or words. Every combination is
one config, e.g. ``--method gear --grid 'bits=2,4;rank=0,2,4'`` -> six configs.

``--executor ray`` runs one task per (dump, sample, layer, chunk of ``--configs-per-task`` configs;
default: all configs in one task) on a Ray cluster (``--address``; default: a local one) and keeps
each finished task in ``--shards DIR``, so a rerun resumes; the table is the same as the serial
one, row for row.
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gear_lab.cli._help import HelpFormatter, plain
from gear_lab.cli._method_args import add_dump_work_args, dump_work_from_args, presets_help
from gear_lab.errors import ConfigError, OutputError
from gear_lab.executors import EXECUTORS, RayExecutor
from gear_lab.files import atomic_write, check_output

if TYPE_CHECKING:
    import pandas as pd

FORMATS = (".csv", ".parquet")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand."""
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of methods over dumps; write one tidy row per head/kind/config",
        description=plain(__doc__.split("\n\n", 1)[1]) + "\n\n" + presets_help(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "dumps", metavar="DUMP", nargs="+", help="dumps written by gear-capture (one table)"
    )
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
    parser.add_argument("--samples", default="0", help="sample indices, e.g. 0,2-3 (default: 0)")
    parser.add_argument("--heads", help="KV-head indices, e.g. 0,2-3 (default: all)")
    parser.add_argument(
        "--no-attention", action="store_true", help="skip the attention metrics (faster)"
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="serial",
        help="where tasks run: this process, or Ray (pip install 'gear-lab[ray]')",
    )
    parser.add_argument(
        "--address", help="Ray cluster address, e.g. ray://head:10001 (default: a local Ray)"
    )
    parser.add_argument(
        "--shards",
        type=Path,
        help="folder for the per-task Parquet shards of --executor ray; a rerun resumes from it",
    )
    parser.add_argument(
        "--configs-per-task",
        type=int,
        metavar="N",
        help="split each (dump, sample, layer) into tasks of N configs, e.g. to spread a large "
        "grid over more Ray workers (default: all configs in one task; same table either way)",
    )
    parser.set_defaults(func=run)


def check_out(out: Path, overwrite: bool) -> Path:
    """Before any work: a known format (Parquet needs pyarrow) and a target
    :func:`gear_lab.files.check_output` accepts (an existing folder that takes files)."""
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out must end in {' or '.join(FORMATS)}, got {out.name!r}")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ConfigError("Parquet output needs pyarrow; pip install pyarrow, or use .csv")
    return check_output(out, overwrite=overwrite)


def _write(df: pd.DataFrame, out: Path) -> None:
    with atomic_write(out) as tmp:
        if out.suffix.lower() == ".parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)


def write_table(df: pd.DataFrame, out: Path) -> None:
    """Write ``df`` to ``out`` (CSV or Parquet) atomically. When that fails (a full disk, a
    folder gone meanwhile) the rows are kept as a CSV in a new temporary folder, named in the
    :class:`OutputError`, so the sweep's work is not lost."""
    try:
        _write(df, out)
    except OutputError as err:
        kept = Path(tempfile.mkdtemp(prefix="gear-lab-sweep-")) / f"{out.stem}.csv"
        try:
            _write(df, kept)
        except OutputError:
            raise OutputError(f"{err}; the results could not be kept anywhere") from err
        raise OutputError(f"{err}; the results are kept in {kept}") from err


def run(args: argparse.Namespace) -> int:
    """Parse the grid, run the sweep with a progress bar, write the table."""
    from gear_lab.sweeps import parse_grid, sweep

    out = check_out(args.out, args.overwrite)
    if args.executor != "ray" and (args.address is not None or args.shards is not None):
        raise ConfigError("--address and --shards go with --executor ray")
    grid = parse_grid(args.grid)
    if args.method is not None:
        if "method" in grid:
            raise ConfigError("give the preset either with --method or as method=... in --grid")
        grid["method"] = [m.strip() for m in args.method.split(",") if m.strip()]
    executor = RayExecutor(args.address, args.shards) if args.executor == "ray" else None
    df = sweep(
        args.dumps,
        grid,
        samples=args.samples,
        heads=args.heads,
        attention=not args.no_attention,
        executor=executor,
        configs_per_task=args.configs_per_task,
        **dump_work_from_args(args),
    )
    write_table(df, out)
    configs = df["config_index"].nunique()
    print(f"wrote {len(df)} rows ({configs} configs) to {out}")
    return 0
