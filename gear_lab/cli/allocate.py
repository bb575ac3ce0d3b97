"""``gear-lab allocate DUMP --target-bits 3 --out alloc.json``: per-layer settings under a budget.

Measures every layer x candidate config on the dump (attention-output error of keys and of
values, measured bytes) and picks one candidate per layer so that the mean measured bits per
K/V entry is at most ``--target-bits`` and the summed error is least (an exact multiple-choice
knapsack, :func:`gear_lab.allocation.allocate`); prints it beside the best uniform candidate
within the same budget and writes it as JSON, which ``gear-lab ppl --allocation`` and
``gear-lab check --allocation`` run live. Candidates use the grid grammar of ``gear-lab sweep``
(``NAME=V1,V2;NAME=...``, every combination one candidate). The dump needs queries
(``gear-capture --with-queries``) and every layer. ``--calibrate`` loads the dump's model and
measures each layer's live next-token KL at the best uniform candidate (the ``ppl`` protocol with
one layer compressed at a time, ``--calibrate-windows`` windows); the error minimised is then the
predicted KL (each layer's KL scaled by the dump's error ratios).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from gear_lab.cli._help import HelpFormatter, plain
from gear_lab.files import check_output

#: default candidates: rotated grouped quantization, keys and values at 2..6 bits each, G = 64,
#: blocks of n_b = 64
DEFAULT_CANDIDATES = (
    "method=quant;key_bits=2,3,4,5,6;value_bits=2,3,4,5,6;group_size=64;rotate=true;block_size=64"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``allocate`` subcommand."""
    parser = subparsers.add_parser(
        "allocate",
        help="choose each layer's settings from measured sensitivity under a bits budget",
        description=plain(__doc__.split("\n\n", 1)[1]),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("dump", metavar="DUMP", help="a dump with queries, every layer")
    parser.add_argument(
        "--target-bits",
        type=float,
        required=True,
        help="mean measured bits per K/V entry, at most",
    )
    parser.add_argument(
        "--candidates",
        default=DEFAULT_CANDIDATES,
        help=f"grid of candidate configs (default: {DEFAULT_CANDIDATES})",
    )
    parser.add_argument("--out", required=True, type=Path, help="allocation JSON (atomic write)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--samples", help="sample indices, e.g. 0,2-3 (default: all)")
    parser.add_argument("--device", default="cpu", help="torch device for the work (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="compress K/V in this dtype, as the live cache then stores them (default: as stored)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="weigh layers by their live next-token KL (loads the dump's model)",
    )
    parser.add_argument(
        "--calibrate-windows",
        type=int,
        default=1,
        metavar="N",
        help="corpus windows of 512 + 128 tokens per layer for --calibrate (default: 1)",
    )
    parser.add_argument("--json", action="store_true", help="print the allocation as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Measure, allocate, write and print."""
    from gear_lab.allocation import allocate, save_allocation
    from gear_lab.dump import open_dump
    from gear_lab.fidelity import layer_sensitivity, validate_protocol
    from gear_lab.models import load_model
    from gear_lab.sweeps import parse_grid

    out = check_output(args.out, overwrite=args.overwrite)
    grid = parse_grid(args.candidates)
    calibrate = None
    if args.calibrate:
        validate_protocol(args.calibrate_windows, 512, 128)
        with open_dump(args.dump) as dump:
            model, tokenizer = load_model(dump.model_id, device=args.device)
        calibrate = functools.partial(
            layer_sensitivity, model, tokenizer, windows=args.calibrate_windows
        )
    allocation = allocate(
        args.dump,
        grid,
        args.target_bits,
        samples=args.samples,
        device=args.device,
        dtype=args.dtype,
        progress=True,
        calibrate=calibrate,
    )
    save_allocation(allocation, out, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(allocation.to_dict()))
        return 0
    objective = (
        "attention-output relative error squared, keys + values"
        if allocation.reference is None
        else "predicted next-token KL, calibrated at "
        f"{allocation.candidates[allocation.reference].name}"
    )
    print(
        f"allocation: {allocation.bits_per_entry:.3f} bits per entry (target "
        f"{allocation.target_bits:g}), error {allocation.error:.4g} (sum over "
        f"{len(allocation.choices)} layers of the {objective})"
    )
    print(
        f"uniform:    {allocation.uniform_bits:.3f} bits, error {allocation.uniform_error:.4g}: "
        f"{allocation.uniform_config.name}"
    )
    print("layer   bits     error  config")
    rows = zip(allocation.configs, allocation.layer_bits, allocation.layer_errors, strict=True)
    for layer, (config, bits, error) in enumerate(rows):
        print(f"{layer:5d}  {bits:5.2f}  {error:8.2e}  {config.name}")
    print(f"wrote {out}")
    return 0
