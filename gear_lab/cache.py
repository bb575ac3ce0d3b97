"""``GearCache``: a transformers ``Cache`` whose layers hold compressed K/V blocks (GEAR streaming).

GEAR (Kang et al., 2024, "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless
Generative Inference of LLM", section 3.3) keeps the newest ``n_b`` tokens of every layer in full
precision and compresses each full block of ``n_b`` tokens exactly once. This module does that on
top of transformers' public cache-layer API:

- each layer keeps its compressed blocks consolidated in a few
  :class:`gear_lab.compression.Compressed` chunks ``[n, kv_heads, n_b, head_dim]`` (one per
  compression config and block size, grown with :meth:`Compressed.cat`, each block indexed by
  (batch row, start position)); the blocks all rows complete in one forward call are compressed
  together in one call, each block with its own statistics and low rank; and a full-precision
  buffer of fewer than ``n_b`` newest tokens per row;
- the prompt is compressed block by block when it arrives (with ``config.prefill_rank`` as its
  rank where that is set); the trailing partial block stays in the buffer. With
  ``prompt_compression="oneshot"`` the whole prompt is compressed as one block instead (one set of
  statistics and one low rank over it, as transformers' ``QuantizedCache`` quantizes a prompt),
  nothing of it left in full precision;
- when decoding fills the buffer, that block is compressed once and appended; nothing is ever
  re-compressed or thrown away (except on sliding-window layers, below);
- attention sees the decompressed blocks followed by the buffer, and the current step's own K/V in
  full precision. Memory-true mode (the default): each update decompresses the layer's chunks
  (a handful of ops per chunk) and writes them, with one ``index_copy_`` per chunk, the buffer and
  the new states, into one :class:`Transient` buffer shared by all layers, and returns views of
  it; nothing decompressed outlives the step. Workspace mode (``workspace=True``, a speed
  option): the decompressed concatenation is kept as a per-layer workspace updated block by
  block, so a decoding step decompresses nothing. :meth:`GearCache.nbytes` counts what is *held*
  (compressed parts plus buffers), :meth:`GearCache.resident_nbytes` every byte kept
  (:meth:`GearCache.memory_breakdown`: compressed, index, buffers, workspace, transient).

Each :class:`GearLayer` is given its settings as constructor arguments (compression config,
``n_b``, storage dtype, sliding window, padding provider), as transformers' own cache layers are;
:class:`GearCache` builds one per decoder layer and otherwise only loops over them.

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, DynamicLayer

from gear_lab.architecture import FULL, SLIDING, model_arch
from gear_lab.compression import Compressed, CompressionConfig, compress, get_preset
from gear_lab.errors import CacheError, ConfigError

DEFAULT_BLOCK_SIZE = 64  # n_b of the GEAR paper's code
#: how a prompt is compressed: in blocks of n_b tokens (GEAR streaming) or all at once
PROMPT_COMPRESSIONS = ("blockwise", "oneshot")

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


# --------------------------------------------------------------------------------------------
# one layer
# --------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    """Compressed blocks of ``size`` tokens (``n_b``, or a whole one-shot prompt) that share one
    compression config, stacked with :meth:`Compressed.cat`: ``keys`` / ``values`` are
    ``[n, kv_heads, size, head_dim]``; block ``j`` belongs to batch row ``rows[j]`` and starts at
    absolute position ``starts[j]`` (``rows`` / ``starts``: ``[n]`` int64 on the states' device,
    ``first`` the smallest start)."""

    size: int
    keys: Compressed
    values: Compressed
    rows: torch.Tensor
    starts: torch.Tensor
    first: int

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed parts (the block index not included)."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def index_nbytes(self) -> int:
        """Bytes of the block index (``rows`` and ``starts``)."""
        return self.rows.nbytes + self.starts.nbytes

    def extend(self, other: _Chunk) -> None:
        """Append ``other``'s blocks (same config and size)."""
        self.keys = Compressed.cat([self.keys, other.keys])
        self.values = Compressed.cat([self.values, other.values])
        self.rows = torch.cat([self.rows, other.rows])
        self.starts = torch.cat([self.starts, other.starts])
        self.first = min(self.first, other.first)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the blocks at ``index`` (``[k]`` int64)."""
        self.keys, self.values = self.keys.select(index), self.values.select(index)
        self.rows, self.starts = self.rows[index], self.starts[index]
        self.first = int(self.starts.min())

    def scatter(self, keys: torch.Tensor, values: torch.Tensor, origin: int) -> None:
        """Write the decompressed blocks into ``keys`` / ``values`` (contiguous
        ``[batch, kv_heads, length, head_dim]`` whose position 0 is absolute ``origin``) with one
        ``index_copy_`` per kind; tokens before ``origin`` are skipped."""
        _, heads, length, dim = keys.shape
        steps = torch.arange(self.size, device=self.starts.device)
        position = (self.starts - origin)[:, None, None] + steps  # [n, 1, size]
        heads_of = self.rows[:, None] * heads + torch.arange(heads, device=steps.device)  # [n, h]
        index = torch.add(position, heads_of[..., None], alpha=length).view(-1)  # [n * h * size]
        inside = None
        if self.first < origin:  # a sliding window's edge cuts the oldest blocks
            inside = (position >= 0).expand(-1, heads, -1).reshape(-1)
            index = index[inside]
        for part, out in ((self.keys, keys), (self.values, values)):
            _write_blocks(part, out.view(-1, dim), index, inside)


def _write_blocks(
    part: Compressed, out: torch.Tensor, index: torch.Tensor, inside: torch.Tensor | None
) -> None:
    """``out[index] = `` the decompressed blocks' rows (``out``: ``[tokens, head_dim]`` view of
    the transient or workspace); a function of its own so each decompression is freed before the
    next. ``reshape``: a one-shot block whose length is not a multiple of the group size
    decompresses to a non-contiguous slice."""
    block = part.decompress().to(out.dtype).reshape(-1, out.shape[-1])
    out.index_copy_(0, index, block if inside is None else block[inside])


@dataclass
class _Row:
    """Streaming state of one batch row: ``done`` is the absolute end of its compressed part
    (its buffer is ``[done, seq)``); ``first`` its first real (non-padding) position."""

    first: int
    done: int


def _no_padding(batch: int) -> list[int]:
    return [0] * batch


class Transient:
    """The one full-precision buffer a memory-true :class:`GearCache` reconstructs K/V into.

    Layer ``i``'s attention has finished before layer ``i + 1`` updates, so every layer of a
    forward pass reuses it. It grows (``torch.empty``, by at least a quarter) when a layer needs
    more than it holds, and is never shrunk.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def views(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two contiguous ``shape`` (``[batch, kv_heads, seq, head_dim]``) views for keys and
        values; their contents are left as they were."""
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        buf = self.buffer
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < 2 * numel:
            grown = buf.numel() * 5 // 4 if buf is not None and buf.dtype == dtype else 0
            self.buffer = buf = None  # release the old buffer before allocating the new one
            self.buffer = buf = torch.empty(max(2 * numel, grown), dtype=dtype, device=device)
        return buf[:numel].view(shape), buf[numel : 2 * numel].view(shape)

    @property
    def nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.nbytes


class GearLayer(DynamicLayer):
    """One decoder layer of a :class:`GearCache` (full attention, or a sliding window).

    Like transformers' ``DynamicLayer`` / ``DynamicSlidingWindowLayer``, a layer is given all it
    needs: ``config`` compresses its blocks of ``block_size`` tokens (``n_b``) in
    ``storage_dtype`` (``None``: the states' dtype); ``sliding_window`` (``None``: full
    attention); ``padding_starts(batch)`` gives each row's first real position when the layer is
    first filled (default: no padding); ``prompt_compression`` (:data:`PROMPT_COMPRESSIONS`) says
    whether the first update (the prompt) is compressed in blocks of ``n_b`` or as one block;
    ``workspace`` picks the mode and ``transient`` (memory-true mode; ``None``: its own) is the
    buffer shared by all layers of a cache.

    Compressed blocks live in a few :class:`_Chunk` s (one per compression config and block
    size: prompt blocks at ``prefill_rank``, decode blocks), each block indexed by (row, start).
    ``self.keys`` / ``self.values`` ``[batch, kv_heads, seq_kept, head_dim]`` are the
    full-precision states kept: in memory-true mode (``workspace=False``) only the buffer tail
    from ``min(row.done)`` (fewer than ``n_b`` tokens, which covers every row's buffer); in
    workspace mode the decompressed blocks followed by the buffers, from absolute position
    ``self.offset``.
    """

    is_croppable = False

    def __init__(
        self,
        config: CompressionConfig,
        block_size: int = DEFAULT_BLOCK_SIZE,
        *,
        sliding_window: int | None = None,
        storage_dtype: torch.dtype | None = None,
        padding_starts: Callable[[int], list[int]] = _no_padding,
        prompt_compression: str = "blockwise",
        workspace: bool = False,
        transient: Transient | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.prompt_compression = prompt_compression
        self.block_size = block_size
        self.storage_dtype = storage_dtype
        self.padding_starts = padding_starts
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.workspace = workspace
        self.transient = None if workspace else (transient or Transient())
        self.cumulative_length = 0
        self.offset = 0
        self.rows: list[_Row] = []
        self.chunks: dict[tuple[Any, Any, int], _Chunk] = {}
        self.compressions = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_empty((batch, heads, 0, dim))
        self.values = value_states.new_empty((batch, heads, 0, value_states.shape[-1]))
        first = self.padding_starts(batch)
        self.rows = [_Row(first=p, done=p) for p in first]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[batch, kv_heads, q, head_dim]`` states; return what attention must see.

        The returned K/V are the decompressed blocks and buffers of earlier steps followed by the
        new states in full precision (views of the shared transient in memory-true mode); full
        blocks are then compressed once each.
        """
        prefill = not self.is_initialized
        if prefill:
            self.lazy_initialization(key_states, value_states)
        past, origin = self.cumulative_length, self.offset
        self.cumulative_length = past + key_states.shape[-2]
        if self.workspace:
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
        else:
            keys, values = self._reconstruct(key_states, value_states, past)
        out_keys, out_values = keys, values
        if self.is_sliding:
            # what DynamicSlidingWindowLayer returns: the last window - 1 cached tokens + the new ones
            visible = min(past - origin, self.sliding_window - 1) + key_states.shape[-2]
            out_keys, out_values = keys[..., -visible:, :], values[..., -visible:, :]
            self._drop_outside_window()
        self._compress_full_blocks(keys, values, origin, prefill)
        return out_keys, out_values

    def _reconstruct(
        self, key_states: torch.Tensor, value_states: torch.Tensor, past: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory-true mode: write positions ``[offset, cumulative_length)`` into the shared
        transient (zeros before each row's first real token, the buffer tail, the new states,
        the decompressed chunks) and return its views ``[batch, kv_heads, seq, head_dim]``."""
        batch, heads, _, dim = key_states.shape
        shape = (batch, heads, self.cumulative_length - self.offset, dim)
        keys, values = self.transient.views(shape, key_states.dtype, key_states.device)
        tail = past - self.keys.shape[-2] - self.offset  # where the kept buffer tail starts
        for i, row in enumerate(self.rows):
            padded = min(row.first - self.offset, tail)  # left padding that no block covers
            if padded > 0:
                keys[i, :, :padded] = 0
                values[i, :, :padded] = 0
        now = past - self.offset
        keys[..., tail:now, :], values[..., tail:now, :] = self.keys, self.values
        keys[..., now:, :], values[..., now:, :] = key_states, value_states
        # after the tail: a row whose blocks reach past min(done) reads them decompressed
        for chunk in self.chunks.values():
            chunk.scatter(keys, values, self.offset)
        return keys, values

    def _drop_outside_window(self) -> None:
        """Keep only the last ``window - 1`` tokens (all a later step can attend to)."""
        keep_from = max(self.cumulative_length - (self.sliding_window - 1), 0)
        if keep_from <= self.offset:
            return
        self.offset = keep_from
        for key, chunk in list(self.chunks.items()):
            alive = chunk.starts + chunk.size > keep_from
            if not bool(alive.any()):
                del self.chunks[key]
            elif not bool(alive.all()):
                chunk.keep(alive.nonzero().squeeze(1))
        for row in self.rows:
            # tokens that left the window before their block filled are never compressed
            row.done = max(row.done, keep_from)

    def _compress_full_blocks(
        self, keys: torch.Tensor, values: torch.Tensor, origin: int, prefill: bool
    ) -> None:
        """Compress every row's full blocks once each (all rows' blocks of one size in one call;
        a one-shot prompt is one block of all its tokens) from ``keys`` / ``values``
        ``[batch, kv_heads, seq, head_dim]`` (absolute position ``origin`` first), then keep the
        workspace (workspace mode) or copy out the buffer tail (memory-true mode)."""
        oneshot = prefill and self.prompt_compression == "oneshot"
        groups: dict[int, list[tuple[int, int]]] = {}  # block size -> [(row, blocks)]
        for i, row in enumerate(self.rows):
            pending = self.cumulative_length - row.done
            size = pending if oneshot else self.block_size
            if 0 < size <= pending:
                groups.setdefault(size, []).append((i, pending // size))
        if self.workspace and groups:
            # the tensors just returned to attention must keep the full-precision states
            keys, values = keys.clone(), values.clone()
        for size, counts in groups.items():
            self._compress_blocks(keys, values, origin, size, counts, prefill)
        if self.workspace:
            cut = self.offset - origin
            self.keys, self.values = keys[..., cut:, :], values[..., cut:, :]
        else:
            cut = min(row.done for row in self.rows) - origin
            self.keys, self.values = keys[..., cut:, :].clone(), values[..., cut:, :].clone()

    def _compress_blocks(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        origin: int,
        size: int,
        counts: list[tuple[int, int]],
        prefill: bool,
    ) -> None:
        """Compress ``counts`` (``(row, blocks)``) blocks of ``size`` tokens from each row's
        ``done`` as one ``[n, kv_heads, size, head_dim]`` batch per kind (each block its own
        statistics and low rank, GEAR section 3.3) and add them to their chunk."""
        rows: list[int] = []
        starts: list[int] = []
        for i, count in counts:
            rows += [i] * count
            starts += range(self.rows[i].done, self.rows[i].done + count * size, size)
        parts = []
        for kind, states in (("keys", keys), ("values", values)):
            pieces = []
            for i, count in counts:
                lo = self.rows[i].done - origin
                # [h, count * size, d] -> [count, h, size, d]: one batch element per block
                pieces.append(states[i, :, lo : lo + count * size].unflatten(1, (count, size)))
            # a copy: what is kept must not alias the states
            blocks = torch.cat([p.transpose(0, 1) for p in pieces])
            blocks = blocks.to(self.storage_dtype or blocks.dtype)
            parts.append(compress(blocks, self.config.for_kind(kind, prefill), kind))
        device = keys.device
        new = _Chunk(
            size,
            parts[0],
            parts[1],
            torch.tensor(rows, device=device),
            torch.tensor(starts, device=device),
            min(starts),
        )
        if self.workspace:  # attention at later steps sees the decompressed blocks
            new.scatter(keys, values, origin)
        key = (self.config.for_kind("keys", prefill), self.config.for_kind("values", prefill), size)
        if key in self.chunks:
            self.chunks[key].extend(new)
        else:
            self.chunks[key] = new
        for i, count in counts:
            self.rows[i].done += count * size
        self.compressions += len(rows)

    def blocks(self) -> list[tuple[int, int, int]]:
        """Every compressed block as ``(row, start, size)``, sorted."""
        found = []
        for chunk in self.chunks.values():
            pairs = zip(chunk.rows.tolist(), chunk.starts.tolist(), strict=True)
            found += [(row, start, chunk.size) for row, start in pairs]
        return sorted(found)

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
        """Bytes held: compressed blocks plus every row's full-precision buffer
        (``[max(done, first), seq)`` of each row, padding excluded)."""
        if not self.is_initialized:
            return 0
        _, heads, _, dim = self.keys.shape
        per_token = 2 * heads * dim * self.keys.element_size()
        buffers = sum(self.cumulative_length - max(row.done, row.first) for row in self.rows)
        return sum(chunk.nbytes for chunk in self.chunks.values()) + buffers * per_token

    def memory_breakdown(self) -> dict[str, int]:
        """Resident bytes, measured from the tensors kept: ``compressed`` (the chunks'
        compressed parts), ``index`` (their block index), ``buffers`` (memory-true mode: the
        full-precision tail) and ``workspace`` (workspace mode: the decompressed workspace, its
        buffer tokens included)."""
        kept = self.keys.nbytes + self.values.nbytes if self.is_initialized else 0
        return {
            "compressed": sum(chunk.nbytes for chunk in self.chunks.values()),
            "index": sum(chunk.index_nbytes for chunk in self.chunks.values()),
            "buffers": 0 if self.workspace else kept,
            "workspace": kept if self.workspace else 0,
        }

    def entries(self) -> int:
        """K/V entries cached here (padding excluded), kept compressed or in the buffer."""
        if not self.is_initialized:
            return 0
        _, heads, _, dim = self.keys.shape
        tokens = sum(self.cumulative_length - max(row.first, self.offset) for row in self.rows)
        return 2 * heads * dim * tokens

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
        """Bytes of the decompressed workspace (workspace mode; 0 in memory-true mode)."""
        return self.memory_breakdown()["workspace"]

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.offset = 0
        self.rows = []
        self.chunks = {}
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
    ``None``: the model's dtype. ``prompt_compression="oneshot"`` compresses the prompt as one
    block instead of blocks of ``n_b`` (:data:`PROMPT_COMPRESSIONS`; decoding is block-wise either
    way). Use as ``model.generate(ids, past_key_values=GearCache(...))``
    or in plain forward calls; for a left-padded batch call :meth:`set_padding` first.

    Memory (the default, ``workspace=False``, *memory-true*): between steps a layer keeps its
    compressed blocks and a full-precision buffer of fewer than ``n_b`` tokens, nothing else; each
    update reconstructs what attention reads into one :class:`Transient` buffer shared by all
    layers. ``workspace=True`` is the speed option: every layer also keeps its decompressed
    blocks in full precision (a per-layer workspace as large as a full-precision cache), so a
    step decompresses nothing. :meth:`resident_nbytes` counts all of it,
    :meth:`memory_breakdown` by kind; :meth:`nbytes` only compressed blocks plus buffers.
    """

    def __init__(
        self,
        method: str | CompressionConfig = "gear",
        *,
        model_config: Any = None,
        storage_dtype: torch.dtype | None = None,
        prompt_compression: str = "blockwise",
        workspace: bool = False,
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
        if prompt_compression not in PROMPT_COMPRESSIONS:
            raise ConfigError(
                f"prompt_compression must be one of {PROMPT_COMPRESSIONS}, got {prompt_compression!r}"
            )
        self.prompt_compression = prompt_compression
        self.workspace = bool(workspace)
        self.transient = None if self.workspace else Transient()
        self._padding: torch.Tensor | None = None
        self._padding_declared = False
        if model_config is None:
            super().__init__(layers=[])
            self._lazy_layers = True
        else:
            arch = model_arch(model_config)
            unsupported = {layer.attention_type for layer in arch.layers} - {FULL, SLIDING}
            if unsupported:
                raise CacheError(
                    f"GearCache supports full and sliding attention layers, not {unsupported}"
                )
            super().__init__(layers=[self._new_layer(w) for w in arch.sliding_windows])
            self._lazy_layers = False

    def _new_layer(self, sliding_window: int | None = None) -> GearLayer:
        return GearLayer(
            self.config,
            self.block_size,
            sliding_window=sliding_window,
            storage_dtype=self.storage_dtype,
            padding_starts=self.padding_starts,
            prompt_compression=self.prompt_compression,
            workspace=self.workspace,
            transient=self.transient,
        )

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
                self.layers.append(self._new_layer())
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def set_padding(self, attention_mask: torch.Tensor | None) -> None:
        """Declare the prompt's left padding: ``attention_mask`` ``[batch, prompt_len]`` of 0/1.

        Must be called before the first forward of a batch of more than one row (``None``: no
        row is padded): the cache never sees the attention mask ``generate`` passes to the
        model, and undeclared left padding would enter a row's statistics and change its
        generation. Padded positions are never compressed nor counted as held; each row's blocks
        start at its first real token.
        """
        if any(layer.is_initialized for layer in self.layers):
            raise CacheError("set_padding must be called before the cache is first filled")
        self._padding_declared = True
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
        """First real position of each of ``batch`` rows (0 without padding); a batch of more
        than one row whose padding was never declared raises :class:`CacheError`."""
        if batch > 1 and not self._padding_declared:
            raise CacheError(
                f"GearCache got a batch of {batch} rows without set_padding: call "
                "cache.set_padding(attention_mask) before the first forward (None when no row is "
                "padded)"
            )
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
        """Bytes held by every layer: compressed blocks plus each row's full-precision buffer
        (padding excluded). Not counted: any workspace, the transient, the block index (see
        :meth:`resident_nbytes`)."""
        return sum(layer.nbytes() for layer in self.layers)

    def memory_breakdown(self) -> dict[str, int]:
        """Resident bytes by kind, measured from the tensors kept: ``compressed``, ``index``,
        ``buffers`` (memory-true: full-precision tails), ``workspace`` (workspace mode:
        decompressed workspaces with their buffer tokens) summed over layers, and ``transient``
        (the one reconstruction buffer shared by all layers, memory-true mode)."""
        totals = dict.fromkeys(("compressed", "index", "buffers", "workspace"), 0)
        for layer in self.layers:
            for name, size in layer.memory_breakdown().items():
                totals[name] += size
        totals["transient"] = 0 if self.transient is None else self.transient.nbytes
        return totals

    def resident_nbytes(self) -> int:
        """Every byte the cache keeps allocated: the sum of :meth:`memory_breakdown`."""
        return sum(self.memory_breakdown().values())

    def full_precision_nbytes(self) -> int:
        """Bytes a full-precision ``DynamicCache(config=...)`` of the same length would hold."""
        return sum(layer.full_precision_nbytes() for layer in self.layers)

    def workspace_nbytes(self) -> int:
        """Bytes of the decompressed per-layer workspaces (``workspace=True``; else 0), counted in
        :meth:`resident_nbytes`, not in :meth:`nbytes`."""
        return sum(layer.workspace_nbytes() for layer in self.layers)

    def bits_per_entry(self) -> float:
        """Measured bits held per cached K/V entry (padding excluded)."""
        entries = sum(layer.entries() for layer in self.layers)
        return 8 * self.nbytes() / entries if entries else 0.0
