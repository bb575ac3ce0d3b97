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


class DumpExistsError(DumpError, FileExistsError):
    """The output dump exists and ``overwrite`` was not given."""


class CaptureError(GearLabError):
    """Capturing K/V from a model failed (bad prompts, unwritable output, ...)."""


class CacheError(GearLabError):
    """A :class:`gear_lab.cache.GearCache` was used in an unsupported way."""
