"""Shared ``--method`` / ``--bits`` / ... flags of ``gear-lab eval``, ``sweep``, ``check``, ``ppl``.

Flag names follow the config fields (``--group-size`` is ``group_size``); each per-tensor flag
also has ``--key-*`` and ``--value-*`` variants that override it for keys or values only.
"""

from __future__ import annotations

import argparse
from typing import Any

from gear_lab.compression.presets import (
    AXES,
    FACTOR_DTYPES,
    FP8_SCALES,
    LOWRANK_METHODS,
    OUTLIER_MODES,
    CompressionConfig,
    get_preset,
    list_presets,
)


def _int_or_none(text: str) -> int | str:
    """An integer, or ``none`` (kept as the string until :func:`config_from_args`)."""
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


# field -> (argparse keyword arguments, help); shared and --key-*/--value-* variants
_TENSOR_FLAGS: dict[str, dict[str, Any]] = {
    "bits": {"type": int, "help": "quantization bits, 1..8"},
    "group_size": {"type": _int_or_none, "help": "group size, or 'none' for the whole axis"},
    "axis": {"choices": AXES, "help": "quantization grouping axis"},
    "outliers": {"type": float, "help": "outlier fraction s per vector, in [0, 1)"},
    "outlier_mode": {"choices": OUTLIER_MODES, "help": "outliers by sign or by magnitude"},
    "outlier_axis": {"choices": AXES, "help": "outliers per token vector or per channel vector"},
    "rank": {"type": int, "help": "low-rank correction rank per [seq, head_dim] matrix"},
    "lowrank": {"choices": LOWRANK_METHODS, "help": "low-rank method"},
    "loops": {"type": int, "help": "power-iteration loops"},
    "seed": {"type": int, "help": "seed of power iteration and rotation"},
    "fp8_scale": {
        "choices": FP8_SCALES,
        "help": "fp8 scale per group or per [seq, head_dim] matrix",
    },
    "factor_dtype": {
        "choices": FACTOR_DTYPES,
        "help": "storage dtype of the kept low-rank factors",
    },
    "rotate": {
        "action": argparse.BooleanOptionalAction,
        "help": "Hadamard rotation of head_dim before quantization",
    },
}


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Add the compression flags (all optional; unset flags keep the preset's values)."""
    group = parser.add_argument_group("compression method")
    group.add_argument(
        "--method", default="gear", choices=list_presets(), help="preset (default: gear)"
    )
    group.add_argument(
        "--block-size",
        type=_int_or_none,
        help="compress blocks of this many tokens; a trailing partial block stays full precision",
    )
    group.add_argument("--prefill-rank", type=int, help="rank used for the prompt by a cache")
    for field, spec in _TENSOR_FLAGS.items():
        flag = field.replace("_", "-")
        for prefix, who in (("", "keys and values"), ("key-", "keys"), ("value-", "values")):
            dest = prefix.replace("-", "_") + field
            group.add_argument(
                f"--{prefix}{flag}",
                dest=dest,
                default=None,
                **{**spec, "help": f"{spec['help']} ({who})" if prefix else spec["help"]},
            )


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    """The :class:`CompressionConfig` of ``--method`` with every given flag as an override
    (:func:`gear_lab.compression.get_preset`); bad values raise :class:`ConfigError`."""
    names = ["block_size", "prefill_rank"]
    names += [p + f for f in _TENSOR_FLAGS for p in ("", "key_", "value_")]
    overrides = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = None if value == "none" else value
    return get_preset(args.method, **overrides)


def add_dump_work_args(parser: argparse.ArgumentParser) -> None:
    """Flags choosing what of a dump to compress, and where: ``--layers``, ``--kinds``,
    ``--device``, ``--dtype`` (read back by :func:`dump_work_from_args`)."""
    parser.add_argument("--layers", help="layers, e.g. 0,5,10-12 (default: all in the dump)")
    parser.add_argument(
        "--kinds", default="keys,values", help="comma-separated kinds (default: keys,values)"
    )
    parser.add_argument("--device", default="cpu", help="torch device for the work (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="compress K/V in this dtype, as a cache would hold them (default: as stored)",
    )


def dump_work_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``layers``, ``kinds``, ``device`` and ``dtype`` keyword arguments of
    :func:`gear_lab.sweeps.sweep` from :func:`add_dump_work_args` flags."""
    import torch

    return {
        "layers": args.layers,
        "kinds": [k.strip() for k in args.kinds.split(",") if k.strip()],
        "device": args.device,
        "dtype": None if args.dtype is None else getattr(torch, args.dtype),
    }
