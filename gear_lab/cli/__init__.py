"""Command-line entry points: argument parsing only; every command calls the public API.

``gear-lab`` is a command group; each subcommand lives in its own module of this package,
which exposes ``register(subparsers)`` and sets ``func`` on its parser. Errors that a user can
cause (:class:`gear_lab.errors.GearLabError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from gear_lab.errors import GearLabError

# Subcommand modules of ``gear-lab``, in the order they appear in ``--help``.
_COMMAND_MODULES: tuple[str, ...] = ("info",)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except GearLabError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The ``gear-lab`` parser with every registered subcommand."""
    from gear_lab import __version__

    parser = argparse.ArgumentParser(
        prog="gear-lab", description="Study KV-cache compression on real model tensors."
    )
    parser.add_argument("--version", action="version", version=f"gear-lab {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"gear_lab.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gear-lab``."""
    return _run(build_parser(), argv)


def capture_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gear-capture``."""
    from gear_lab.cli.capture import build_capture_parser

    return _run(build_capture_parser(), argv)
