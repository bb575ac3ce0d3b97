"""Live fidelity checks: what a model generates and predicts when its KV cache is compressed.

- :func:`check_generation`: greedy generation with a full-precision cache and with a compressed
  one (texts, token agreement, first divergence), plus, teacher-forced along the full-precision
  continuation (so that drift does not confound it), the per-step KL divergence
  ``KL(full || compressed)`` and top-1 agreement of the next-token distributions, cache bytes
  and tokens per second of both.
- :func:`perplexity_check`: the protocol of the reference table of ``gear-notes.md``: consecutive
  windows of a built-in corpus (:mod:`gear_lab.corpus`, CPython's pydoc topics); prefill
  ``prefill`` tokens, compress the whole prefill cache, then teacher-force the next
  ``continuation`` tokens through the compressed cache in one forward and score their
  ``continuation`` next-token predictions against a full-precision forward.
- :func:`layer_sensitivity`: that protocol's KL with one layer compressed at a time.

The compressed cache is named by a *cache spec* (:mod:`gear_lab.cache_specs`): a
``CompressionConfig``, a preset name, ``"dynamic"``, a ``"quantized:..."`` baseline or a factory.
Logit metrics live in :mod:`gear_lab.metrics`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, QuantizedCache
from transformers.generation.streamers import BaseStreamer

from gear_lab.architecture import model_arch
from gear_lab.cache import DEFAULT_BLOCK_SIZE, GearCache, cache_kwarg
from gear_lab.cache_specs import (
    CacheSpec,
    cache_nbytes,
    cache_resident_nbytes,
    make_cache,
    method_label,
)
from gear_lab.compression import CompressionConfig, get_preset
from gear_lab.corpus import corpus_ids
from gear_lab.errors import ConfigError, NothingCompressedWarning
from gear_lab.metrics import (
    delta_perplexity,
    kl_quantiles,
    next_token_kl,
    token_agreement,
    top1_agreement,
)
from gear_lab.models import check_context


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# generation check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationCheck:
    """Result of :func:`check_generation` (``kl`` and ``top1`` are per teacher-forced step).

    ``*_cache_bytes``: what each cache holds (:func:`~gear_lab.cache_specs.cache_nbytes`: K/V,
    compressed blocks plus buffers); ``*_resident_bytes``: what it keeps allocated
    (:func:`~gear_lab.cache_specs.cache_resident_nbytes`: plus any workspace and the transient).
    """

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
    full_resident_bytes: int = 0
    compressed_resident_bytes: int = 0

    @property
    def mean_kl(self) -> float:
        """Mean per-step KL(full || compressed), nats."""
        return sum(self.kl) / len(self.kl) if self.kl else 0.0

    @property
    def top1_agreement(self) -> float:
        """Share of teacher-forced steps whose most likely token agrees."""
        return sum(self.top1) / len(self.top1) if self.top1 else 1.0

    def kl_statistics(self) -> dict[str, float]:
        """Mean, median, 99th and 99.9th percentile of the per-step KL (empty: no steps)."""
        return kl_quantiles(torch.tensor(self.kl, dtype=torch.float64)) if self.kl else {}

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict, with the summary properties."""
        return {
            **asdict(self),
            "mean_kl": self.mean_kl,
            "top1_agreement": self.top1_agreement,
            **self.kl_statistics(),
        }


#: ``progress(done, total, phase)``: forward steps done of ``total``; ``phase`` names the pass
ProgressFn = Callable[[int, int, str], None]


class _StepStreamer(BaseStreamer):
    """A ``generate`` streamer that reports each new token (the first ``put`` is the prompt)."""

    def __init__(self, on_token: Callable[[], None]) -> None:
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if self.prompt_seen:
            self.on_token()
        self.prompt_seen = True

    def end(self) -> None:
        pass


class _Progress:
    """Counts forward steps across a check's passes; feeds a tqdm bar or a callback."""

    def __init__(self, progress: bool | ProgressFn, total: int, desc: str) -> None:
        self.done, self.total, self.phase = 0, total, ""
        self.callback = progress if callable(progress) else None
        self.bar = tqdm(total=total, desc=desc, unit="tok", disable=progress is not True)

    def start(self, phase: str, total: int | None = None) -> None:
        self.phase = phase
        if total is not None:
            self.total = self.bar.total = total
        self.bar.set_postfix_str(phase, refresh=False)
        self._report()

    def step(self) -> None:
        self.done += 1
        self.bar.update(1)
        self._report()

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.done, self.total, self.phase)

    def close(self) -> None:
        self.bar.close()


def _generate(
    model: torch.nn.Module, ids: Tensor, cache: Cache, max_new_tokens: int, progress: _Progress
) -> tuple[list[int], float, Tensor]:
    """Greedy generation into ``cache``: new token ids, tokens per second (end to end) and the
    raw next-token logits of every step ``[new tokens, vocab]``."""
    _sync(ids.device)
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        streamer=_StepStreamer(progress.step),
        **{cache_kwarg(model): cache},
    )
    _sync(ids.device)
    elapsed = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1] :].tolist()
    logits = torch.stack([step[0] for step in out.logits])
    return new, len(new) / elapsed if elapsed > 0 else float("inf"), logits


def _teacher_forced_logits(
    model: torch.nn.Module,
    ids: Tensor,
    continuation: list[int],
    cache: Cache,
    progress: _Progress,
) -> Tensor:
    """Next-token logits ``[len(continuation), vocab]``: from the prompt ``ids`` ``[1, seq]``,
    then after each continuation token fed one at a time (as in decoding) through ``cache``."""
    key = cache_kwarg(model)
    logits = [model(input_ids=ids, use_cache=True, logits_to_keep=1, **{key: cache}).logits[0, -1]]
    progress.step()
    for token in continuation[:-1]:
        step = torch.tensor([[token]], device=ids.device)
        logits.append(model(input_ids=step, use_cache=True, **{key: cache}).logits[0, -1])
        progress.step()
    return torch.stack(logits)


def _compresses(cache: Cache) -> bool:
    """Whether ``cache`` is meant to compress (not a full-precision cache, not method "none")."""
    if isinstance(cache, GearCache):
        return any(not (c.keys.is_identity and c.values.is_identity) for c in cache.configs)
    return isinstance(cache, QuantizedCache)


def warn_if_nothing_compressed(cache: Cache, held: int, full: int, what: str) -> None:
    """Warn (:class:`NothingCompressedWarning`) when a cache meant to compress held ``held`` >=
    ``full`` bytes: everything it saw fit in its full-precision window of newest tokens."""
    if held < full or not _compresses(cache):
        return
    window = (
        f"block_size = {max(c.block_size or DEFAULT_BLOCK_SIZE for c in cache.configs)}"
        if isinstance(cache, GearCache)
        else "residual_length"
    )
    warnings.warn(
        f"nothing was compressed in {what}: the cache held {held} bytes, as many as full "
        f"precision ({full}), because it keeps its newest {window} tokens in full precision; "
        "use a longer prompt or a smaller block_size",
        NothingCompressedWarning,
        stacklevel=3,
    )


@torch.inference_mode()
def check_generation(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    config: CacheSpec,
    max_new_tokens: int = 32,
    progress: bool | ProgressFn = True,
    pre_rope: bool = False,
) -> GenerationCheck:
    """Greedy generation of ``prompt`` with a full-precision cache and with ``config``'s cache.

    ``config`` is a cache spec (:func:`make_cache`): a ``CompressionConfig``, a preset name or a
    ``quantized:...`` baseline. KL and top-1 are teacher-forced along the full-precision
    continuation; step 0 is the prompt's own prediction (made before anything is compressed).
    The full-precision generation's own step logits are the reference; the compressed cache is
    teacher-forced in a third pass only when its generation diverged (before that, its own
    logits are the teacher-forced ones). ``progress``: a tqdm bar of forward steps (``True``),
    none (``False``) or a callback ``progress(done, total, phase)``. ``pre_rope``: the
    compressed cache quantizes keys before RoPE (:func:`make_cache`, KVQuant).

    Warns with :class:`gear_lab.errors.NothingCompressedWarning` when the compressed cache held
    as many bytes as full precision (a prompt plus generation shorter than one cache block).
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
    check_context(model, ids.shape[1] + max_new_tokens, "the prompt plus max_new_tokens")
    compressed_cache = make_cache(config, model, pre_rope=pre_rope)  # a bad spec fails now
    label = method_label(config, pre_rope=pre_rope)
    steps = _Progress(progress, 3 * max_new_tokens, f"check {label}")
    try:
        steps.start("full precision")
        full_cache = make_cache("dynamic", model)
        full_ids, full_tps, reference = _generate(model, ids, full_cache, max_new_tokens, steps)
        steps.start("compressed", steps.done + max_new_tokens + len(full_ids))
        comp_ids, comp_tps, comp_logits = _generate(
            model, ids, compressed_cache, max_new_tokens, steps
        )
        agreement, divergence = token_agreement(full_ids, comp_ids)
        if divergence is None:
            forced = comp_logits
        else:
            steps.start("teacher-forced", steps.done + len(full_ids))
            forced_cache = make_cache(config, model, pre_rope=pre_rope)
            forced = _teacher_forced_logits(model, ids, full_ids, forced_cache, steps)
        steps.start("done", steps.done)
    finally:
        steps.close()
    full_bytes, comp_bytes = cache_nbytes(full_cache), cache_nbytes(compressed_cache)
    warn_if_nothing_compressed(compressed_cache, comp_bytes, full_bytes, "check_generation")
    return GenerationCheck(
        prompt=prompt,
        method=label,
        full_text=tokenizer.decode(full_ids, skip_special_tokens=True),
        compressed_text=tokenizer.decode(comp_ids, skip_special_tokens=True),
        full_ids=full_ids,
        compressed_ids=comp_ids,
        token_agreement=agreement,
        first_divergence=divergence,
        kl=next_token_kl(reference, forced).tolist(),
        top1=top1_agreement(reference, forced).tolist(),
        full_cache_bytes=full_bytes,
        compressed_cache_bytes=comp_bytes,
        full_tokens_per_s=full_tps,
        compressed_tokens_per_s=comp_tps,
        full_resident_bytes=cache_resident_nbytes(full_cache),
        compressed_resident_bytes=cache_resident_nbytes(compressed_cache),
    )


# --------------------------------------------------------------------------------------------
# perplexity check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerplexityCheck:
    """Result of :func:`perplexity_check`; ``kl`` and ``top1_agreement`` (same top token) are
    means per scored token, ``kl_median`` / ``kl_p99`` / ``kl_p999`` its tail, and
    ``delta_perplexity`` (compressed minus full) comes with ``delta_perplexity_ci``, the
    half-width of its 95 % interval across windows (``nan`` for one window)."""

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
    kl_median: float
    kl_p99: float
    kl_p999: float
    delta_perplexity: float
    delta_perplexity_ci: float
    scored_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


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


def _protocol_windows(
    model: torch.nn.Module,
    tokenizer: Any,
    corpus: str,
    windows: int,
    prefill: int,
    continuation: int,
) -> tuple[list[int], list[Tensor]]:
    """The protocol's window starts and token windows ``[1, prefill + continuation + 1]``, on
    the model's device, after checking the protocol against the model and the corpus."""
    validate_protocol(windows, prefill, continuation)
    check_context(model, prefill + continuation, "prefill + continuation")
    device = next(model.parameters()).device
    ids = corpus_ids(tokenizer, corpus)
    length = prefill + continuation + 1
    starts = window_starts(len(ids), windows, prefill + continuation)
    return starts, [ids[start : start + length].to(device)[None] for start in starts]


def _full_precision(
    model: torch.nn.Module, windows: Sequence[Tensor], prefill: int
) -> list[tuple[Tensor, int]]:
    """The full-precision side of each window: continuation logits through a ``DynamicCache``
    and the bytes it held after the prefill (:func:`_prefill_then_score`)."""
    return [
        _prefill_then_score(model, make_cache("dynamic", model), window[:, :-1], prefill)
        for window in windows
    ]


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
    pre_rope: bool = False,
) -> PerplexityCheck:
    """Perplexity, KL(full || compressed) and top-1 agreement of a compressed prefill cache.

    Window ``i`` feeds corpus tokens ``[i * span, (i + 1) * span)``, ``span = prefill +
    continuation``, from the corpus start (see :func:`window_starts`).
    Both runs take the same path, so that only the cache differs: the prefill fills a fresh cache
    (a ``DynamicCache`` for full precision; one from ``config`` for the compressed run, compressed
    as it arrives: with ``prefill`` a multiple of the block size nothing stays in full
    precision), then the ``continuation`` tokens go through it in one forward. Both score the same ``continuation`` next-token predictions (those made at
    the continuation positions). ``bits_per_entry`` is the cache's measured size right after
    prefill, in bits per cached K/V entry. ``pre_rope``: the compressed cache quantizes keys
    before RoPE (:func:`make_cache`, KVQuant). Warns with
    :class:`gear_lab.errors.NothingCompressedWarning` when the prefill cache held as many bytes
    as full precision (``prefill`` shorter than one cache block).
    """
    starts, inputs = _protocol_windows(model, tokenizer, corpus, windows, prefill, continuation)
    return _check_windows(model, config, pre_rope, corpus, prefill, starts, inputs, None, progress)


def _check_windows(
    model: torch.nn.Module,
    config: CacheSpec,
    pre_rope: bool,
    corpus: str,
    prefill: int,
    starts: list[int],
    inputs: list[Tensor],
    reference: list[tuple[Tensor, int]] | None,
    progress: bool,
) -> PerplexityCheck:
    """:func:`perplexity_check` on the windows ``inputs`` (starting at corpus tokens
    ``starts``), with the full-precision side ``reference`` (:func:`_full_precision`) given or,
    when ``None``, run window by window beside the compressed one."""
    probe = make_cache(config, model, pre_rope=pre_rope)  # validate the spec before the long run
    label = method_label(config, pre_rope=pre_rope)
    entries = model_arch(model).cached_entries(prefill)
    continuation = inputs[0].shape[1] - prefill - 1
    nll_full: list[Tensor] = []
    nll_comp: list[Tensor] = []
    kls: list[Tensor] = []
    agree: list[Tensor] = []
    bits: list[float] = []
    held: list[int] = []
    full_held: list[int] = []
    start_time = time.perf_counter()
    for i, window in enumerate(tqdm(inputs, desc=f"ppl {label}", disable=not progress)):
        tokens, targets = window[:, :-1], window[0, prefill + 1 :]
        if reference is None:
            full, full_bytes = _full_precision(model, [window], prefill)[0]
        else:
            full, full_bytes = reference[i]
        cache = make_cache(config, model, pre_rope=pre_rope)
        comp, prefill_bytes = _prefill_then_score(model, cache, tokens, prefill)
        bits.append(8 * prefill_bytes / entries)
        held.append(prefill_bytes)
        full_held.append(full_bytes)
        for logits, out in ((full, nll_full), (comp, nll_comp)):
            out.append(
                torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
            )
        kls.append(next_token_kl(full, comp))
        agree.append(top1_agreement(full, comp))
    warn_if_nothing_compressed(probe, sum(held), sum(full_held), "perplexity_check's prefill")
    tail = kl_quantiles(torch.cat(kls))
    delta, delta_ci = delta_perplexity(nll_full, nll_comp)
    return PerplexityCheck(
        method=label,
        corpus=corpus,
        windows=len(inputs),
        prefill=prefill,
        continuation=continuation,
        window_starts=starts,
        perplexity_full=math.exp(torch.cat(nll_full).mean().item()),
        perplexity_compressed=math.exp(torch.cat(nll_comp).mean().item()),
        kl=tail["kl_mean"],
        top1_agreement=torch.cat(agree).float().mean().item(),
        bits_per_entry=sum(bits) / len(bits),
        seconds=time.perf_counter() - start_time,
        kl_median=tail["kl_median"],
        kl_p99=tail["kl_p99"],
        kl_p999=tail["kl_p999"],
        delta_perplexity=delta,
        delta_perplexity_ci=delta_ci,
        scored_tokens=sum(k.numel() for k in kls),
    )


def layer_sensitivity(
    model: torch.nn.Module,
    tokenizer: Any,
    config: CompressionConfig,
    windows: int = 1,
    prefill: int = 512,
    continuation: int = 128,
    progress: bool = True,
) -> tuple[float, ...]:
    """Per decoder layer, the mean next-token KL of :func:`perplexity_check` (same protocol) when
    only that layer's K/V are compressed with ``config``, every other layer in full precision
    (a ``GearCache`` with one config per layer). :func:`gear_lab.allocation.allocate` calibrates
    its dump-measured layer errors with it (``calibrate``)."""
    layers = model_arch(model).num_layers
    none = get_preset("none")
    starts, inputs = _protocol_windows(model, tokenizer, "pydoc", windows, prefill, continuation)
    with torch.inference_mode():  # the full-precision side once, shared by every layer's check
        reference = _full_precision(model, inputs, prefill)
    kls = []
    for layer in tqdm(range(layers), desc="layer sensitivity", disable=not progress):
        configs = [config if i == layer else none for i in range(layers)]

        def one_layer(m: torch.nn.Module, configs: list[CompressionConfig] = configs) -> Cache:
            return GearCache(configs, model_config=m.config)

        one_layer.label = f"{config.name} on layer {layer}"
        with torch.inference_mode():
            check = _check_windows(
                model, one_layer, False, "pydoc", prefill, starts, inputs, reference, False
            )
        kls.append(check.kl)
    return tuple(kls)
