"""``GearCache``: a transformers ``Cache`` whose layers hold compressed K/V blocks (GEAR streaming).

GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM", section 3.3) keeps the newest ``n_b`` tokens of every layer in full
precision and compresses each full block of ``n_b`` tokens exactly once. This module does that on
top of transformers' public cache-layer API:

- each layer keeps, per batch row, its compressed blocks as :class:`gear_lab.compression.Compressed`
  objects (the blocks completed by one forward call are compressed together as a batch of
  ``[count, kv_heads, n_b, head_dim]``, each block with its own statistics and low rank) and a
  full-precision buffer of fewer than ``n_b`` newest tokens;
- the prompt is compressed block by block when it arrives (with ``config.prefill_rank`` as its
  rank where that is set); the trailing partial block stays in the buffer;
- when decoding fills the buffer, that block is compressed once and appended; nothing is ever
  re-compressed or thrown away (except on sliding-window layers, below);
- attention sees the decompressed blocks followed by the buffer, and the current step's own K/V in
  full precision. The decompressed concatenation is kept as a per-layer workspace that is updated
  block by block (so a decoding step decompresses nothing); :meth:`GearCache.nbytes` counts what
  is *held* (compressed parts plus buffer), :meth:`GearCache.workspace_nbytes` the workspace.

Batches: rows are compressed independently, each with its own blocks aligned on its own first
real token, so left padding never enters quantization, outlier or low-rank statistics, and a row
gives the same compressed blocks alone as in a batch (``Compressed`` treats batch elements
independently). Tell the cache where the padding is with
:meth:`GearCache.set_padding` (``attention_mask`` of the prompt, left padding only) before the
first forward; :func:`gear_lab.fidelity.check_generation` does this.

Sliding-window layers (Gemma 3, when ``model_config`` is given): blocks are compressed the same
way, attention gets the same window of tokens as transformers' ``DynamicSlidingWindowLayer``
returns (the last ``window - 1`` cached tokens plus the new ones), and blocks lying wholly outside
the window are dropped, as a full-precision sliding cache drops those tokens (a block straddling
the window's edge is kept whole until it leaves). Checked on Gemma 3 270M: with ``none`` the
generation equals ``DynamicCache(config=...)``'s, and a windowed cache generates the same tokens
as one built without ``model_config`` while holding less. Without
``model_config`` every layer keeps everything and the attention mask hides what is out of window.

Tested with transformers 5.24 (see :data:`TESTED_TRANSFORMERS`); the few places that depend on
the transformers release are gathered in the "compatibility" section below.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, DynamicLayer

from gear_lab.compression import Compressed, CompressionConfig, compress, get_preset
from gear_lab.errors import CacheError, ConfigError

DEFAULT_BLOCK_SIZE = 64  # n_b of the GEAR paper's code

# --------------------------------------------------------------------------------------------
# compatibility with the transformers release (the only release-dependent code of gear-lab)
# --------------------------------------------------------------------------------------------

#: transformers releases this module is tested with: ``[low, high)``.
TESTED_TRANSFORMERS = ("5.24", "5.25")


def _check_transformers_version() -> None:
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    low, high = (tuple(int(p) for p in v.split(".")) for v in TESTED_TRANSFORMERS)
    if not low <= version < high:
        warnings.warn(
            f"GearCache is tested with transformers >={TESTED_TRANSFORMERS[0]},"
            f"<{TESTED_TRANSFORMERS[1]}; found {transformers.__version__}",
            stacklevel=3,
        )


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward argument that takes a cache: ``cache`` (5.24+) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layer_windows(model_config: Any, num_layers: int | None = None) -> list[int | None]:
    """Sliding window of each decoder layer (``None``: full attention) from a model config."""
    text_config = model_config.get_text_config(decoder=True)
    types = getattr(text_config, "layer_types", None)
    if types is None:
        window = getattr(text_config, "sliding_window", None)
        types = ["sliding_attention" if window else "full_attention"] * (
            num_layers or text_config.num_hidden_layers
        )
    unsupported = set(types) - {"full_attention", "sliding_attention"}
    if unsupported:
        raise CacheError(f"GearCache supports full and sliding attention layers, not {unsupported}")
    return [text_config.sliding_window if t == "sliding_attention" else None for t in types]


# --------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """``count`` consecutive compressed blocks of one batch row, from absolute position
    ``start``; ``keys`` / ``values`` hold them as ``[count, kv_heads, n_b, head_dim]``."""

    start: int
    count: int
    keys: Compressed
    values: Compressed

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass
class _Row:
    """Streaming state of one batch row: ``done`` is the absolute end of its compressed part
    (its buffer is ``[done, seq)``); ``first`` its first real (non-padding) position."""

    first: int
    done: int
    blocks: list[_Block] = field(default_factory=list)


class GearLayer(DynamicLayer):
    """One decoder layer of a :class:`GearCache` (full attention, or a sliding window).

    ``self.keys`` / ``self.values`` ``[batch, kv_heads, seq_kept, head_dim]`` are the workspace:
    decompressed blocks followed by each row's full-precision buffer; position ``0`` of the
    workspace is absolute position ``self.offset``.
    """

    is_croppable = False

    def __init__(self, owner: GearCache, sliding_window: int | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self.offset = 0
        self.rows: list[_Row] = []
        self.compressions = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        first = self.owner.padding_starts(key_states.shape[0])
        self.rows = [_Row(first=p, done=p) for p in first]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kv_heads, q, head_dim]`` states; return what attention must see.

        The returned K/V are the decompressed blocks and buffers of earlier steps followed by the
        new states in full precision; full blocks are then compressed once each.
        """
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        past = self.cumulative_length
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if self.is_sliding:
            # what DynamicSlidingWindowLayer returns: the last window - 1 cached tokens + the new ones
            visible = min(past - self.offset, self.sliding_window - 1) + key_states.shape[-2]
            out_keys, out_values = keys[..., -visible:, :], values[..., -visible:, :]
        else:
            out_keys, out_values = keys, values
        self.cumulative_length = past + key_states.shape[-2]
        self.keys, self.values = keys, values
        if self.is_sliding:
            self._drop_outside_window()
        self._compress_full_blocks(prefill)
        return out_keys, out_values

    def _drop_outside_window(self) -> None:
        """Keep only the last ``window - 1`` tokens (all a later step can attend to)."""
        keep_from = max(self.cumulative_length - (self.sliding_window - 1), 0)
        if keep_from <= self.offset:
            return
        cut = keep_from - self.offset
        self.keys, self.values = self.keys[..., cut:, :], self.values[..., cut:, :]
        self.offset = keep_from
        n_b = self.owner.block_size
        for row in self.rows:
            row.blocks = [b for b in row.blocks if b.start + b.count * n_b > keep_from]
            # tokens that left the window before their block filled are never compressed
            row.done = max(row.done, keep_from)

    def _compress_full_blocks(self, prefill: bool) -> None:
        """Compress every row's full blocks once each (a row's blocks in one batched call)."""
        n_b = self.owner.block_size
        config = self.owner.config
        copied = False
        for i, row in enumerate(self.rows):
            count = (self.cumulative_length - row.done) // n_b
            if count == 0:
                continue
            if not copied:
                # the tensors just returned to attention must keep the full-precision states
                self.keys, self.values = self.keys.clone(), self.values.clone()
                copied = True
            lo, hi = row.done - self.offset, row.done - self.offset + count * n_b
            parts = []
            for kind, states in (("keys", self.keys), ("values", self.values)):
                # [1, h, count * n_b, d] -> [count, h, n_b, d]: one batch element per block
                blocks = states[i, :, lo:hi].unflatten(1, (count, n_b)).transpose(0, 1)
                # a copy: what is kept must not alias the workspace
                blocks = blocks.to(self.owner.storage_dtype or blocks.dtype, copy=True)
                part = compress(blocks, config.for_kind(kind, prefill), kind)
                states[i, :, lo:hi] = part.decompress().transpose(0, 1).flatten(1, 2)
                parts.append(part)
            row.blocks.append(_Block(row.done, count, parts[0], parts[1]))
            row.done += count * n_b
            self.compressions += count

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the states :meth:`update` returns next."""
        if not self.is_sliding:
            return self.cumulative_length + query_length, 0
        past = self.cumulative_length
        kv_offset = max(past - self.sliding_window + 1, 0)
        return min(past, self.sliding_window - 1) + query_length, kv_offset

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def nbytes(self) -> int:
        """Bytes held: compressed blocks plus every row's full-precision buffer."""
        if not self.is_initialized:
            return 0
        _, heads, _, dim = self.keys.shape
        per_token = 2 * heads * dim * self.keys.element_size()
        held = 0
        for row in self.rows:
            held += sum(b.nbytes for b in row.blocks)
            held += (self.cumulative_length - max(row.done, row.first)) * per_token
        return held

    def full_precision_nbytes(self) -> int:
        """Bytes a full-precision ``DynamicCache`` (built with the model config) holds here."""
        if not self.is_initialized:
            return 0
        batch, heads, _, dim = self.keys.shape
        tokens = self.cumulative_length
        if self.is_sliding:
            tokens = min(tokens, self.sliding_window - 1)
        return 2 * batch * heads * tokens * dim * self.keys.element_size()

    def workspace_nbytes(self) -> int:
        """Bytes of the decompressed workspace (not counted in :meth:`nbytes`)."""
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.offset = 0
        self.rows = []
        self.compressions = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise CacheError("GearCache cannot be cropped (compressed blocks are never re-opened)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise CacheError("GearCache does not support beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise CacheError("GearCache does not support expanding the batch after prefill")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise CacheError("GearCache does not support selecting batch rows")


# --------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------


class GearCache(Cache):
    """A transformers cache that stores K/V as GEAR-compressed blocks plus a recent buffer.

    ``GearCache("gear", bits=2)`` takes a preset name and :func:`gear_lab.compression.get_preset`
    overrides; ``GearCache(config)`` a :class:`gear_lab.compression.CompressionConfig`. ``n_b`` is
    ``config.block_size`` (default 64). Give ``model_config`` (the model's ``config``) to keep
    sliding-window layers windowed. ``storage_dtype`` (e.g. ``torch.float16``, as a half-precision
    cache holds K/V) is the dtype blocks are compressed in (kept outliers are stored in it);
    ``None``: the model's dtype. Use as ``model.generate(ids, past_key_values=GearCache(...))``
    or in plain forward calls; for a left-padded batch call :meth:`set_padding` first.
    """

    def __init__(
        self,
        method: str | CompressionConfig = "gear",
        *,
        model_config: Any = None,
        storage_dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> None:
        _check_transformers_version()
        if isinstance(method, CompressionConfig):
            if overrides:
                raise ConfigError("overrides apply to a preset name, not to a CompressionConfig")
            config = method
        elif isinstance(method, str):
            config = get_preset(method, **overrides)
        else:
            raise ConfigError(
                f"method must be a preset name or a CompressionConfig, got {method!r}"
            )
        self.config = config
        self.block_size = config.block_size or DEFAULT_BLOCK_SIZE
        if storage_dtype is not None and not (
            isinstance(storage_dtype, torch.dtype) and storage_dtype.is_floating_point
        ):
            raise ConfigError(f"storage_dtype must be a float torch.dtype, got {storage_dtype!r}")
        self.storage_dtype = storage_dtype
        self._padding: torch.Tensor | None = None
        if model_config is None:
            super().__init__(layers=[])
            self._lazy_layers = True
        else:
            super().__init__(layers=[GearLayer(self, w) for w in _layer_windows(model_config)])
            self._lazy_layers = False

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Update layer ``layer_idx`` (created on first use when no ``model_config`` was given)."""
        if self._lazy_layers:
            while len(self.layers) <= layer_idx:
                self.layers.append(GearLayer(self))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Declare the prompt's left padding: ``attention_mask`` ``[batch, prompt_len]`` of 0/1.

        Must be called before the first forward. Padded positions are never compressed nor
        counted as held; each row's blocks start at its first real token.
        """
        if any(layer.is_initialized for layer in self.layers):
            raise CacheError("set_padding must be called before the cache is first filled")
        if attention_mask is None:
            self._padding = None
            return
        mask = torch.as_tensor(attention_mask).detach().to("cpu", torch.bool)
        if mask.ndim != 2:
            raise CacheError(f"attention_mask must be [batch, seq], got shape {tuple(mask.shape)}")
        ones = mask.long()
        # left padding: every row is 0...0 1...1 (non-decreasing) with at least one real token
        if bool((ones[:, 1:] < ones[:, :-1]).any()) or not bool(mask.any(dim=1).all()):
            raise CacheError("GearCache supports left padding only (rows of 0...0 1...1)")
        self._padding = mask

    def padding_starts(self, batch: int) -> list[int]:
        """First real position of each of ``batch`` rows (0 without padding)."""
        if self._padding is None:
            return [0] * batch
        if self._padding.shape[0] != batch:
            raise CacheError(
                f"set_padding got {self._padding.shape[0]} rows, the model sent {batch}"
            )
        return (~self._padding).sum(dim=1).tolist()

    @property
    def compressions(self) -> int:
        """Blocks compressed so far, summed over layers and batch rows (each K/V block once)."""
        return sum(layer.compressions for layer in self.layers)

    def nbytes(self) -> int:
        """Bytes held by every layer: compressed blocks plus full-precision buffers."""
        return sum(layer.nbytes() for layer in self.layers)

    def full_precision_nbytes(self) -> int:
        """Bytes a full-precision ``DynamicCache(config=...)`` of the same length would hold."""
        return sum(layer.full_precision_nbytes() for layer in self.layers)

    def workspace_nbytes(self) -> int:
        """Bytes of the decompressed per-layer workspaces (a speed cache, not counted as held)."""
        return sum(layer.workspace_nbytes() for layer in self.layers)

    def bits_per_entry(self) -> float:
        """Measured bits held per cached K/V entry (padding excluded)."""
        entries = 0
        for layer in self.layers:
            if layer.is_initialized:
                _, heads, _, dim = layer.keys.shape
                lo = layer.offset
                tokens = sum(layer.cumulative_length - max(r.first, lo) for r in layer.rows)
                entries += 2 * heads * dim * tokens
        return 8 * self.nbytes() / entries if entries else 0.0
