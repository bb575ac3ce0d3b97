"""Cache specs: one name for every cache a fidelity check or benchmark can run, and its size.

A *cache spec* is a :class:`gear_lab.compression.CompressionConfig`, a preset name (``"gear"``,
``"kivi"``, ... -> :class:`gear_lab.cache.GearCache`), a per-layer
:class:`gear_lab.allocation.LayerAllocation` (a ``GearCache`` with one config per layer, storing
K/V in the dtype the allocation was measured in), ``"dynamic"`` (transformers'
full-precision ``DynamicCache``) or ``"quantized:<backend>:<bits>[:<group_size>]"`` (transformers'
``QuantizedCache`` with the ``quanto`` or ``hqq`` backend, a KIVI-like baseline; needs the
``baselines`` extra), or a factory ``model -> Cache`` (named by its ``label`` or ``__name__``).
:func:`make_cache` builds one, :func:`method_label` names it, :func:`cache_nbytes` measures what
it holds and :func:`cache_resident_nbytes` what it keeps allocated.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from gear_lab.allocation import LayerAllocation
from gear_lab.cache import GearCache
from gear_lab.compression import CompressionConfig, get_preset, list_presets
from gear_lab.errors import CacheError, ConfigError, first_line
from gear_lab.rope import ModelRope

CacheSpec = CompressionConfig | LayerAllocation | str | Callable[[torch.nn.Module], Cache]

#: backend name -> the module its QuantizedCache needs
_QUANTIZED_BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}
#: full-precision window (tokens) of the QuantizedCache baseline: the same n_b as GearCache
QUANTIZED_RESIDUAL_LENGTH = 64


def method_label(spec: CacheSpec, *, pre_rope: bool = False) -> str:
    """Human-readable name of a cache spec (a factory's ``label`` or ``__name__``), with
    ``+ pre-RoPE keys`` for a cache built with ``pre_rope`` (:func:`make_cache`)."""
    if pre_rope:
        return f"{method_label(spec)} + pre-RoPE keys"
    if isinstance(spec, CompressionConfig):
        return spec.name
    if isinstance(spec, LayerAllocation):
        return spec.label
    if callable(spec):
        return str(getattr(spec, "label", None) or getattr(spec, "__name__", repr(spec)))
    return str(spec)


def make_cache(spec: CacheSpec, model: torch.nn.Module, *, pre_rope: bool = False) -> Cache:
    """A fresh, empty cache for ``model`` described by ``spec`` (see the module docstring).

    ``pre_rope``: a GearCache spec (a config, preset or allocation) quantizes keys before RoPE
    with the model's own rotary embedding (:class:`gear_lab.rope.ModelRope`, KVQuant); other
    specs refuse it. Raises :class:`ConfigError` for an unknown spec and :class:`CacheError` when a
    baseline's backend is not installed (``pip install 'gear-lab[baselines]'``).
    """
    if isinstance(spec, str) and spec in list_presets():
        spec = get_preset(spec)
    if pre_rope and not isinstance(spec, CompressionConfig | LayerAllocation):
        raise ConfigError(
            f"pre_rope applies to GearCache specs (a config, preset or allocation), not "
            f"{method_label(spec)}"
        )
    rope = ModelRope(model) if pre_rope else None
    if isinstance(spec, CompressionConfig):
        return GearCache(spec, model_config=model.config, pre_rope=rope)
    if isinstance(spec, LayerAllocation):
        return GearCache(
            spec.configs, model_config=model.config, storage_dtype=spec.storage_dtype, pre_rope=rope
        )
    if callable(spec):
        cache = spec(model)
        if not isinstance(cache, Cache):
            raise ConfigError(f"cache factory {method_label(spec)} returned {type(cache).__name__}")
        return cache
    if not isinstance(spec, str):
        raise ConfigError(
            f"a cache spec is a CompressionConfig, a LayerAllocation or a string, got {spec!r}"
        )
    if spec == "dynamic":
        return DynamicCache(config=model.config)
    if spec.startswith("quantized:"):
        return _quantized_cache(spec, model)
    raise ConfigError(
        f"unknown cache spec {spec!r}: a preset ({', '.join(list_presets())}), 'dynamic' or "
        "'quantized:<quanto|hqq>:<bits>[:<group_size>]'"
    )


def parse_quantized_spec(spec: str) -> tuple[str, int, int]:
    """``"quantized:<backend>:<bits>[:<group_size>]"`` -> ``(backend, bits, group_size)``
    (group size 64 by default); a malformed spec raises :class:`ConfigError`."""
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] != "quantized" or parts[1] not in _QUANTIZED_BACKENDS:
        raise ConfigError(
            f"bad baseline spec {spec!r}: use quantized:<quanto|hqq>:<bits>[:<group_size>]"
        )
    try:
        bits, group = int(parts[2]), int(parts[3]) if len(parts) == 4 else 64
    except ValueError:
        raise ConfigError(f"bad baseline spec {spec!r}: bits and group size are integers") from None
    if not 1 <= bits <= 8 or group < 1:
        raise ConfigError(f"bad baseline spec {spec!r}: bits in 1..8, group size >= 1")
    return parts[1], bits, group


def _quantized_cache(spec: str, model: torch.nn.Module) -> Cache:
    backend, bits, group = parse_quantized_spec(spec)
    if importlib.util.find_spec(_QUANTIZED_BACKENDS[backend].split(".")[0]) is None:
        raise CacheError(
            f"the {backend} backend is not installed: pip install 'gear-lab[baselines]'"
        )
    try:
        return QuantizedCache(
            backend=backend,
            config=model.config,
            nbits=bits,
            q_group_size=group,
            residual_length=QUANTIZED_RESIDUAL_LENGTH,
        )
    except (ValueError, ImportError) as err:
        raise CacheError(f"QuantizedCache({spec}) unavailable: {first_line(err)}") from err


def _tensor_nbytes(obj: Any) -> int:
    """Bytes of every tensor reachable in ``obj`` (tensors, tensor subclasses, containers)."""
    if isinstance(obj, Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_nbytes(getattr(obj, name)) for name in names)
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(_tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_nbytes(v) for v in obj)
    return 0


def cache_nbytes(cache: Cache) -> int:
    """Bytes a cache *holds* (its K/V), measured: ``GearCache.nbytes()`` (compressed blocks plus
    full-precision buffers; no workspace, transient or index), else every layer's tensors
    (full-precision states plus, for ``QuantizedCache``, its quantized states)."""
    if isinstance(cache, GearCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_nbytes(getattr(layer, name, None))
    return total


def cache_resident_nbytes(cache: Cache) -> int:
    """Bytes a cache keeps *allocated*: ``GearCache.resident_nbytes()`` (adds any workspace, the
    shared transient and the block index to :func:`cache_nbytes`), else :func:`cache_nbytes`."""
    if isinstance(cache, GearCache):
        return cache.resident_nbytes()
    return cache_nbytes(cache)
