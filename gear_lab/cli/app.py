"""``gear-lab app [DUMP]``: open the Streamlit studio (:mod:`gear_lab.studio`) on a dump.

The studio is served headless on 127.0.0.1 unless ``--host`` says otherwise; the dump path
reaches the app through the ``GEAR_LAB_DUMP`` environment variable.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from gear_lab.errors import ConfigError
from gear_lab.studio import DUMP_ENV, STUDIO_SCRIPT


def streamlit_command(script: Path, *, host: str, port: int, max_upload_mb: int) -> list[str]:
    """The ``streamlit run`` command line serving ``script`` headless on ``host:port``."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        f"--server.address={host}",
        f"--server.port={port}",
        "--server.headless=true",
        f"--server.maxUploadSize={max_upload_mb}",
        "--browser.gatherUsageStats=false",
        "--client.toolbarMode=minimal",
    ]


def check_port(host: str, port: int) -> None:
    """Raise :class:`ConfigError` unless ``host:port`` can be bound now (as the server will,
    with ``SO_REUSEADDR``): a bad port, an unknown host, or a port already in use."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as err:
        raise ConfigError(f"--host {host!r:.80} cannot be resolved ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise ConfigError(f"cannot serve on {host}:{port}: {err.strerror}") from None


def run(args: argparse.Namespace) -> int:
    """Check the settings and the dump (same reader and errors as the library), then serve."""
    if args.max_upload_mb < 1:
        raise ConfigError(f"--max-upload-mb must be >= 1, got {args.max_upload_mb}")
    check_port(args.host, args.port)
    env = dict(os.environ)
    if args.dump is not None:
        from gear_lab.dump import open_dump

        with open_dump(args.dump) as dump:
            print(dump.summary())
        env[DUMP_ENV] = str(Path(args.dump).resolve())
    cmd = streamlit_command(
        STUDIO_SCRIPT, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb
    )
    print(f"gear-lab studio on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    return subprocess.call(cmd, env=env)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``app`` subcommand."""
    p = subparsers.add_parser(
        "app",
        help="open the Streamlit studio on a dump",
        description="Serve the gear-lab studio (Streamlit) headless; open the printed URL.",
    )
    p.add_argument(
        "dump", nargs="?", type=Path, help="HDF5 dump to open (default: pick in the app)"
    )
    p.add_argument("--port", type=int, default=8501, help="port to serve on (default 8501)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, local only)"
    )
    p.add_argument(
        "--max-upload-mb", type=int, default=200, help="largest dump upload accepted (MB)"
    )
    p.set_defaults(func=run)
