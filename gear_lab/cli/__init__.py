"""Command-line entry points: argument parsing only; every command calls the public API.

``gear-lab`` is a command group; each subcommand lives in its own public module of this
package (found by name, so adding a command is adding a file), which exposes
``register(subparsers)`` and sets ``func`` on its parser. ``capture.py`` is the separate
``gear-capture`` entry point; modules starting with ``_`` hold shared argument helpers. Errors that a user can
cause (:class:`gear_lab.errors.GearLabError`) print one line on stderr and exit with code 2;
SIGTERM and SIGHUP unwind like Ctrl-C (so no partial output stays) and exit with 128 + signal.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from gear_lab.errors import GearLabError


def _command_modules() -> list[str]:
    """Subcommand modules of ``gear-lab``, in alphabetical order."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(__path__)
        if not info.name.startswith("_") and info.name != "capture"
    )


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup (atomic writes) runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_TERMINATING = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM / SIGHUP raise :class:`Terminated` (once: a repeat during
    the cleanup is ignored). Only the main thread can take signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        for sig in _TERMINATING:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in _TERMINATING}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int | None] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        with _terminate_as_interrupt():
            return int(func(args) or 0)
    except GearLabError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except Terminated as err:
        print(f"{parser.prog}: terminated by {err}", file=sys.stderr)
        return 128 + err.signum
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
    for name in _command_modules():
        importlib.import_module(f"gear_lab.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gear-lab``."""
    return _run(build_parser(), argv)


def capture_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gear-capture``."""
    from gear_lab.cli.capture import build_capture_parser

    return _run(build_capture_parser(), argv)
