"""Compression settings: the per-tensor :class:`TensorCompression`, the K/V pair
:class:`CompressionConfig`, and :data:`TENSOR_SETTINGS` / :data:`CONFIG_SETTINGS`, the one table
of user-facing settings from which the CLI flags and the studio widgets are generated.

Every config is a frozen dataclass validated on construction (:class:`ConfigError`) and
round-trips through ``to_dict()`` / ``from_dict()`` and JSON. Shape-dependent checks (a rank
larger than ``min(seq, head_dim)``) happen in :func:`gear_lab.compression.compress`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from gear_lab.constants import COMPRESSIBLE_KINDS
from gear_lab.errors import ConfigError

AXES = ("channel", "token")
OUTLIER_MODES = ("signed", "magnitude")
LOWRANK_METHODS = ("power", "svd")
FP8_FORMATS = ("e4m3", "e5m2")
FP8_SCALES = ("group", "tensor")
FACTOR_DTYPES = ("float16", "bfloat16", "float8_e4m3")
CODEBOOKS = ("gaussian", "sphere", "fitted", "fitted-head")
CUSTOM = "custom"  # the name of a config built by hand


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

    ``codebook`` replaces the uniform levels of ``D`` by a Lloyd-Max codebook
    (:mod:`gear_lab.compression.codebook`): ``"gaussian"`` (N(0, 1) levels after per-group
    mean/std normalization, for rotated inputs), ``"sphere"`` (TurboQuant's levels for a
    coordinate of a random unit vector, after per-group L2 normalization), ``"fitted"`` (k-means
    levels per channel for ``axis="channel"``, per token for ``axis="token"``) or
    ``"fitted-head"`` (one k-means codebook per ``[seq, head_dim]`` matrix). Fitted codebooks
    are calibrated on the tensor being compressed (a live cache: its prompt and blocks; a
    dump: that dump's tensor) and stored. ``qjl`` gives the last of ``bits`` to a 1-bit QJL
    sketch of each token's residual (:mod:`gear_lab.compression.qjl`; TurboQuant, Zandieh et
    al. 2025): ``D`` uses ``bits - 1`` bits.
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
    codebook: str | None = None
    qjl: bool = False

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
        _check_choice("codebook", self.codebook, (None, *CODEBOOKS))
        if self.codebook is not None and self.bits is None:
            raise ConfigError("codebook needs bits (a codebook of 2**bits levels), not fp8")
        if not isinstance(self.qjl, bool):
            raise ConfigError(f"qjl must be true or false, got {self.qjl!r}")
        if self.qjl and (self.bits is None or self.bits < 2):
            raise ConfigError("qjl needs bits >= 2: one of them goes to the sign sketch")

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
    ``sinks``: the first ``sinks`` tokens of a sequence are kept as they are, never compressed
    (attention sinks: StreamingLLM, Xiao et al. 2024; KVQuant, Hooper et al. 2024, keeps them in
    fp16); blocks of ``block_size`` start after them.
    ``preset``: the preset the settings start from (``None``: built by hand); ``name``: the
    display label (:func:`gear_lab.compression.presets.config_label` for a preset's config).
    """

    keys: TensorCompression = dataclasses.field(default_factory=TensorCompression)
    values: TensorCompression = dataclasses.field(
        default_factory=lambda: TensorCompression(axis="token")
    )
    block_size: int | None = None
    prefill_rank: int | None = None
    name: str = CUSTOM
    preset: str | None = None
    sinks: int = 0

    def __post_init__(self) -> None:
        for kind in ("keys", "values"):
            if not isinstance(getattr(self, kind), TensorCompression):
                raise ConfigError(f"{kind} must be a TensorCompression")
        if self.block_size is not None:
            _check_int("block_size", self.block_size, 1)
        if self.prefill_rank is not None:
            _check_int("prefill_rank", self.prefill_rank, 0)
        _check_int("sinks", self.sinks, 0)
        if not isinstance(self.name, str):
            raise ConfigError(f"name must be a string, got {self.name!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ConfigError(f"preset must be a preset name or None, got {self.preset!r}")

    def for_kind(self, kind: str, prefill: bool = False) -> TensorCompression:
        """The settings of ``kind`` ("keys", "keys_pre_rope" or "values"); with ``prefill`` the
        rank is ``prefill_rank`` when that is set."""
        _check_choice("kind", kind, COMPRESSIBLE_KINDS)
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


@dataclass(frozen=True)
class Setting:
    """One user-facing config field: what the CLI flag and the studio widget for it offer.

    ``kind``: the value type (``bool``, ``int``, ``float`` or ``str``); ``choices``: every
    allowed value of a ``str`` setting; ``optional``: ``None`` is allowed (``none`` on the
    command line, ``none_means`` in the studio). The studio offers ``steps`` (a ladder of
    numbers), else a slider over ``span`` = ``(low, high, step)``, else a free number; settings
    with ``more`` sit under "more settings". The CLI accepts any valid value, not only these.
    """

    name: str
    kind: type
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False
    none_means: str = "none"
    steps: tuple[int, ...] = ()
    span: tuple[float, float, float] | None = None
    more: bool = False


#: every :class:`TensorCompression` field, in the order the CLI and the studio show them
TENSOR_SETTINGS: tuple[Setting, ...] = (
    Setting("bits", int, "quantization bits, 1..8", optional=True, none_means="no integer quantizer",
            steps=(1, 2, 3, 4, 5, 6, 7, 8)),
    Setting("group_size", int, "quantization group size", optional=True, none_means="whole axis",
            steps=(8, 16, 32, 64, 128)),
    Setting("outliers", float, "outlier fraction s per vector, in [0, 1)", span=(0.0, 0.2, 0.005)),
    Setting("rank", int, "low-rank correction rank per [seq, head_dim] matrix", span=(0, 32, 1)),
    Setting("loops", int, "power-iteration loops", span=(1, 10, 1)),
    Setting("rotate", bool, "Hadamard rotation of head_dim before quantization"),
    Setting("codebook", str, "Lloyd-Max codebook instead of uniform levels", choices=CODEBOOKS,
            optional=True, none_means="uniform levels"),
    Setting("axis", str, "quantization grouping axis", choices=AXES, more=True),
    Setting("outlier_mode", str, "outliers by sign or by magnitude", choices=OUTLIER_MODES,
            more=True),
    Setting("outlier_axis", str, "outliers per token vector or per channel vector",
            choices=AXES, more=True),
    Setting("lowrank", str, "low-rank method", choices=LOWRANK_METHODS, more=True),
    Setting("seed", int, "seed of power iteration and rotation", more=True),
    Setting("fp8", str, "fp8 format instead of integer bits", choices=FP8_FORMATS, optional=True,
            none_means="no fp8", more=True),
    Setting("fp8_scale", str, "fp8 scale per group or per [seq, head_dim] matrix",
            choices=FP8_SCALES, more=True),
    Setting("qjl", bool, "1-bit QJL sketch of the residual, taking one of bits", more=True),
    Setting("factor_dtype", str, "storage dtype of the kept low-rank factors",
            choices=FACTOR_DTYPES, more=True),
)  # fmt: skip

#: the :class:`CompressionConfig` fields a user sets besides ``keys`` / ``values`` (``preset`` is
#: chosen by name, ``name`` is a label)
CONFIG_SETTINGS: tuple[Setting, ...] = (
    Setting("block_size", int, "compress blocks of this many tokens; a trailing partial block "
            "stays full precision", optional=True, none_means="whole sequence",
            steps=(16, 32, 64, 128, 256)),
    Setting("prefill_rank", int, "rank a cache uses for the prompt", optional=True,
            none_means="same as rank", steps=(0, 1, 2, 4, 8, 16, 32), more=True),
    Setting("sinks", int, "first tokens kept in full precision (attention sinks)",
            steps=(0, 1, 4, 16, 64)),
)  # fmt: skip


def format_value(value: Any) -> str:
    """A setting's value as the CLI and grids spell it: ``none``, ``true``, ``0.02``, ``64``."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)
