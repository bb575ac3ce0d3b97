"""Live fidelity checks: what a model generates and predicts when its KV cache is compressed.

- :func:`check_generation`: greedy generation with a full-precision cache and with a compressed
  one (texts, token agreement, first divergence), plus, teacher-forced along the full-precision
  continuation (so that drift does not confound it), the per-step KL divergence
  ``KL(full || compressed)`` and top-1 agreement of the next-token distributions, cache bytes
  and tokens per second of both.
- :func:`perplexity_check`: the protocol of the reference table of ``gear-notes.md``: consecutive
  windows of CPython's pydoc topics text; prefill ``prefill`` tokens, compress the whole prefill cache, then
  teacher-force the next ``continuation`` tokens through the compressed cache in one forward and
  score their ``continuation`` next-token predictions against a full-precision forward.

A compressed cache is named by a *cache spec*: a :class:`gear_lab.compression.CompressionConfig`,
a preset name (``"gear"``, ``"kivi"``, ... -> :class:`gear_lab.cache.GearCache`), ``"dynamic"``
(transformers' full-precision ``DynamicCache``) or ``"quantized:<backend>:<bits>[:<group_size>]"``
(transformers' ``QuantizedCache`` with the ``quanto`` or ``hqq`` backend, a KIVI-like baseline;
needs the ``baselines`` extra), or a factory ``model -> Cache`` (named by its ``label`` or
``__name__``). See :func:`make_cache`.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache, QuantizedCache

from gear_lab.cache import GearCache, _layer_windows, cache_kwarg
from gear_lab.compression import CompressionConfig, get_preset, list_presets
from gear_lab.errors import CacheError, ConfigError

CacheSpec = CompressionConfig | str | Callable[[torch.nn.Module], Cache]

#: backend name -> the module its QuantizedCache needs
_QUANTIZED_BACKENDS = {"quanto": "optimum.quanto", "hqq": "hqq"}
#: full-precision window (tokens) of the QuantizedCache baseline: the same n_b as GearCache
QUANTIZED_RESIDUAL_LENGTH = 64

# --------------------------------------------------------------------------------------------
# metrics on logits (pure functions)
# --------------------------------------------------------------------------------------------


def next_token_kl(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """``KL(softmax(reference) || softmax(logits))`` in nats over the last axis, in float64.

    ``reference_logits`` and ``logits`` are ``[..., vocab]``; the result is ``[...]``.
    """
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def top1_agreement(reference_logits: Tensor, logits: Tensor) -> Tensor:
    """Whether the most likely next token agrees, ``[..., vocab]`` -> bool ``[...]``."""
    return reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def token_agreement(reference: list[int], other: list[int]) -> tuple[float, int | None]:
    """Share of positions where two generations agree (over the longer one), and the first
    position where they differ (``None`` when identical)."""
    length = max(len(reference), len(other))
    if length == 0:
        return 1.0, None
    same = [
        i < len(reference) and i < len(other) and reference[i] == other[i] for i in range(length)
    ]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return sum(same) / length, first


# --------------------------------------------------------------------------------------------
# caches
# --------------------------------------------------------------------------------------------


def method_label(spec: CacheSpec) -> str:
    """Human-readable name of a cache spec (a factory's ``label`` or ``__name__``)."""
    if isinstance(spec, CompressionConfig):
        return spec.name
    if callable(spec):
        return str(getattr(spec, "label", None) or getattr(spec, "__name__", repr(spec)))
    return str(spec)


def make_cache(spec: CacheSpec, model: torch.nn.Module) -> Cache:
    """A fresh, empty cache for ``model`` described by ``spec`` (see the module docstring).

    Raises :class:`ConfigError` for an unknown spec and :class:`CacheError` when a baseline's
    backend is not installed (``pip install 'gear-lab[baselines]'``).
    """
    if isinstance(spec, CompressionConfig):
        return GearCache(spec, model_config=model.config)
    if callable(spec):
        cache = spec(model)
        if not isinstance(cache, Cache):
            raise ConfigError(f"cache factory {method_label(spec)} returned {type(cache).__name__}")
        return cache
    if not isinstance(spec, str):
        raise ConfigError(f"a cache spec is a CompressionConfig or a string, got {spec!r}")
    if spec == "dynamic":
        return DynamicCache(config=model.config)
    if spec.startswith("quantized:"):
        return _quantized_cache(spec, model)
    if spec in list_presets():
        return GearCache(get_preset(spec), model_config=model.config)
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
        raise CacheError(f"QuantizedCache({spec}) unavailable: {str(err).splitlines()[0]}") from err


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
    """Bytes a cache holds, measured: ``GearCache.nbytes()``, else every layer's tensors
    (full-precision states plus, for ``QuantizedCache``, its quantized states)."""
    if isinstance(cache, GearCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values", "_quantized_keys", "_quantized_values"):
            total += _tensor_nbytes(getattr(layer, name, None))
    return total


def _cache_entries(model: torch.nn.Module, tokens: int) -> int:
    """K/V entries a full-precision cache holds for one sequence of ``tokens`` tokens."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_key_value_heads * head_dim
    return sum(
        per_token * (tokens if w is None else min(tokens, w - 1))
        for w in _layer_windows(model.config)
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# generation check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCheck:
    """Result of :func:`check_generation` (``kl`` and ``top1`` are per teacher-forced step)."""

    prompt: str
    method: str
    full_text: str
    compressed_text: str
    full_ids: list[int]
    compressed_ids: list[int]
    token_agreement: float
    first_divergence: int | None
    kl: list[float]
    top1: list[bool]
    full_cache_bytes: int
    compressed_cache_bytes: int
    full_tokens_per_s: float
    compressed_tokens_per_s: float

    @property
    def mean_kl(self) -> float:
        """Mean per-step KL(full || compressed), nats."""
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    @property
    def top1_agreement(self) -> float:
        """Share of teacher-forced steps whose most likely token agrees."""
        return sum(self.top1) / len(self.top1) if self.top1 else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, with the summary properties."""
        return {**asdict(self), "mean_kl": self.mean_kl, "top1_agreement": self.top1_agreement}


def _generate(
    model: torch.nn.Module, ids: Tensor, cache: Cache, max_new_tokens: int
) -> tuple[list[int], float]:
    """Greedy generation into ``cache``: new token ids and tokens per second (end to end)."""
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **{cache_kwarg(model): cache},
    )
    _sync(ids.device)
    elapsed = time.perf_counter() - start
    new = out[0, ids.shape[1] :].tolist()
    return new, len(new) / elapsed if elapsed > 0 else float("inf")


def _teacher_forced_logits(
    model: torch.nn.Module, ids: Tensor, continuation: list[int], cache: Cache
) -> Tensor:
    """Next-token logits ``[len(continuation), vocab]``: from the prompt ``ids`` ``[1, seq]``,
    then after each continuation token fed one at a time (as in decoding) through ``cache``."""
    key = cache_kwarg(model)
    logits = [model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits[0, -1]]
    for token in continuation[:-1]:
        step = torch.tensor([[token]], device=ids.device)
        logits.append(model(input_ids=step, use_cache=True, **{key: cache}).logits[0, -1])
    return torch.stack(logits)


@torch.inference_mode()
def check_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    config: CacheSpec,
    max_new_tokens: int = 32,
) -> GenerationCheck:
    """Greedy generation of ``prompt`` with a full-precision cache and with ``config``'s cache.

    ``config`` is a cache spec (:func:`make_cache`): a ``CompressionConfig``, a preset name or a
    ``quantized:...`` baseline. KL and top-1 are teacher-forced along the full-precision
    continuation; step 0 is the prompt's own prediction (made before anything is compressed).
    """
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("prompt must be a non-empty string")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    full_cache = make_cache("dynamic", model)
    full_ids, full_tps = _generate(model, ids, full_cache, max_new_tokens)
    compressed_cache = make_cache(config, model)
    comp_ids, comp_tps = _generate(model, ids, compressed_cache, max_new_tokens)
    agreement, divergence = token_agreement(full_ids, comp_ids)
    reference = _teacher_forced_logits(model, ids, full_ids, make_cache("dynamic", model))
    forced = _teacher_forced_logits(model, ids, full_ids, make_cache(config, model))
    return GenerationCheck(
        prompt=prompt,
        method=method_label(config),
        full_text=tokenizer.decode(full_ids, skip_special_tokens=True),
        compressed_text=tokenizer.decode(comp_ids, skip_special_tokens=True),
        full_ids=full_ids,
        compressed_ids=comp_ids,
        token_agreement=agreement,
        first_divergence=divergence,
        kl=next_token_kl(reference, forced).tolist(),
        top1=top1_agreement(reference, forced).tolist(),
        full_cache_bytes=cache_nbytes(full_cache),
        compressed_cache_bytes=cache_nbytes(compressed_cache),
        full_tokens_per_s=full_tps,
        compressed_tokens_per_s=comp_tps,
    )


# --------------------------------------------------------------------------------------------
# perplexity check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityCheck:
    """Result of :func:`perplexity_check`; ``kl`` and ``top1_agreement`` are means per token."""

    method: str
    corpus: str
    windows: int
    prefill: int
    continuation: int
    window_starts: list[int]
    perplexity_full: float
    perplexity_compressed: float
    kl: float
    top1_agreement: float
    bits_per_entry: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


@lru_cache(maxsize=4)
def _corpus_ids(tokenizer: Any, corpus: str) -> Tensor:
    if corpus != "pydoc":
        raise ConfigError(f"unknown corpus {corpus!r}; known: pydoc")
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)


def window_starts(total: int, windows: int, span: int) -> list[int]:
    """Start of each of ``windows`` consecutive windows from the corpus start: window ``i``
    feeds tokens ``[i * span, (i + 1) * span)`` and its last target is token ``(i + 1) * span``.
    (Consecutive windows reproduce the notes' full-precision perplexity, 13.15 vs 13.16.)
    Raises :class:`ConfigError` when the corpus is too short."""
    if windows < 1:
        raise ConfigError(f"windows must be >= 1, got {windows}")
    if windows * span + 1 > total:
        raise ConfigError(
            f"{windows} windows of {span} tokens need {windows * span + 1} tokens; "
            f"the corpus has {total}"
        )
    return [i * span for i in range(windows)]


def validate_protocol(windows: int, prefill: int, continuation: int) -> None:
    """Raise :class:`ConfigError` unless all three are positive integers."""
    for name, value in (("windows", windows), ("prefill", prefill), ("continuation", continuation)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _prefill_then_score(
    model: torch.nn.Module, cache: Cache, inputs: Tensor, prefill: int
) -> tuple[Tensor, int]:
    """Feed ``inputs[:, :prefill]`` into ``cache``, then the rest through it in one forward.

    Returns the rest's logits ``[seq - prefill, vocab]`` and the bytes the cache held right
    after the prefill.
    """
    key = cache_kwarg(model)
    model(input_ids=inputs[:, :prefill], use_cache=True, logits_to_keep=1, **{key: cache})
    prefill_bytes = cache_nbytes(cache)
    logits = model(input_ids=inputs[:, prefill:], use_cache=True, **{key: cache}).logits[0]
    return logits, prefill_bytes


@torch.inference_mode()
def perplexity_check(
    model: torch.nn.Module,
    tokenizer: Any,
    config: CacheSpec,
    corpus: str = "pydoc",
    windows: int = 8,
    prefill: int = 512,
    continuation: int = 128,
    progress: bool = True,
) -> PerplexityCheck:
    """Perplexity, KL(full || compressed) and top-1 agreement of a compressed prefill cache.

    Window ``i`` feeds corpus tokens ``[i * span, (i + 1) * span)``, ``span = prefill +
    continuation``, from the corpus start (see :func:`window_starts`).
    Both runs take the same path, so that only the cache differs: the prefill fills a fresh cache
    (a ``DynamicCache`` for full precision; one from ``config`` for the compressed run, compressed
    as it arrives: with ``prefill`` a multiple of the block size nothing stays in full
    precision), then the ``continuation`` tokens go through it in one forward. Both score the same ``continuation`` next-token predictions (those made at
    the continuation positions). ``bits_per_entry`` is the cache's measured size right after
    prefill, in bits per cached K/V entry.
    """
    validate_protocol(windows, prefill, continuation)
    make_cache(config, model)  # validate the spec before the long run
    device = next(model.parameters()).device
    ids = _corpus_ids(tokenizer, corpus)
    length = prefill + continuation + 1
    starts = window_starts(len(ids), windows, prefill + continuation)
    nll_full: list[Tensor] = []
    nll_comp: list[Tensor] = []
    kls: list[Tensor] = []
    agree: list[Tensor] = []
    bits: list[float] = []
    start_time = time.perf_counter()
    for start in tqdm(starts, desc=f"ppl {method_label(config)}", disable=not progress):
        window = ids[start : start + length].to(device)[None]
        inputs, targets = window[:, :-1], window[0, prefill + 1 :]
        full, _ = _prefill_then_score(model, make_cache("dynamic", model), inputs, prefill)
        comp, prefill_bytes = _prefill_then_score(model, make_cache(config, model), inputs, prefill)
        bits.append(8 * prefill_bytes / _cache_entries(model, prefill))
        for logits, out in ((full, nll_full), (comp, nll_comp)):
            out.append(
                torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
            )
        kls.append(next_token_kl(full, comp))
        agree.append(top1_agreement(full, comp))
    return PerplexityCheck(
        method=method_label(config),
        corpus=corpus,
        windows=windows,
        prefill=prefill,
        continuation=continuation,
        window_starts=starts,
        perplexity_full=math.exp(torch.cat(nll_full).mean().item()),
        perplexity_compressed=math.exp(torch.cat(nll_comp).mean().item()),
        kl=torch.cat(kls).mean().item(),
        top1_agreement=torch.cat(agree).float().mean().item(),
        bits_per_entry=sum(bits) / len(bits),
        seconds=time.perf_counter() - start_time,
    )
