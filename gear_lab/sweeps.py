"""Sweeps: compress every (sample, layer, head, kind) of a dump with every config of a grid and
return one tidy :class:`pandas.DataFrame` of measured sizes and errors.

Work is shared where results allow: configs of one kind that differ only in ``rank`` share one
compression through :func:`gear_lab.compression.compress_ranks` (one SVD per matrix for every rank,
the GEAR error-vs-rank study of Kang et al. 2024), and the exact attention of each
(sample, layer) is computed once (:func:`gear_lab.metrics.attention_reference`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from gear_lab import metrics
from gear_lab.capture import parse_layers
from gear_lab.compression import (
    Compressed,
    CompressionConfig,
    TensorCompression,
    compress_ranks,
    get_preset,
)
from gear_lab.dump import Dump, open_dump
from gear_lab.errors import ConfigError

__all__ = [
    "ATTENTION_COLUMNS",
    "RECONSTRUCTION_COLUMNS",
    "SWEEP_KINDS",
    "expand_grid",
    "parse_grid",
    "sweep",
]

# kinds a sweep can compress; attention metrics need post-RoPE keys, so keys_pre_rope gets NaN
SWEEP_KINDS = ("keys", "values", "keys_pre_rope")
RECONSTRUCTION_COLUMNS = ("rel_fro", "max_abs", "cosine", "snr_db")
ATTENTION_COLUMNS = ("score_rel", "kl", "tv", "output_rel")


def expand_grid(grid: Mapping[str, Any]) -> list[CompressionConfig]:
    """The Cartesian product of a grid of preset overrides, one config per combination.

    ``grid`` maps ``"method"`` to preset names (default ``["gear"]``) and any other key to the
    values of a :func:`gear_lab.compression.get_preset` override (``bits``, ``group_size``, ``rank``,
    ``outliers``, ``key_bits``, ``block_size``, ...); a scalar counts as a one-value list.
    Example: ``{"method": ["gear"], "bits": [2, 4], "rank": [0, 2]}`` -> four configs named
    ``gear[bits=2,rank=0]`` ... ``gear[bits=4,rank=2]``.
    """
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("a grid must be a non-empty mapping of setting -> list of values")

    def values(key: str, value: Any) -> list[Any]:
        seq = list(value) if isinstance(value, list | tuple) else [value]
        if not seq:
            raise ConfigError(f"grid setting {key!r} has no values")
        return seq

    methods = values("method", grid.get("method", ["gear"]))
    keys = [k for k in grid if k != "method"]
    choices = [values(k, grid[k]) for k in keys]
    return [
        get_preset(method, **dict(zip(keys, combo, strict=True)))
        for method in methods
        for combo in itertools.product(*choices)
    ]


def _grid_value(text: str) -> Any:
    """``none`` / ``true`` / ``false`` / an int / a float, else the word itself."""
    lowered = text.lower()
    if lowered in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_grid(text: str) -> dict[str, list[Any]]:
    """Parse the grid grammar ``NAME=V1,V2,...;NAME=...`` into a mapping for :func:`expand_grid`.

    NAME is ``method`` or a :func:`gear_lab.compression.get_preset` override (``-`` may stand for
    ``_``: ``group-size``); ``method`` takes preset names, every other value is an integer, a
    float, ``none``, ``true``/``false`` or a word (an axis, ``svd``, ...). Example: ``"method=gear,gear-l;bits=2,4;rank=0,2,4"``.
    """
    grid: dict[str, list[Any]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, values = entry.partition("=")
        name = name.strip().replace("-", "_")
        items = [v.strip() for v in values.split(",")]
        if not sep or not name or not all(items):
            raise ConfigError(f"bad grid entry {entry!r}: expected NAME=V1,V2,...")
        if name in grid:
            raise ConfigError(f"bad grid: {name!r} appears twice")
        grid[name] = items if name == "method" else [_grid_value(v) for v in items]
    if not grid:
        raise ConfigError(f"bad grid {text!r}: expected NAME=V1,V2,...;NAME=...")
    return grid


def _configs(grid: Sequence[CompressionConfig] | Mapping[str, Any]) -> list[CompressionConfig]:
    if isinstance(grid, Mapping):
        return expand_grid(grid)
    configs = list(grid)
    if not configs:
        raise ConfigError("the grid holds no config")
    for config in configs:
        if not isinstance(config, CompressionConfig):
            raise ConfigError(
                f"grid entries must be CompressionConfig, got {type(config).__name__}"
            )
    return configs


def _compress_all(
    x: torch.Tensor, configs: Sequence[CompressionConfig], kind: str
) -> list[tuple[int, Compressed]]:
    """``(config index, Compressed of x)`` for every config, in config order.

    Configs whose ``kind`` settings and ``block_size`` differ only in ``rank`` are served by one
    ``compress_ranks`` call (shared outliers and quantization, one SVD of the residual).
    """
    groups: dict[tuple[int | None, TensorCompression], list[int]] = {}
    for i, config in enumerate(configs):
        base = dataclasses.replace(config.for_kind(kind), rank=0)
        groups.setdefault((config.block_size, base), []).append(i)
    out: list[tuple[int, Compressed]] = []
    for members in groups.values():
        ranks = [configs[i].for_kind(kind).rank for i in members]
        distinct = sorted(set(ranks))
        packed = dict(
            zip(distinct, compress_ranks(x, configs[members[0]], distinct, kind), strict=True)
        )
        out.extend((i, packed[r]) for i, r in zip(members, ranks, strict=True))
    return sorted(out, key=lambda item: item[0])


def _settings(config: CompressionConfig, kind: str) -> dict[str, Any]:
    """The method-parameter columns of one row."""
    return {
        "preset": config.name.split("[", 1)[0],
        **dataclasses.asdict(config.for_kind(kind)),
        "block_size": config.block_size,
        "prefill_rank": config.prefill_rank,
    }


def _pick(name: str, wanted: Sequence[int] | None, available: Sequence[int]) -> list[int]:
    if wanted is None:
        return list(available)
    picked = [int(i) for i in wanted]
    bad = sorted(set(picked) - set(available))
    if bad or not picked:
        raise ConfigError(f"{name} {bad or picked} not in the dump (has {list(available)})")
    return picked


def _reference(
    dump: Dump, layer: int, sample: int, device: str, dtype: torch.dtype | None
) -> metrics.AttentionReference:
    """Exact attention of one (sample, layer) from the dump's queries, keys and values."""
    info = dump.layer_info(layer)
    load = dict(layer=layer, sample=sample, device=device)
    return metrics.attention_reference(
        dump.load("queries", **load)[None],
        dump.load("keys", dtype=dtype, **load)[None],
        dump.load("values", dtype=dtype, **load)[None],
        scaling=info.get("scaling"),
        sliding_window=info.get("sliding_window"),
        softcap=info.get("softcap"),
    )


def sweep(
    dump: Dump | str,
    grid: Sequence[CompressionConfig] | Mapping[str, Any],
    layers: str | Sequence[int] | None = None,
    kinds: Sequence[str] = ("keys", "values"),
    samples: Sequence[int] = (0,),
    heads: Sequence[int] | None = None,
    attention: bool = True,
    progress: bool = True,
    per_head: bool = True,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """Compress a dump's tensors with every config of ``grid`` and measure each result.

    ``dump``: an open :class:`Dump` or a path. ``grid``: configs, or a mapping for
    :func:`expand_grid`. ``layers``: ``None`` (all in the dump), a spec like ``"0,5,10-12"`` or
    indices. ``heads``: KV-head indices (``None``: all). With ``per_head`` each KV head
    (``[1, 1, seq, head_dim]``) is compressed and measured alone; without it the whole layer
    (``[1, kv_heads, seq, head_dim]``) is, and ``head`` is -1. ``dtype``: the dtype K/V are
    compressed in (e.g. ``torch.float16``, as a real cache holds them; ``None``: as stored), which
    also fixes the dtype of kept full-precision parts such as outlier values.

    One row per sample x layer x head x kind x config, columns: ``sample, layer, head, kind,
    config, config_index, preset``, every :class:`TensorCompression` field of that kind,
    ``block_size, prefill_rank``, the measured ``nbytes, numel, bits_per_entry``, the
    reconstruction metrics ``rel_fro, max_abs, cosine, snr_db`` and the attention metrics
    ``score_rel, kl, tv, output_rel`` (keys rows compress keys only and use exact values, values
    rows the reverse; NaN when ``attention`` is off, the dump has no queries, or for
    ``keys_pre_rope``).
    """
    options = dict(
        layers=layers,
        kinds=kinds,
        samples=samples,
        heads=heads,
        attention=attention,
        progress=progress,
        per_head=per_head,
        device=device,
        dtype=dtype,
    )
    if isinstance(dump, Dump):
        return _sweep(dump, grid, **options)
    with open_dump(dump) as opened:
        return _sweep(opened, grid, **options)


def _sweep(
    dump: Dump,
    grid: Sequence[CompressionConfig] | Mapping[str, Any],
    layers: str | Sequence[int] | None,
    kinds: Sequence[str],
    samples: Sequence[int],
    heads: Sequence[int] | None,
    attention: bool,
    progress: bool,
    per_head: bool,
    device: str,
    dtype: torch.dtype | None,
) -> pd.DataFrame:
    configs = _configs(grid)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind not in SWEEP_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(SWEEP_KINDS)}, got {kind!r}")
        if kind not in dump.kinds:
            raise ConfigError(f"the dump holds no {kind!r} (it has {', '.join(dump.kinds)})")
    if not kinds:
        raise ConfigError("kinds selects nothing")
    if isinstance(layers, str):
        layers = parse_layers(layers, max(dump.layers) + 1)
    layer_list = _pick("layers", layers, dump.layers)
    sample_list = _pick("samples", samples, range(dump.num_samples))
    head_list = _pick("heads", heads, range(dump.num_kv_heads)) if per_head else [-1]
    with_attention = attention and "queries" in dump.kinds
    nan_attention = dict.fromkeys(ATTENTION_COLUMNS, math.nan)

    rows: list[dict[str, Any]] = []
    units = list(itertools.product(sample_list, layer_list))
    bar = tqdm(units, desc="sweep", unit="layer", disable=not progress)
    for sample, layer in bar:
        bar.set_postfix(sample=sample, layer=layer)
        ref = _reference(dump, layer, sample, device, dtype) if with_attention else None
        for kind in kinds:
            x = dump.load(kind, layer, sample=sample, device=device, dtype=dtype)[None]
            for head in head_list:
                part = x if head < 0 else x[:, head : head + 1]
                sel = None if head < 0 else slice(head, head + 1)
                for i, packed in _compress_all(part, configs, kind):
                    x_hat = packed.decompress()
                    if ref is None or kind == "keys_pre_rope":
                        att = nan_attention
                    elif kind == "keys":
                        att = ref.error(k_hat=x_hat, kv_heads=sel)
                    else:
                        att = ref.error(v_hat=x_hat, kv_heads=sel)
                    rows.append(
                        {
                            "sample": sample,
                            "layer": layer,
                            "head": head,
                            "kind": kind,
                            "config": configs[i].name,
                            "config_index": i,
                            **_settings(configs[i], kind),
                            "nbytes": packed.nbytes,
                            "numel": packed.numel,
                            "bits_per_entry": packed.bits_per_entry,
                            **metrics.reconstruction(part, x_hat),
                            **att,
                        }
                    )
    return pd.DataFrame(rows)
