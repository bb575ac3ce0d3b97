"""The compiled CPU library: the C++ sources of ``gear_lab/csrc`` (shipped as package data),
compiled once with the system compiler (``$CXX``, else ``c++``) into ``<gear-lab cache>/ext`` and
loaded with :mod:`ctypes`; no build tool beyond the compiler is needed.

- ``gear_cpu.cpp``: block-wise GEAR compression and decompression
  (:mod:`gear_lab.compression.cpu_kernel`);
- ``attention.cpp``: the batched attention error of a causal block of query rows
  (:meth:`gear_lab.metrics.AttentionReference.error_stack`);
- ``vec16.h``: the 16-lane float vectors both use.

Where the build or the load fails, one warning names the reason and every caller runs its torch
reference. ``GEAR_LAB_KERNEL=reference`` (or ``with reference():``) forces the references, e.g.
to compare the two.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from contextvars import ContextVar
from importlib.resources import files
from pathlib import Path

__all__ = ["KERNEL_ENV", "library", "reference", "unavailable_reason"]

KERNEL_ENV = "GEAR_LAB_KERNEL"
SOURCES = ("gear_cpu.cpp", "attention.cpp")
HEADERS = ("vec16.h",)  # included by the sources
# the exported functions, each taking a pointer to its argument struct
FUNCTIONS = ("gear_compress", "gear_decompress", "gear_attention_block")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
_forced_reference: ContextVar[bool] = ContextVar("gear_lab_forced_reference", default=False)


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Within the block, every compiled path runs its torch reference instead."""
    token = _forced_reference.set(True)
    try:
        yield
    finally:
        _forced_reference.reset(token)


def enabled() -> bool:
    """False within :func:`reference` or with ``GEAR_LAB_KERNEL=reference``."""
    return not _forced_reference.get() and os.environ.get(KERNEL_ENV, "auto") != "reference"


def _build_dir() -> Path:
    from gear_lab.models import cache_dir

    return cache_dir() / "ext"


def _compiler() -> str:
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        raise OSError(f"no C++ compiler found ({cxx})")
    return path


def _machine() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _load() -> ctypes.CDLL:
    """Compile (once per sources and headers, flags, compiler and CPU) and load the library."""
    names = [*SOURCES, *HEADERS]
    sources = [files("gear_lab").joinpath("csrc", name).read_bytes() for name in names]
    cxx = _compiler()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    digest = hashlib.sha256(
        b"\0".join(
            [*sources, " ".join(FLAGS).encode(), version.stdout.encode(), _machine().encode()]
        )
    ).hexdigest()[:16]
    folder = _build_dir()
    target = folder / f"gear_lab-{digest}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            for name, source in zip(names, sources, strict=True):
                (Path(tmp) / name).write_bytes(source)
            built = Path(tmp) / target.name
            cmd = [
                cxx,
                *FLAGS,
                "-std=c++17",
                "-shared",
                "-fPIC",
                *(str(Path(tmp) / name) for name in SOURCES),
                "-o",
                str(built),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
                raise OSError(f"{Path(cxx).name} failed: {lines[0]}")
            os.replace(built, target)  # atomic: concurrent builders agree
    lib = ctypes.CDLL(str(target))
    for name in FUNCTIONS:
        getattr(lib, name).argtypes = [ctypes.c_void_p]
        getattr(lib, name).restype = ctypes.c_int
    return lib


@functools.cache
def _built() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None), or (None, why not) after one warning."""
    try:
        return _load(), None
    except (OSError, subprocess.SubprocessError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        warnings.warn(
            f"gear-lab: compiled CPU kernel unavailable ({reason}); using the torch reference",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason


def library() -> ctypes.CDLL | None:
    """The loaded library (built on first call), or ``None`` where it is forced off or cannot be
    built (then the caller runs its torch reference)."""
    return _built()[0] if enabled() else None


def unavailable_reason() -> str | None:
    """``None`` when the compiled CPU path can run (building it on first call), else why not
    (one line): forced off, or the build / load failed."""
    if not enabled():
        return f"forced off ({KERNEL_ENV}=reference or reference())"
    return _built()[1]
