"""Exception hierarchy: every user-facing failure is a :class:`GearLabError` with a one-line message."""

from __future__ import annotations


class GearLabError(Exception):
    """Base class of every error gear-lab raises on bad input. ``str(err)`` is one line."""


class ConfigError(GearLabError, ValueError):
    """A compression / capture setting is out of range or inconsistent."""


class TensorError(GearLabError, ValueError):
    """An input tensor has a wrong shape or dtype, or holds NaN / Inf."""


class KernelUnavailableError(GearLabError, RuntimeError):
    """A fused kernel cannot run here (Triton missing, or no CUDA device and no interpreter)."""


class ModelError(GearLabError):
    """A model name or path cannot be resolved or loaded."""


class DumpError(GearLabError):
    """A dump file is missing, unreadable, of a wrong schema, or holds invalid data."""


class OutputError(GearLabError):
    """An output file or folder cannot be written: a bad target, no space, no permission."""


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and ``overwrite`` was not given."""


class DumpExistsError(DumpError, OutputExistsError):
    """The output dump exists and ``overwrite`` was not given."""


class CaptureError(GearLabError):
    """Capturing K/V from a model failed (bad prompts, unwritable output, ...)."""


class CacheError(GearLabError):
    """A :class:`gear_lab.cache.GearCache` was used in an unsupported way."""


class SweepError(GearLabError):
    """A sweep task failed on an executor's worker; the message names the task."""


class NothingCompressedWarning(UserWarning):
    """A live check's compressed cache held as many bytes as full precision: the sequence was
    shorter than one cache block (``block_size``, n_b), so nothing was compressed."""


class PrecisionWarning(UserWarning):
    """Values are far below the resolution of a storage format (e.g. the float16 scales), so
    their reconstruction is mostly rounding error."""


def first_line(err: BaseException) -> str:
    """The first line of ``str(err)``, or the exception's type name when that is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
