"""Output files: one check of a target before any work, one atomic write (whole or absent).

Every command that writes (dumps, sweep tables, the model cache) checks its target with
:func:`check_output` before the slow part, then writes through :func:`atomic_write`: a temporary
sibling is filled, flushed to disk and renamed into place only on success; any exception
(``KeyboardInterrupt`` included) removes it. Write failures become one-line
:class:`~gear_lab.errors.OutputError` messages ("no space left on ...: nothing written").
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gear_lab.errors import GearLabError, OutputError, OutputExistsError, first_line

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_UMASK = os.umask(0o022)  # read once, at import (setting it is process-wide)
os.umask(_UMASK)


def _probe(folder: Path) -> None:
    """Create and remove a hidden file in ``folder``; the only honest writability test (root
    passes ``os.access`` everywhere, and ``/proc`` accepts nothing)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".gear-lab-probe-", dir=folder)
    except OSError as err:
        raise OutputError(f"cannot write in {folder}: {err.strerror or first_line(err)}") from None
    os.close(fd)
    os.unlink(name)


def check_output(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    make_parents: bool = False,
    exists_error: type[OutputExistsError] = OutputExistsError,
) -> Path:
    """Check that ``path`` may be written as a file, before any work; return it (``~`` expanded).

    Refused with :class:`OutputError`: a folder or a non-regular file (``/dev/...``) at ``path``,
    a missing parent folder (unless ``make_parents``, then the nearest existing ancestor must
    take new entries), a folder that takes no new file (read-only, ``/proc``). An existing file
    without ``overwrite`` raises ``exists_error``.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputError(f"{target} is a folder, not a file path")
    if target.exists() and not target.is_file():
        raise OutputError(f"{target} is not a regular file")
    if target.exists() and not overwrite:
        raise exists_error(f"{target} exists; pass --overwrite (overwrite=True) to replace it")
    writable_folder(target.parent, make=make_parents)
    return target


def writable_folder(folder: str | os.PathLike[str], *, make: bool = False) -> Path:
    """Check that ``folder`` takes new files (creating nothing that stays); with ``make`` a missing
    folder passes when its nearest existing ancestor does. Raises :class:`OutputError`."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != folder and not make:
        raise OutputError(f"output folder {folder} does not exist")
    if not existing.is_dir():
        raise OutputError(f"output folder {folder} cannot be created: {existing} is not a folder")
    _probe(existing)
    return folder


def _write_error(target: Path, err: OSError) -> OutputError:
    """The one-line :class:`OutputError` of a failed write of ``target`` (nothing was kept)."""
    if err.errno in _NO_SPACE:
        return OutputError(f"no space left on {target}: nothing written")
    return OutputError(f"cannot write {target}: {err.strerror or first_line(err)}; nothing written")


def _fsync(path: Path, *, tree: bool = False) -> None:
    """Flush ``path`` (a file or a folder) to disk; with ``tree`` every entry below it too."""
    for p in [path, *(sorted(path.rglob("*")) if tree else [])]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_write(
    target: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    folder: bool = False,
    exists_error: type[OutputExistsError] = OutputExistsError,
) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``target`` (a file, or a folder with ``folder``);
    when the block ends normally, flush it to disk and rename it to ``target``.

    Any exception, ``KeyboardInterrupt`` included, removes the temporary path. An ``OSError``
    (in the block or while committing) becomes a one-line :class:`OutputError`; a ``target``
    that appeared meanwhile raises ``exists_error`` unless ``overwrite``. The temporary path is
    created exclusively (never through a planted symlink).
    """
    target = Path(target).expanduser()
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        options = {"prefix": f".{target.name}.", "suffix": ".tmp", "dir": target.parent}
        if folder:
            tmp = Path(tempfile.mkdtemp(**options))
        else:
            fd, name = tempfile.mkstemp(**options)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        tmp.chmod((0o777 if folder else 0o666) & ~_UMASK)  # as a plain open() would create it
        _fsync(tmp, tree=folder)
        if target.exists() and not overwrite:
            raise exists_error(f"{target} appeared meanwhile; not replaced")
        os.replace(tmp, target)
        with contextlib.suppress(OSError):  # the rename is done; some file systems refuse this
            _fsync(target.parent)
    except GearLabError:
        raise
    except OSError as err:
        raise _write_error(target, err) from err
    finally:
        if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            tmp.unlink(missing_ok=True)


class GuardedFile(io.FileIO):
    """A binary file whose write failures (and interrupts arriving inside a write) are recorded
    instead of raised, for writers such as h5py that crash when their file object raises.

    After a failure further writes are dropped; :meth:`check` re-raises the first failure. Call
    it after each unit of work and before trusting the file.
    """

    failure: BaseException | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Write all of ``data`` (retrying short writes); on failure record it, report success."""
        view = memoryview(data).cast("B")
        if self.failure is None:
            try:
                done = 0
                while done < len(view):
                    done += super().write(view[done:])
            except BaseException as err:  # re-raised by check()
                self.failure = err
        return len(view)

    def check(self) -> None:
        """Raise the first recorded failure, if any."""
        if self.failure is not None:
            raise self.failure
