"""The registry of named presets: GEAR (Kang et al. 2024) and its neighbours KIVI, KCVT,
TurboQuant, KVQuant-style non-uniform quantization, FP8.

:func:`get_preset` gives a preset with overrides applied, :func:`with_overrides` applies
overrides to any config, and :func:`config_label` is the one display label of a config: its
preset followed by the settings that differ from it, e.g. ``gear (bits=2, key_rank=1)``.
The settings themselves live in :mod:`gear_lab.compression.config`.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from gear_lab.compression.config import (
    CONFIG_SETTINGS,
    TENSOR_SETTINGS,
    CompressionConfig,
    TensorCompression,
    format_value,
)
from gear_lab.errors import ConfigError


def _kv(**common: Any) -> tuple[TensorCompression, TensorCompression]:
    """Keys per channel, values per token (the KIVI convention) with shared settings."""
    return TensorCompression(axis="channel", **common), TensorCompression(axis="token", **common)


# GEAR's defaults: 4 bits, G = 64, s = 2 %, r = 4 (Kang et al. 2024, section 4).
_GEAR = {"bits": 4, "group_size": 64, "outliers": 0.02, "rank": 4}
# TurboQuant (Zandieh et al. 2025): per token, rotation, Lloyd-Max levels of a unit vector's
# coordinate; keys give one of their bits to a QJL sketch (inner products), values do not.
_TURBO = {"bits": 4, "axis": "token", "group_size": None, "rotate": True, "codebook": "sphere"}

# name -> (one-line description, settings)
_REGISTRY: dict[str, tuple[str, CompressionConfig]] = {
    "gear": (
        "GEAR: quantization + outliers + low-rank residual",
        CompressionConfig(*_kv(**_GEAR)),
    ),
    "gear-l": (
        "GEAR without outliers",
        CompressionConfig(*_kv(**{**_GEAR, "outliers": 0.0})),
    ),
    "gear-kcvt": (
        "GEAR on KCVT's whole-axis quantization",
        CompressionConfig(*_kv(**{**_GEAR, "group_size": None})),
    ),
    "kcvt": (
        "KCVT: quantization grouped over the whole axis",
        CompressionConfig(*_kv(bits=4, group_size=None)),
    ),
    # KIVI (Liu et al. 2024): 2-bit, G = 32, recent tokens kept in full precision (n_b = 64 here).
    "kivi": (
        "KIVI: 2-bit grouped quantization, newest block kept full precision",
        CompressionConfig(*_kv(bits=2, group_size=32), block_size=64),
    ),
    "outlier-quant": (
        "quantization + outliers (GEAR without low rank)",
        CompressionConfig(*_kv(**{**_GEAR, "rank": 0})),
    ),
    "quant": ("plain grouped quantization", CompressionConfig(*_kv(bits=4, group_size=64))),
    "turboquant": (
        "TurboQuant: rotation + Lloyd-Max per token, keys with a 1-bit QJL residual sketch",
        CompressionConfig(TensorCompression(**_TURBO, qjl=True), TensorCompression(**_TURBO)),
    ),
    # KVQuant's non-uniform datatype (Hooper et al. 2024), fitted per head on the tensor itself
    "nuq": (
        "non-uniform quantization: a k-means codebook per head, keys per channel",
        CompressionConfig(*_kv(bits=4, group_size=None, codebook="fitted-head")),
    ),
    "fp8": (
        "fp8 round trip with a scale per group",
        CompressionConfig(*_kv(bits=None, fp8="e4m3", group_size=64)),
    ),
    "none": (
        "no compression (full precision)",
        CompressionConfig(*_kv(bits=None, group_size=None)),
    ),
}
_PRESETS = {
    name: replace(config, name=name, preset=name) for name, (_, config) in _REGISTRY.items()
}

_TENSOR_FIELDS = tuple(f.name for f in fields(TensorCompression))
_CONFIG_FIELDS = ("block_size", "prefill_rank", "sinks", "name")


def list_presets() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return list(_PRESETS)


def preset_descriptions() -> dict[str, str]:
    """Preset name -> one line: what it is and its settings, e.g. ``kivi`` -> ``KIVI: ...
    (bits=2, group_size=32, block_size=64)`` (settings listed as they differ from ``none``)."""
    lines = {}
    for name, (description, config) in _REGISTRY.items():
        changes = _changes(config, _PRESETS["none"])
        lines[name] = f"{description} ({', '.join(changes)})" if changes else description
    return lines


def _changes(config: CompressionConfig, base: CompressionConfig) -> list[str]:
    """``setting=value`` for every setting of ``config`` that differs from ``base``, spelled as
    :func:`with_overrides` takes it (``bits=2``; ``key_rank=1`` when keys and values differ)."""
    out = []
    for s in TENSOR_SETTINGS:
        pair = (getattr(config.keys, s.name), getattr(config.values, s.name))
        was = (getattr(base.keys, s.name), getattr(base.values, s.name))
        if pair == was:
            continue
        if pair[0] == pair[1]:
            out.append(f"{s.name}={format_value(pair[0])}")
            continue
        for prefix, value, old in zip(("key_", "value_"), pair, was, strict=True):
            if value != old:
                out.append(f"{prefix}{s.name}={format_value(value)}")
    for s in CONFIG_SETTINGS:
        value = getattr(config, s.name)
        if value != getattr(base, s.name):
            out.append(f"{s.name}={format_value(value)}")
    return out


def config_label(config: CompressionConfig) -> str:
    """The display label of a preset's config: the preset, then what differs from it, e.g.
    ``gear (bits=2, rank=2)``; a config built by hand (no known preset) is labelled by its name."""
    if config.preset not in _PRESETS:
        return config.name
    changes = _changes(config, _PRESETS[config.preset])
    return f"{config.preset} ({', '.join(changes)})" if changes else config.preset


def with_overrides(config: CompressionConfig, /, **overrides: Any) -> CompressionConfig:
    """``config`` with ``overrides`` applied.

    An override is a :class:`TensorCompression` field (``bits``, ``group_size``, ``rank``,
    ``outliers``, ``loops``, ``rotate``, ``lowrank``, ``seed``, ``fp8``, ``factor_dtype``, ...)
    applied to keys and values, its ``key_*`` / ``value_*`` variant applied to one of them (after
    the shared ones), or ``block_size`` / ``prefill_rank`` / ``sinks`` / ``name``. Values are taken literally
    (``group_size=None`` means the whole axis). The name follows the new settings
    (:func:`config_label`) unless ``name`` is given or the config's name was chosen by hand.
    """
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
    new = replace(
        config,
        keys=replace(config.keys, **{**shared, **per_kind["keys"]}),
        values=replace(config.values, **{**shared, **per_kind["values"]}),
        **top,
    )
    if "name" not in top and config.name == config_label(config):
        new = replace(new, name=config_label(new))
    return new


def get_preset(name: str, /, **overrides: Any) -> CompressionConfig:
    """The preset ``name`` (its ``preset`` field set) with :func:`with_overrides` ``overrides``
    applied; named by :func:`config_label` unless ``name`` is among the overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(_PRESETS)}")
    return with_overrides(_PRESETS[name], **overrides)
