"""Shared ``--method`` / ``--bits`` / ... flags of ``gear-lab eval``, ``check``, ``ppl``.

The flags are generated from the settings table (:data:`gear_lab.compression.config.TENSOR_SETTINGS`
and ``CONFIG_SETTINGS``), as the studio's widgets are: flag names follow the config fields
(``--group-size`` is ``group_size``), and each per-tensor flag also has ``--key-*`` and
``--value-*`` variants that override it for keys or values only.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gear_lab.cli._help import HelpFormatter
from gear_lab.compression.config import (
    CONFIG_SETTINGS,
    TENSOR_SETTINGS,
    CompressionConfig,
    Setting,
)
from gear_lab.compression.presets import get_preset, list_presets, preset_descriptions

NONE = "none"  # how None is spelled on the command line (kept as the string until parsed)
PREFIXES = ("key_", "value_")


def presets_help() -> str:
    """The preset list of ``--help``: one ``  name  description (settings)`` line each."""
    width = max(map(len, list_presets())) + 2
    lines = [f"  {name:<{width}}{text}" for name, text in preset_descriptions().items()]
    return "presets (--method):\n\n" + "\n".join(lines)


def _number(setting: Setting) -> Callable[[str], int | float | str]:
    """argparse ``type`` of a numeric setting: its number, or ``none`` where None is allowed."""

    def parse(text: str) -> int | float | str:
        if setting.optional and text.lower() == NONE:
            return NONE
        try:
            return setting.kind(text)
        except ValueError:
            what = "an integer" if setting.kind is int else "a number"
            alternative = f" or {NONE!r}" if setting.optional else ""
            raise argparse.ArgumentTypeError(
                f"expected {what}{alternative}, got {text!r}"
            ) from None

    return parse


def _flag_name(field: str) -> str:
    """``group_size`` -> ``--group-size``."""
    return "--" + field.replace("_", "-")


def _flag(setting: Setting) -> dict[str, Any]:
    """argparse keyword arguments of a setting's flag."""
    help_text = setting.help
    if setting.optional:
        help_text += f"; {NONE!r}: {setting.none_means}"
    if setting.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "help": help_text}
    if setting.choices:
        choices = (*setting.choices, NONE) if setting.optional else setting.choices
        return {"choices": choices, "help": help_text}
    return {"type": _number(setting), "help": help_text}


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """Add the compression flags (all optional; unset flags keep the preset's values) and the
    preset list to ``parser``'s description (its ``formatter_class`` becomes :class:`HelpFormatter`)."""
    parser.formatter_class = HelpFormatter
    parser.description = "\n\n".join(filter(None, (parser.description, presets_help())))
    group = parser.add_argument_group("compression method")
    group.add_argument(
        "--method",
        default="gear",
        choices=list_presets(),
        help="preset, see the list above (default: gear)",
    )
    for setting in (*TENSOR_SETTINGS, *CONFIG_SETTINGS):
        group.add_argument(_flag_name(setting.name), default=None, **_flag(setting))
    overrides = parser.add_argument_group(
        "per-tensor overrides",
        f"Every flag above from {_flag_name(TENSOR_SETTINGS[0].name)} to "
        f"{_flag_name(TENSOR_SETTINGS[-1].name)} also comes as --key-X and --value-X (e.g. "
        "--key-bits 4 --value-bits 2): it then sets keys or values only and wins over the shared "
        "flag.",
    )
    for setting in TENSOR_SETTINGS:
        for prefix in PREFIXES:
            overrides.add_argument(
                _flag_name(prefix + setting.name),
                dest=prefix + setting.name,
                default=None,
                **{**_flag(setting), "help": argparse.SUPPRESS},
            )


def config_from_args(args: argparse.Namespace) -> CompressionConfig:
    """The :class:`CompressionConfig` of ``--method`` with every given flag as an override
    (:func:`gear_lab.compression.get_preset`); bad values raise :class:`ConfigError`."""
    names = [s.name for s in CONFIG_SETTINGS]
    names += [p + s.name for s in TENSOR_SETTINGS for p in ("", *PREFIXES)]
    overrides = {}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = None if value == NONE else value
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
