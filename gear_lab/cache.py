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
  full precision. Memory-true mode (the default): each update writes the buffer, the new states
  and the layer's decompressed chunks into one :class:`Transient` buffer shared by all layers and
  returns views of it; nothing decompressed outlives the step. A chunk of unpadded rows of equal
  length (blocks kept sorted by row and start) is decompressed straight into its strided view
  of the transient (:meth:`Compressed.decompress_into`: codes read through a byte table, scales,
  low rank and outliers applied in place), others with one ``index_copy_`` per kind. Workspace mode (``workspace=True``, a speed
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

Attention sinks (``config.sinks = N``; StreamingLLM, Xiao et al. 2024; KVQuant keeps them in
fp16): each row's first ``N`` real tokens are never compressed and reach attention exactly as the
model gave them; blocks start after them. Pre-RoPE keys (``pre_rope``; KVQuant, Hooper et al.
2024): key blocks are un-rotated with the model's own RoPE (:class:`gear_lab.rope.ModelRope`)
before they are compressed and rotated again when decompressed; quantization off, the logits
equal post-RoPE's within float rounding.

Tested with transformers 5.24 (see :data:`TESTED_TRANSFORMERS`); the few places that depend on
the transformers release are gathered in the "compatibility" section below.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import transformers
from transformers.cache_utils import Cache, DynamicLayer

from gear_lab.architecture import FULL, SLIDING, model_arch
from gear_lab.compression import Compressed, CompressionConfig, compress, get_preset
from gear_lab.errors import CacheError, ConfigError
from gear_lab.rope import ModelRope, rope_positions

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
    ``first`` the smallest start). Blocks are kept sorted by (row, start); ``grid`` is
    ``(rows, count)`` when rows ``0 .. rows - 1`` each hold ``count`` blocks at the same starts
    ``first, first + size, ...`` (unpadded rows of equal length): the chunk is then a strided
    ``[rows, count, kv_heads, size, head_dim]`` view of ``[batch, kv_heads, seq, head_dim]``."""

    size: int
    keys: Compressed
    values: Compressed
    rows: torch.Tensor
    starts: torch.Tensor
    first: int
    grid: tuple[int, int] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._arrange()

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
        self._arrange()

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the blocks at ``index`` (``[k]`` int64)."""
        self.keys, self.values = self.keys.select(index), self.values.select(index)
        self.rows, self.starts = self.rows[index], self.starts[index]
        self.first = int(self.starts.min())
        self._arrange()

    def _arrange(self) -> None:
        """Sort the blocks by (row, start) and set :attr:`grid` (once per change of blocks)."""
        rows, starts = self.rows.tolist(), self.starts.tolist()
        order = sorted(range(len(rows)), key=lambda j: (rows[j], starts[j]))
        if order != list(range(len(rows))):
            index = torch.tensor(order, device=self.rows.device)
            self.keys, self.values = self.keys.select(index), self.values.select(index)
            self.rows, self.starts = self.rows[index], self.starts[index]
            rows, starts = [rows[j] for j in order], [starts[j] for j in order]
        count = rows.count(0)
        tiles = len(rows) // count if count else 0
        one_row = list(range(self.first, self.first + count * self.size, self.size))
        grid = count > 0 and rows == [r for r in range(tiles) for _ in range(count)]
        self.grid = (tiles, count) if grid and starts == one_row * tiles else None

    def scatter(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        origin: int,
        rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """Write the decompressed blocks into ``keys`` / ``values`` (contiguous
        ``[batch, kv_heads, length, head_dim]`` whose position 0 is absolute ``origin``); tokens
        before ``origin`` are skipped. A :attr:`grid` chunk is decompressed straight into its view
        of them (:meth:`Compressed.decompress_into`, no temporary of the chunk's size); other
        chunks, and blocks that RoPE or a dtype change must pass through first, with one
        ``index_copy_`` per kind. ``rope(key blocks, rows, starts)``: applies RoPE to the
        decompressed key blocks (keys compressed before RoPE)."""
        turn = None if rope is None else lambda blocks: rope(blocks, self.rows, self.starts)
        index = inside = None
        for part, out, transform in ((self.keys, keys, turn), (self.values, values, None)):
            view = self._view(out, origin)
            if view is not None and transform is None and part.dtype == out.dtype:
                part.decompress_into(view)
                continue
            if index is None:
                index, inside = self._index(out.shape, origin)
            _write_blocks(part, out.view(-1, out.shape[-1]), index, inside, transform)

    def _view(self, out: torch.Tensor, origin: int) -> torch.Tensor | None:
        """The ``[rows, count, kv_heads, size, head_dim]`` view of ``out`` a :attr:`grid` chunk
        fills (``None``: no grid, or a sliding window's edge cuts the oldest blocks)."""
        if self.grid is None or self.first < origin:
            return None
        rows, count = self.grid
        lo = self.first - origin
        region = out[:rows, :, lo : lo + count * self.size]
        return region.unflatten(2, (count, self.size)).transpose(1, 2)

    def _index(self, shape: torch.Size, origin: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(index, inside)``: the rows of a ``[tokens, head_dim]`` view of ``shape``
        (``[batch, kv_heads, length, head_dim]``, position 0 at ``origin``) that the blocks'
        rows go to, and which of those rows are inside (``None``: all)."""
        _, heads, length, _ = shape
        steps = torch.arange(self.size, device=self.starts.device)
        position = (self.starts - origin)[:, None, None] + steps  # [n, 1, size]
        heads_of = self.rows[:, None] * heads + torch.arange(heads, device=steps.device)  # [n, h]
        index = torch.add(position, heads_of[..., None], alpha=length).view(-1)  # [n * h * size]
        inside = None
        if self.first < origin:  # a sliding window's edge cuts the oldest blocks
            inside = (position >= 0).expand(-1, heads, -1).reshape(-1)
            index = index[inside]
        return index, inside


def _write_blocks(
    part: Compressed,
    out: torch.Tensor,
    index: torch.Tensor,
    inside: torch.Tensor | None,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """``out[index] = `` the decompressed blocks' rows (``out``: ``[tokens, head_dim]`` view of
    the transient or workspace), each ``[n, kv_heads, size, head_dim]`` block batch passed
    through ``transform`` first; a function of its own so each decompression is freed before the
    next. ``reshape``: a one-shot block whose length is not a multiple of the group size
    decompresses to a non-contiguous slice."""
    block = part.decompress().to(out.dtype)
    if transform is not None:
        block = transform(block)
    block = block.reshape(-1, out.shape[-1])
    out.index_copy_(0, index, block if inside is None else block[inside])


@dataclass
class _Row:
    """Streaming state of one batch row: ``done`` is the absolute end of its compressed part
    (its buffer is ``[done, seq)``; it starts after the row's attention sinks); ``first`` its
    first real (non-padding) position."""

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
    buffer shared by all layers of a cache. ``rope(keys, positions, inverse=False)`` (``keys``
    ``[n, kv_heads, seq, head_dim]``, ``positions`` ``[n, seq]``) rotates keys by this layer's
    RoPE (``inverse``: undoes it); given, key blocks are compressed before RoPE (KVQuant, Hooper
    et al. 2024): un-rotated at each token's position, compressed, and rotated again when
    decompressed. A row's RoPE positions count from its first real token, as ``generate``
    numbers a left-padded row.

    Attention sinks (``config.sinks = N``): the first ``N`` real tokens of each row are never
    compressed; they stay as given (post-RoPE, in the states' dtype): in memory-true mode in
    ``sink_keys`` / ``sink_values`` ``[batch, kv_heads, N, head_dim]``, in workspace mode in the
    workspace. A row's blocks start after its sinks. On a sliding-window layer sinks leave the
    window like any token.

    Compressed blocks live in a few :class:`_Chunk` s (one per compression config and block
    size: prompt blocks at ``prefill_rank``, decode blocks), each block indexed by (row, start).
    ``self.keys`` / ``self.values`` ``[batch, kv_heads, seq_kept, head_dim]`` are the
    full-precision states kept: in memory-true mode (``workspace=False``) only the buffer tail
    from ``min(row.done)`` (fewer than ``n_b`` tokens past the sinks, which covers every row's
    buffer); in workspace mode the decompressed blocks followed by the buffers, from absolute
    position ``self.offset``.
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
        rope: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.sinks = config.sinks
        self.rope = rope
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.firsts: torch.Tensor | None = None  # [batch] each row's first real position
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
        self.rows = [_Row(first=p, done=p + self.sinks) for p in first]
        self.firsts = torch.tensor(first, device=key_states.device)

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
            if self.sinks and past < max(row.first for row in self.rows) + self.sinks:
                self._keep_sinks(keys, values, origin)
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
        transient (zeros before each row's first real token, the buffer tail, the sinks, the new
        states, the decompressed chunks) and return its views
        ``[batch, kv_heads, seq, head_dim]``."""
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
        if self.sink_keys is not None:
            for i, (lo, hi) in enumerate(self._sink_spans(past)):
                at = lo - self.rows[i].first  # the first sink slot still in the window
                span = slice(lo - self.offset, hi - self.offset)
                keys[i, :, span] = self.sink_keys[i, :, at : at + hi - lo]
                values[i, :, span] = self.sink_values[i, :, at : at + hi - lo]
        keys[..., now:, :], values[..., now:, :] = key_states, value_states
        # after the tail: a row whose blocks reach past min(done) reads them decompressed
        for chunk in self.chunks.values():
            chunk.scatter(keys, values, self.offset, self._block_rope if self.rope else None)
        return keys, values

    def _sink_spans(self, end: int) -> list[tuple[int, int]]:
        """Each row's attention sinks cached before absolute position ``end`` and still in the
        window, as absolute ``(lo, hi)`` (``hi <= lo``: none)."""
        return [
            (max(row.first, self.offset), min(row.first + self.sinks, end)) for row in self.rows
        ]

    def _keep_sinks(self, keys: torch.Tensor, values: torch.Tensor, origin: int) -> None:
        """Memory-true mode: copy the sinks that ``keys`` / ``values`` (absolute position
        ``origin`` first) hold into ``sink_keys`` / ``sink_values``, as they arrive."""
        if self.sink_keys is None:
            batch, heads, _, dim = keys.shape
            self.sink_keys = keys.new_zeros((batch, heads, self.sinks, dim))
            self.sink_values = values.new_zeros((batch, heads, self.sinks, values.shape[-1]))
        for i, (lo, hi) in enumerate(self._sink_spans(self.cumulative_length)):
            at = lo - self.rows[i].first
            self.sink_keys[i, :, at : at + hi - lo] = keys[i, :, lo - origin : hi - origin]
            self.sink_values[i, :, at : at + hi - lo] = values[i, :, lo - origin : hi - origin]

    def _block_rope(
        self, blocks: torch.Tensor, rows: torch.Tensor, starts: torch.Tensor, inverse: bool = False
    ) -> torch.Tensor:
        """Key blocks ``[n, kv_heads, size, head_dim]`` of rows ``rows`` starting at absolute
        ``starts`` (``[n]``) rotated by RoPE at their positions (``inverse``: un-rotated);
        unchanged when keys are compressed after RoPE (no ``rope``)."""
        if self.rope is None:
            return blocks
        positions = rope_positions(starts - self.firsts[rows], blocks.shape[-2])
        return self.rope(blocks, positions, inverse=inverse)

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
        if all(hi <= lo for lo, hi in self._sink_spans(self.cumulative_length)):
            self.sink_keys = self.sink_values = None  # every sink left the window

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
        device = keys.device
        block_rows = torch.tensor(rows, device=device)
        block_starts = torch.tensor(starts, device=device)
        parts = []
        for kind, states in (("keys", keys), ("values", values)):
            pieces = []
            for i, count in counts:
                lo = self.rows[i].done - origin
                # [h, count * size, d] -> [count, h, size, d]: one batch element per block
                pieces.append(states[i, :, lo : lo + count * size].unflatten(1, (count, size)))
            # a copy: what is kept must not alias the states
            blocks = torch.cat([p.transpose(0, 1) for p in pieces])
            if kind == "keys":  # with rope, KVQuant's keys before RoPE
                blocks = self._block_rope(blocks, block_rows, block_starts, inverse=True)
            blocks = blocks.to(self.storage_dtype or blocks.dtype)
            parts.append(compress(blocks, self.config.for_kind(kind, prefill), kind))
        new = _Chunk(size, parts[0], parts[1], block_rows, block_starts, min(starts))
        if self.workspace:  # attention at later steps sees the decompressed blocks
            new.scatter(keys, values, origin, self._block_rope if self.rope else None)
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
        (``[max(done, first), seq)`` of each row, padding excluded) and attention sinks."""
        if not self.is_initialized:
            return 0
        _, heads, _, dim = self.keys.shape
        per_token = 2 * heads * dim * self.keys.element_size()
        seq = self.cumulative_length
        buffers = sum(max(seq - max(row.done, row.first), 0) for row in self.rows)
        sinks = sum(max(hi - lo, 0) for lo, hi in self._sink_spans(seq))
        return sum(chunk.nbytes for chunk in self.chunks.values()) + (buffers + sinks) * per_token

    def memory_breakdown(self) -> dict[str, int]:
        """Resident bytes, measured from the tensors kept: ``compressed`` (the chunks'
        compressed parts), ``index`` (their block index), ``buffers`` (memory-true mode: the
        full-precision tail and the attention sinks) and ``workspace`` (workspace mode: the
        decompressed workspace, its buffer tokens and sinks included)."""
        kept = self.keys.nbytes + self.values.nbytes if self.is_initialized else 0
        if self.sink_keys is not None:
            kept += self.sink_keys.nbytes + self.sink_values.nbytes
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
        self.sink_keys = self.sink_values = self.firsts = None

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
    overrides; ``GearCache(config)`` a :class:`gear_lab.compression.CompressionConfig`;
    ``GearCache([config_0, config_1, ...])`` one config per decoder layer (a per-layer bit
    allocation, :mod:`gear_lab.allocation`; with ``model_config`` the list must have one entry per
    layer, without it a layer past the list raises :class:`CacheError`). ``n_b`` is each layer's
    ``config.block_size`` (default 64). Give ``model_config`` (the model's ``config``) to keep
    sliding-window layers windowed. ``storage_dtype`` (e.g. ``torch.float16``, as a half-precision
    cache holds K/V) is the dtype blocks are compressed in (kept outliers are stored in it);
    ``None``: the model's dtype. ``prompt_compression="oneshot"`` compresses the prompt as one
    block instead of blocks of ``n_b`` (:data:`PROMPT_COMPRESSIONS`; decoding is block-wise either
    way). Use as ``model.generate(ids, past_key_values=GearCache(...))``
    or in plain forward calls; for a left-padded batch call :meth:`set_padding` first.
    ``pre_rope=ModelRope(model)`` (:class:`gear_lab.rope.ModelRope`) quantizes keys before RoPE
    (KVQuant, Hooper et al. 2024): transformers hands the cache post-RoPE keys, so each block is
    un-rotated at its tokens' positions before it is compressed and rotated again when
    decompressed (the buffer, the sinks and the new states stay post-RoPE, as given).
    ``config.sinks = N`` keeps each row's first ``N`` real tokens in full precision (attention
    sinks, :class:`GearLayer`).

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
        method: str | CompressionConfig | Sequence[CompressionConfig] = "gear",
        *,
        model_config: Any = None,
        storage_dtype: torch.dtype | None = None,
        prompt_compression: str = "blockwise",
        workspace: bool = False,
        pre_rope: ModelRope | None = None,
        **overrides: Any,
    ) -> None:
        _check_transformers_version()
        if pre_rope is not None and not isinstance(pre_rope, ModelRope):
            raise ConfigError(f"pre_rope must be a ModelRope(model) or None, got {pre_rope!r}")
        self.pre_rope = pre_rope
        #: the config of every layer (``None``: per layer, :attr:`layer_configs`)
        self.config: CompressionConfig | None = None
        #: one config per decoder layer (``None``: :attr:`config` for all)
        self.layer_configs: tuple[CompressionConfig, ...] | None = None
        if isinstance(method, str):
            self.config = get_preset(method, **overrides)
        elif overrides:
            raise ConfigError("overrides apply to a preset name, not to a CompressionConfig")
        elif isinstance(method, CompressionConfig):
            self.config = method
        elif isinstance(method, Sequence) and all(isinstance(c, CompressionConfig) for c in method):
            if not method:
                raise ConfigError("per-layer configs: the list is empty")
            self.layer_configs = tuple(method)
        else:
            raise ConfigError(
                "method must be a preset name, a CompressionConfig or a list of them (one per "
                f"layer), got {type(method).__name__}"
            )
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
            if self.layer_configs is not None and len(self.layer_configs) != arch.num_layers:
                raise ConfigError(
                    f"per-layer configs: got {len(self.layer_configs)} for a model of "
                    f"{arch.num_layers} layers"
                )
            windows = enumerate(arch.sliding_windows)
            super().__init__(layers=[self._new_layer(i, w) for i, w in windows])
            self._lazy_layers = False

    @property
    def configs(self) -> tuple[CompressionConfig, ...]:
        """Every config the cache uses: :attr:`layer_configs`, else ``(config,)``."""
        return self.layer_configs or (self.config,)

    def config_for(self, layer_idx: int) -> CompressionConfig:
        """The compression config of layer ``layer_idx``."""
        if self.layer_configs is None:
            return self.config
        if layer_idx >= len(self.layer_configs):
            raise CacheError(
                f"layer {layer_idx} has no config: the per-layer configs cover "
                f"{len(self.layer_configs)} layers"
            )
        return self.layer_configs[layer_idx]

    def _new_layer(self, layer_idx: int, sliding_window: int | None = None) -> GearLayer:
        config = self.config_for(layer_idx)
        return GearLayer(
            config,
            config.block_size or DEFAULT_BLOCK_SIZE,
            sliding_window=sliding_window,
            storage_dtype=self.storage_dtype,
            padding_starts=self.padding_starts,
            prompt_compression=self.prompt_compression,
            workspace=self.workspace,
            transient=self.transient,
            rope=None if self.pre_rope is None else partial(self.pre_rope.rotate, layer=layer_idx),
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
                self.layers.append(self._new_layer(len(self.layers)))
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
