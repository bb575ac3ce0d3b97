"""Compression settings: the per-tensor :class:`TensorCompression`, the K/V pair
:class:`CompressionConfig`, and the registry of named presets (GEAR, Kang et al. 2024, and its
neighbours KIVI, KCVT, FP8).

Every config is a frozen dataclass validated on construction (:class:`ConfigError`) and
round-trips through ``to_dict()`` / ``from_dict()`` and JSON. Shape-dependent checks (a rank
larger than ``min(seq, head_dim)``) happen in :func:`gear_lab.compression.compress`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from gear_lab.errors import ConfigError

AXES = ("channel", "token")
OUTLIER_MODES = ("signed", "magnitude")
LOWRANK_METHODS = ("power", "svd")
FP8_FORMATS = ("e4m3", "e5m2")
FP8_SCALES = ("group", "tensor")
FACTOR_DTYPES = ("float16", "bfloat16", "float8_e4m3")
KINDS = ("keys", "values", "keys_pre_rope")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class TensorCompression:
    """How one tensor kind (keys or values, ``[batch, kv_heads, seq, head_dim]``) is compressed.

        ``X_hat = D + L + S`` (GEAR): ``D`` uniform asymmetric ``bits``-bit quantization (or an FP8
        round trip, ``fp8``) grouped along ``axis`` in groups of ``group_size`` (``None``: the whole
        axis, KCVT); ``S`` the fraction ``outliers`` of each ``outlier_axis`` vector kept exactly;
        ``L`` a rank-``rank`` correction of the residual per ``[seq, head_dim]`` matrix, by exact
        ``svd`` or seeded ``power`` iteration with ``loops`` loops; ``fp8_scale="tensor"`` gives fp8 one
    scale per ``[seq, head_dim]`` matrix instead of one per group. ``rotate`` applies a seeded
        Walsh-Hadamard rotation of head_dim first. ``bits=None``, ``fp8=None``, no outliers and no
        rank is the identity. ``factor_dtype`` is how the kept ``L`` factors are stored
        (``float8_e4m3`` with a float16 scale per rank component); the fit itself runs in the
        compute dtype.
    """

    bits: int | None = 4
    axis: str = "channel"
    group_size: int | None = 64
    outliers: float = 0.0
    outlier_mode: str = "signed"
    outlier_axis: str = "token"
    rank: int = 0
    lowrank: str = "power"
    loops: int = 3
    seed: int = 0
    rotate: bool = False
    fp8: str | None = None
    fp8_scale: str = "group"
    factor_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits is not None:
            _check_int("bits", self.bits, 1, 8)
        _check_choice("axis", self.axis, AXES)
        if self.group_size is not None:
            _check_int("group_size", self.group_size, 1)
        if isinstance(self.outliers, bool) or not isinstance(self.outliers, int | float):
            raise ConfigError(f"outliers must be a fraction in [0, 1), got {self.outliers!r}")
        if not 0.0 <= self.outliers < 1.0:
            raise ConfigError(f"outliers must be a fraction in [0, 1), got {self.outliers}")
        object.__setattr__(self, "outliers", float(self.outliers))
        _check_choice("outlier_mode", self.outlier_mode, OUTLIER_MODES)
        _check_choice("outlier_axis", self.outlier_axis, AXES)
        _check_int("rank", self.rank, 0)
        _check_choice("lowrank", self.lowrank, LOWRANK_METHODS)
        _check_int("loops", self.loops, 1)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.rotate, bool):
            raise ConfigError(f"rotate must be true or false, got {self.rotate!r}")
        _check_choice("fp8", self.fp8, (None, *FP8_FORMATS))
        _check_choice("fp8_scale", self.fp8_scale, FP8_SCALES)
        _check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        if self.fp8_scale != "group" and self.fp8 is None:
            raise ConfigError("fp8_scale='tensor' applies to fp8 methods only")
        if self.fp8 is not None and self.bits is not None:
            raise ConfigError("fp8 and bits exclude each other: set bits=None for an fp8 method")
        if self.rotate and self.bits is None and self.fp8 is None:
            raise ConfigError("rotate needs a quantizer (bits or fp8) to act on")

    @property
    def is_identity(self) -> bool:
        """True when nothing is compressed (the tensor is stored as is)."""
        return self.bits is None and self.fp8 is None and self.outliers == 0 and self.rank == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorCompression:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return _from_mapping(cls, data)


def _from_mapping(cls: Any, data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__} needs a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class CompressionConfig:
    """Settings for keys and values, plus block-wise streaming.

    ``block_size`` (n_b): compress each block of n_b tokens once, with its own low rank; a
    trailing partial block stays full precision. ``prefill_rank``: the rank a cache uses on
    the prompt (see :meth:`for_kind`); ``None`` means the same rank as the decode blocks.
    """

    keys: TensorCompression = dataclasses.field(default_factory=TensorCompression)
    values: TensorCompression = dataclasses.field(
        default_factory=lambda: TensorCompression(axis="token")
    )
    block_size: int | None = None
    prefill_rank: int | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        for kind in ("keys", "values"):
            if not isinstance(getattr(self, kind), TensorCompression):
                raise ConfigError(f"{kind} must be a TensorCompression")
        if self.block_size is not None:
            _check_int("block_size", self.block_size, 1)
        if self.prefill_rank is not None:
            _check_int("prefill_rank", self.prefill_rank, 0)
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")

    def for_kind(self, kind: str, prefill: bool = False) -> TensorCompression:
        """The settings of ``kind`` ("keys", "keys_pre_rope" or "values"); with ``prefill`` the
        rank is ``prefill_rank`` when that is set."""
        _check_choice("kind", kind, KINDS)
        tc = self.values if kind == "values" else self.keys
        if prefill and self.prefill_rank is not None and tc.rank > 0:
            tc = replace(tc, rank=self.prefill_rank)
        return tc

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"CompressionConfig needs a mapping, got {type(data).__name__}")
        items = dict(data)
        for kind in ("keys", "values"):
            if kind in items:
                items[kind] = TensorCompression.from_dict(items[kind])
        return _from_mapping(cls, items)

    def to_json(self) -> str:
        """One JSON object."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompressionConfig:
        """Inverse of :meth:`to_json`; bad JSON raises :class:`ConfigError`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"bad compression config JSON: {err}") from None
        return cls.from_dict(data)


def _kv(**common: Any) -> tuple[TensorCompression, TensorCompression]:
    """Keys per channel, values per token (the KIVI convention) with shared settings."""
    return TensorCompression(axis="channel", **common), TensorCompression(axis="token", **common)


# GEAR's defaults: 4 bits, G = 64, s = 2 %, r = 4 (Kang et al. 2024, section 4).
_GEAR = {"bits": 4, "group_size": 64, "outliers": 0.02, "rank": 4}

_PRESETS: dict[str, Callable[[], CompressionConfig]] = {
    "gear": lambda: CompressionConfig(*_kv(**_GEAR)),
    "gear-l": lambda: CompressionConfig(*_kv(**{**_GEAR, "outliers": 0.0})),
    "gear-kcvt": lambda: CompressionConfig(*_kv(**{**_GEAR, "group_size": None})),
    "kcvt": lambda: CompressionConfig(*_kv(bits=4, group_size=None)),
    # KIVI (Liu et al. 2024): 2-bit, G = 32, recent tokens kept in full precision (n_b = 64 here).
    "kivi": lambda: CompressionConfig(*_kv(bits=2, group_size=32), block_size=64),
    "outlier-quant": lambda: CompressionConfig(*_kv(**{**_GEAR, "rank": 0})),
    "quant": lambda: CompressionConfig(*_kv(bits=4, group_size=64)),
    "fp8": lambda: CompressionConfig(*_kv(bits=None, fp8="e4m3", group_size=64)),
    "none": lambda: CompressionConfig(*_kv(bits=None, group_size=None)),
}

_TENSOR_FIELDS = tuple(f.name for f in fields(TensorCompression))
_CONFIG_FIELDS = ("block_size", "prefill_rank", "name")


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return list(_PRESETS)


def get_preset(name: str, /, **overrides: Any) -> CompressionConfig:
    """The preset ``name`` with ``overrides`` applied.

    An override is a :class:`TensorCompression` field (``bits``, ``group_size``, ``rank``,
    ``outliers``, ``loops``, ``rotate``, ``lowrank``, ``seed``, ``factor_dtype``, ...) applied to keys and values,
    its ``key_*`` / ``value_*`` variant applied to one of them (after the shared ones), or
    ``block_size`` / ``prefill_rank`` / ``name``. Values are taken literally (``group_size=None``
    means the whole axis). The resulting name lists the overrides, e.g. ``gear[bits=2,rank=2]``.
    """
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(_PRESETS)}")
    config = _PRESETS[name]()
    shared: dict[str, Any] = {}
    per_kind: dict[str, dict[str, Any]] = {"keys": {}, "values": {}}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        if key in _TENSOR_FIELDS:
            shared[key] = value
        elif key.startswith("key_") and key[4:] in _TENSOR_FIELDS:
            per_kind["keys"][key[4:]] = value
        elif key.startswith("value_") and key[6:] in _TENSOR_FIELDS:
            per_kind["values"][key[6:]] = value
        elif key in _CONFIG_FIELDS:
            top[key] = value
        else:
            raise ConfigError(f"unknown preset override {key!r}")
    label = ",".join(f"{k}={v}" for k, v in overrides.items() if k != "name")
    top.setdefault("name", f"{name}[{label}]" if label else name)
    return replace(
        config,
        keys=replace(config.keys, **{**shared, **per_kind["keys"]}),
        values=replace(config.values, **{**shared, **per_kind["values"]}),
        **top,
    )
