"""GEAR composition ``X_hat = D + L + S`` (Kang et al. 2024) and the :class:`Compressed` container.

Inputs are ``[batch, kv_heads, seq, head_dim]`` (any ``[..., seq, head_dim]`` works the same
way: leading dimensions are independent matrices), any float dtype, CPU or CUDA. Order:
optional rotation of head_dim; outliers ``S`` picked and removed; the backbone ``D`` quantized
with statistics that exclude outlier positions (uniform, or with a Lloyd-Max codebook,
:mod:`.codebook`); the low rank ``L`` fitted to the residual ``X - D`` at non-outlier
positions; with ``qjl``, a 1-bit QJL sketch ``Q`` of what is left, ``X - D - L``
(:mod:`.qjl`, TurboQuant's second stage); reconstruction ``where(outlier, S, D + L + Q)``.

Block-wise streaming (``CompressionConfig.block_size = n_b``): each block of ``n_b`` tokens is
compressed once with its own statistics and low rank (blocks are batched as an extra leading
dimension); a trailing partial block is kept in full precision and reported as such.
Attention sinks (``CompressionConfig.sinks = N``): the first ``N`` tokens are kept as they are
(counted as full precision) and the rest is compressed as above, its blocks starting after them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from gear_lab.compression import cpu_kernel
from gear_lab.compression.codebook import CodebookQuantized, codebook_quantize
from gear_lab.compression.config import CompressionConfig, TensorCompression
from gear_lab.compression.fp8 import Fp8Tensor, fp8_quantize
from gear_lab.compression.lowrank import LowRank, power_lowrank_ranks, svd_lowrank
from gear_lab.compression.outliers import Outliers, extract_outliers, outlier_count
from gear_lab.compression.qjl import Sketch, qjl_sketch
from gear_lab.compression.quantize import (
    Quantized,
    compute_dtype,
    group_dim,
    leading_like,
    quantize,
    quantize_reconstruct,
)
from gear_lab.compression.rotation import rotate, unrotate
from gear_lab.errors import ConfigError, TensorError

# tensors() name -> bytes_by_part() part
_PARTS = {
    "codes": "codes",
    "scale": "scales",
    "zero": "scales",
    "codebook": "codebook",
    "outlier_values": "outliers",
    "outlier_indices": "outliers",
    "lowrank_left": "lowrank",
    "lowrank_right": "lowrank",
    "lowrank_left_scale": "lowrank",
    "lowrank_right_scale": "lowrank",
    "sketch_signs": "sketch",
    "sketch_norm": "sketch",
    "full_precision": "full_precision",
    "sink": "full_precision",
}
PARTS = ("codes", "scales", "codebook", "outliers", "lowrank", "sketch", "full_precision")


@dataclass(frozen=True, eq=False)
class Compressed:
    """What a compressed cache keeps for one ``[batch, kv_heads, seq, head_dim]`` tensor.

    ``body_shape``: the shape of the compressed leading tokens as the building blocks saw
    them (``[..., seq, d]``, or ``[..., n_blocks, n_b, d]`` block-wise; ``None`` when nothing
    is compressed); ``full_precision``: the tokens kept as they are (``[..., rest, d]``);
    ``sink``: the first tokens kept as they are (``[..., sinks, d]``, attention sinks,
    ``CompressionConfig.sinks``), before the compressed ones.
    """

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    config: TensorCompression
    block_size: int | None
    body_shape: torch.Size | None
    base: Quantized | CodebookQuantized | Fp8Tensor | None = None
    outliers: Outliers | None = None
    lowrank: LowRank | None = None
    sketch: Sketch | None = None
    full_precision: Tensor | None = None
    sink: Tensor | None = None

    @property
    def numel(self) -> int:
        """Entries of the original tensor."""
        return math.prod(self.shape)

    def tensors(self) -> dict[str, Tensor]:
        """Exactly the tensors kept (names are keys of the part table of :meth:`bytes_by_part`)."""
        kept: dict[str, Tensor] = {}
        for piece in (self.base, self.outliers, self.lowrank, self.sketch):
            if piece is not None:
                kept.update(piece.tensors())
        if self.full_precision is not None:
            kept["full_precision"] = self.full_precision
        if self.sink is not None:
            kept["sink"] = self.sink
        return kept

    @property
    def nbytes(self) -> int:
        """Bytes kept, summed over :meth:`tensors`."""
        return sum(t.nbytes for t in self.tensors().values())

    @property
    def bits_per_entry(self) -> float:
        """``8 * nbytes / numel``."""
        return 8 * self.nbytes / self.numel

    def bytes_by_part(self) -> dict[str, int]:
        """Bytes per part (:data:`PARTS`): ``codes``, ``scales``, ``codebook``, ``outliers``,
        ``lowrank``, ``sketch``, ``full_precision``."""
        sizes = dict.fromkeys(PARTS, 0)
        for name, tensor in self.tensors().items():
            sizes[_PARTS[name]] += tensor.nbytes
        return sizes

    def _body_into(self, out: Tensor) -> None:
        """Write the reconstruction of the compressed tokens into ``out`` (``body_shape``, its
        leading dim possibly split; the input dtype, any strides). It is made in the compute
        dtype (in ``out`` itself when that is its dtype: the parts' float16 ranges keep it
        finite there), else clamped into the input dtype's finite range (where the input lay),
        so e.g. a float16 top code at 65504 + rounding stays finite. The compiled CPU kernel
        writes each ``[n, d]`` block straight into ``out`` where it applies."""
        if cpu_kernel.decompress_body(self, out) is not None:  # None: the torch reference
            return
        work = compute_dtype(self.dtype)
        in_place = out.dtype == work and not self.config.rotate
        y = out if in_place else torch.empty(out.shape, dtype=work, device=self.device)
        if isinstance(self.base, Quantized):
            self.base.dequantize(work, out=y)
        elif self.base is not None:
            y.copy_(leading_like(self.base.dequantize(work), y))
        else:
            y.zero_()
        if self.lowrank is not None:
            y.add_(leading_like(self.lowrank.product(work), y))
        if self.sketch is not None:
            y.add_(leading_like(self.sketch.reconstruct(work), y))
        if self.outliers is not None:
            self.outliers.scatter_into(y)
        if self.config.rotate:
            y = unrotate(y, self.config.seed)
        if y is not out:
            limit = torch.finfo(self.dtype).max
            out.copy_(y.clamp_(-limit, limit))

    def _join(self, sink: Tensor | None, body: Tensor | None, rest: Tensor | None) -> Tensor:
        """Concatenate the sink, the body (reshaped to ``[..., tokens, d]``) and the
        full-precision rest."""
        pieces = [] if sink is None else [sink]
        pieces += [] if body is None else [body.reshape(*self.shape[:-2], -1, self.shape[-1])]
        pieces += [] if rest is None else [rest]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -2)

    def decompress(self) -> Tensor:
        """``X_hat`` with the shape, dtype and device of the input (:meth:`decompress_into` a
        new tensor)."""
        if self.sink is None and self.full_precision is None and self.body_shape is not None:
            compiled = cpu_kernel.decompress_body(self)  # the whole tensor, as it comes
            if compiled is not None:
                return compiled.view(self.shape)
        return self.decompress_into(torch.empty(self.shape, dtype=self.dtype, device=self.device))

    def decompress_into(self, out: Tensor) -> Tensor:
        """Write ``X_hat`` (what :meth:`decompress` returns) into ``out`` and return it.

        ``out`` has the input's dtype and shape, or that shape with the leading dim split in
        several (``[rows, blocks, ...]`` for ``[rows * blocks, ...]``,
        :func:`~gear_lab.compression.quantize.leading_like`), and any strides: e.g. a view of a
        cache's reconstruction buffer. The torch path reconstructs in ``out`` itself (float32 /
        float64), as does the compiled CPU kernel (any dtype it covers).
        """
        lead = out.dim() - len(self.shape) + 1
        if (
            out.dtype != self.dtype
            or lead < 1
            or math.prod(out.shape[:lead]) != self.shape[0]
            or out.shape[lead:] != self.shape[1:]
        ):
            raise TensorError(
                f"decompress_into needs {self.dtype} {tuple(self.shape)} (leading dim may be "
                f"split), got {out.dtype} {tuple(out.shape)}"
            )
        start = 0
        if self.sink is not None:
            start = self.sink.shape[-2]
            out.narrow(-2, 0, start).copy_(leading_like(self.sink, out))
        if self.body_shape is not None:
            tokens = self.body_shape[len(self.shape) - 2 : -1]  # (seq,) or (blocks, n_b)
            self._body_into(out.narrow(-2, start, math.prod(tokens)).unflatten(-2, tokens))
            start += math.prod(tokens)
        if self.full_precision is not None:
            rest = out.narrow(-2, start, out.shape[-2] - start)
            rest.copy_(leading_like(self.full_precision, out))
        return out

    @classmethod
    def cat(cls, parts: Sequence[Compressed]) -> Compressed:
        """One :class:`Compressed` of ``parts`` stacked along their leading (block) dimension,
        e.g. GEAR's streaming blocks ``[n_i, kv_heads, n_b, head_dim]`` (Kang et al. 2024,
        section 3.3) -> ``[sum n_i, kv_heads, n_b, head_dim]``; it decompresses to the
        concatenation of the parts' decompressions.

        Parts need the same config, dtype, device and trailing shape. Packed codes are 1-D and
        row-major, so the bytes of each leading element concatenate exactly when it holds a
        multiple of 8 codes (:class:`TensorError` otherwise); every other kept tensor (scales,
        zero points, outlier values and indices, low-rank factors, full-precision tokens) is
        concatenated on dim 0.
        """
        parts = list(parts)
        if not parts:
            raise TensorError("Compressed.cat needs at least one part")
        first = parts[0]
        for part in parts:
            first._check_stackable(part)
        n = sum(part.shape[0] for part in parts)
        return first._restacked(n, lambda name: [getattr(p, name) for p in parts], torch.cat)

    def select(self, index: Tensor) -> Compressed:
        """The leading elements (blocks) at ``index`` (a 1-D integer tensor, on this device)."""
        self._check_stackable(self)
        return self._restacked(
            len(index), lambda name: [getattr(self, name)], lambda ts: ts[0].index_select(0, index)
        )

    def _check_stackable(self, other: Compressed) -> None:
        """Raise :class:`TensorError` unless ``other`` stacks with ``self`` on dim 0."""
        same = (
            other.config == self.config
            and other.dtype == self.dtype
            and other.device == self.device
            and other.block_size == self.block_size
            and len(self.shape) >= 3
            and other.shape[1:] == self.shape[1:]
            and (other.body_shape is None) == (self.body_shape is None)
            and (self.body_shape is None or other.body_shape[1:] == self.body_shape[1:])
            and all(
                (getattr(other, name) is None) == (getattr(self, name) is None)
                for name in ("base", "outliers", "lowrank", "sketch", "full_precision", "sink")
            )
        )
        if not same:
            raise TensorError("Compressed parts differ in config, dtype, device or trailing shape")
        packed = isinstance(self.base, Quantized | CodebookQuantized)
        if packed and math.prod(self.base.shape[1:]) % 8:
            raise TensorError("packed codes of a block must be a multiple of 8 codes to stack")

    def _restacked(
        self,
        n: int,
        gather: Callable[[str], list],
        join: Callable[[list[Tensor]], Tensor],
    ) -> Compressed:
        """This container with ``n`` leading elements: ``gather(name)`` lists the attribute
        ``name`` of every source, ``join`` makes one tensor of their tensors on dim 0 (packed
        codes viewed as ``[elements, bytes]`` first)."""

        def piece(name: str):
            sources = gather(name)
            if sources[0] is None:
                return None
            changes: dict[str, object] = {}
            for f in fields(sources[0]):
                value = getattr(sources[0], f.name)
                if f.name == "codes":  # 1-D packed: every leading element owns equal bytes
                    rows = [s.codes.view(s.shape[0], -1) for s in sources]
                    changes["codes"] = join(rows).reshape(-1)
                elif isinstance(value, Tensor):
                    changes[f.name] = join([getattr(s, f.name) for s in sources])
                elif f.name == "shape":
                    changes["shape"] = torch.Size((n, *value[1:]))
            return replace(sources[0], **changes)

        return replace(
            self,
            shape=torch.Size((n, *self.shape[1:])),
            body_shape=None if self.body_shape is None else torch.Size((n, *self.body_shape[1:])),
            base=piece("base"),
            outliers=piece("outliers"),
            lowrank=piece("lowrank"),
            sketch=piece("sketch"),
            full_precision=None if self.full_precision is None else join(gather("full_precision")),
            sink=None if self.sink is None else join(gather("sink")),
        )

    def outlier_mask(self) -> Tensor:
        """Bool like the input: true where an outlier is kept (in rotated coordinates when
        ``rotate`` is on)."""
        body = None
        if self.body_shape is not None:
            body = torch.zeros(self.body_shape, dtype=torch.bool, device=self.device)
            if self.outliers is not None:
                body = self.outliers.mask()
        rest = None
        if self.full_precision is not None:
            rest = torch.zeros_like(self.full_precision, dtype=torch.bool)
        sink = None if self.sink is None else torch.zeros_like(self.sink, dtype=torch.bool)
        return self._join(sink, body, rest)


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TensorError("compress needs a floating-point torch.Tensor")
    if x.dim() < 2 or x.numel() == 0:
        raise TensorError(
            f"compress needs a non-empty [batch, kv_heads, seq, head_dim] tensor, got {tuple(x.shape)}"
        )


def _check_finite(x: Tensor | None) -> None:
    """Raise on NaN / Inf in ``x`` (any shape, or ``None``: nothing to check)."""
    if x is not None and not torch.isfinite(torch.stack(torch.aminmax(x))).all():
        raise TensorError("input holds NaN or Inf values")


def _check_ignore(ignore: Tensor, x: Tensor) -> None:
    ok = isinstance(ignore, Tensor) and ignore.dtype == torch.bool and ignore.dim() == x.dim()
    try:
        ok = ok and torch.broadcast_shapes(ignore.shape, x.shape) == x.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise TensorError(f"ignore must be a bool tensor broadcastable to {tuple(x.shape)}")


def _split(x: Tensor, block_size: int | None) -> tuple[Tensor | None, Tensor | None]:
    """``(body, rest)``: full blocks as ``[..., n_blocks, n_b, d]`` and the trailing tokens."""
    if block_size is None:
        return x, None
    seq = x.shape[-2]
    blocks = seq // block_size
    used = blocks * block_size
    body = x[..., :used, :].unflatten(-2, (blocks, block_size)) if blocks else None
    rest = x[..., used:, :] if used < seq else None
    return body, rest


def _compress_body(
    body: Tensor, tc: TensorCompression, ranks: Sequence[int], ignore: Tensor | None
) -> list[tuple[Quantized | CodebookQuantized | Fp8Tensor | None, Outliers | None,
                LowRank | None, Sketch | None]]:  # fmt: skip
    """Compress ``body`` ``[..., seq, d]`` once per rank, sharing everything but the low rank
    (and the QJL sketch of what the low rank leaves)."""
    seq, dim = body.shape[-2:]
    if max(ranks) > min(seq, dim):
        raise ConfigError(
            f"rank {max(ranks)} exceeds min(seq, head_dim) = {min(seq, dim)} of a {seq}x{dim} block"
        )
    # None: the torch reference (also where the compiled path found NaN / Inf in body)
    compiled = cpu_kernel.compress_body(body, tc, ranks, ignore)
    if compiled is not None:
        base, outliers, factors = compiled
        return [(base, outliers, f, None) for f in factors]
    _check_finite(body)
    work = compute_dtype(body.dtype)
    source = body
    if tc.rotate:
        source = rotate(body.to(work), tc.seed).to(body.dtype)
        if not torch.isfinite(torch.stack(torch.aminmax(source))).all():
            name = str(body.dtype).removeprefix("torch.")
            raise TensorError(f"rotated values exceed the {name} range; compress without rotate")
    outliers = None
    if outlier_count(tc.outliers, body.shape[group_dim(tc.outlier_axis)]) > 0:
        outliers = extract_outliers(source, tc.outliers, tc.outlier_mode, tc.outlier_axis, ignore)
    exclude = outliers.mask() if outliers is not None else None
    if ignore is not None:
        exclude = ignore.expand(body.shape) if exclude is None else exclude | ignore
    x = source.to(work)
    base: Quantized | CodebookQuantized | Fp8Tensor | None = None
    bits = None if tc.bits is None else tc.bits - tc.qjl  # qjl: the last bit is the sketch's
    fit_residual = max(ranks) > 0 or tc.qjl
    residual = None  # X - D, filled in only when a low rank or a sketch is fitted
    if tc.codebook is not None:
        base, reconstruction = codebook_quantize(
            x, bits, tc.codebook, tc.axis, tc.group_size, exclude
        )
        residual = reconstruction if fit_residual else None
    elif bits is not None and fit_residual:
        base, residual = quantize_reconstruct(x, bits, tc.axis, tc.group_size, exclude)
    elif bits is not None:
        base = quantize(x, bits, tc.axis, tc.group_size, exclude)
    elif tc.fp8 is not None:
        per_tensor = tc.fp8_scale == "tensor"
        base = fp8_quantize(x, tc.fp8, tc.axis, tc.group_size, exclude, per_tensor)
    factors: list[LowRank | None] = [None] * len(ranks)
    if fit_residual:
        if residual is None:
            residual = base.dequantize(work) if base is not None else torch.zeros_like(x)
        torch.sub(x, residual, out=residual)
        if outliers is not None:
            outliers.clear(residual)
        if ignore is not None:
            residual.masked_fill_(ignore, 0.0)
    if max(ranks) > 0:
        if tc.lowrank == "svd":
            full = svd_lowrank(residual, max(ranks), tc.factor_dtype)
            factors = [full.truncate(r) if r else None for r in ranks]
        else:
            fitted = [r for r in ranks if r]
            kept = power_lowrank_ranks(residual, fitted, tc.loops, tc.seed, tc.factor_dtype)
            by_rank = dict(zip(fitted, kept, strict=True))
            factors = [by_rank.get(r) for r in ranks]
    sketches: list[Sketch | None] = [None] * len(ranks)
    if tc.qjl:
        sketches = [_sketch(residual, f, outliers, ignore, tc.seed) for f in factors]
    return [(base, outliers, f, s) for f, s in zip(factors, sketches, strict=True)]


def _sketch(
    residual: Tensor,
    lowrank: LowRank | None,
    outliers: Outliers | None,
    ignore: Tensor | None,
    seed: int,
) -> Sketch:
    """The QJL sketch (Zandieh et al. 2024) of what ``D + L`` leave of ``X`` (``residual`` is
    ``X - D``), zero at kept outliers and ignored entries."""
    if lowrank is None:
        return qjl_sketch(residual, seed)
    rest = residual - lowrank.product(residual.dtype)
    if outliers is not None:
        outliers.clear(rest)
    if ignore is not None:
        rest.masked_fill_(ignore, 0.0)
    return qjl_sketch(rest, seed)


def _resolve(config: TensorCompression | CompressionConfig, kind: str):
    """``(settings of kind, block_size, sinks)``."""
    if isinstance(config, CompressionConfig):
        return config.for_kind(kind), config.block_size, config.sinks
    if isinstance(config, TensorCompression):
        return config, None, 0
    raise ConfigError(
        f"config must be a TensorCompression or CompressionConfig, got {type(config).__name__}"
    )


def compress_ranks(
    x: Tensor,
    config: TensorCompression | CompressionConfig,
    ranks: Sequence[int],
    kind: str = "keys",
    *,
    ignore: Tensor | None = None,
) -> list[Compressed]:
    """:func:`compress` at each of ``ranks`` (the config's own rank is ignored), sharing the
    rotation, outliers, quantization and one low-rank fit of the residual at the largest rank.
    ``lowrank="svd"``: one SVD truncated to each rank; every result equals a separate
    :func:`compress` call. ``"power"``: one power iteration at the largest rank, whose result
    equals a separate call; each smaller rank is the best approximation of its rank within
    that subspace (:func:`~gear_lab.compression.lowrank.power_lowrank_ranks`), so it depends on
    the largest rank asked for and matches a separate call only to within the power
    iteration's tolerance (usually a lower error)."""
    ranks = list(ranks)
    if not ranks:
        return []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"ranks must be integers >= 0, got {r!r}")
    tc, block_size, sinks = _resolve(config, kind)
    _check_input(x)
    if ignore is not None:
        _check_ignore(ignore, x)
    sink = x[..., :sinks, :] if sinks else None  # attention sinks: kept as they are
    body, rest = _split(x[..., sinks:, :], block_size) if sinks < x.shape[-2] else (None, None)
    ignored_body = None
    if ignore is not None and body is not None:
        ignored_body = _split(ignore.expand(x.shape)[..., sinks:, :], block_size)[0]
    common = {"shape": x.shape, "dtype": x.dtype, "device": x.device, "block_size": block_size}
    identity = Compressed(config=tc, body_shape=None, full_precision=x, **common)
    configs = {r: replace(tc, rank=r) for r in ranks}  # validated once per distinct rank
    active = sorted(r for r, c in configs.items() if body is not None and not c.is_identity)
    for part in (sink, rest, None if active else body):  # _compress_body checks the body
        _check_finite(part)
    pieces = {}
    if active:
        pieces = dict(zip(active, _compress_body(body, tc, active, ignored_body), strict=True))
    results = []
    for r in ranks:
        if r not in pieces:
            results.append(replace(identity, config=configs[r]))
            continue
        base, outliers, factors, sketch = pieces[r]
        results.append(
            Compressed(
                config=configs[r],
                body_shape=body.shape,
                base=base,
                outliers=outliers,
                lowrank=factors,
                sketch=sketch,
                full_precision=rest,
                sink=sink,
                **common,
            )
        )
    return results


def compress(
    x: Tensor,
    config: TensorCompression | CompressionConfig,
    kind: str = "keys",
    *,
    ignore: Tensor | None = None,
) -> Compressed:
    """Compress ``x`` ``[batch, kv_heads, seq, head_dim]`` with ``config`` (its ``kind`` settings
    when a :class:`CompressionConfig`, block-wise when that has ``block_size``; its first
    ``sinks`` tokens kept as they are, :attr:`Compressed.sink`).

    ``ignore`` (bool, broadcastable to ``x``, e.g. ``[batch, 1, seq, 1]`` for padding) marks
    entries left out of the outlier choice, the quantization statistics and the low-rank fit.
    NaN / Inf input raises :class:`TensorError`; a rank above ``min(seq, head_dim)`` (of a
    block) raises :class:`ConfigError`. The result always decompresses to finite values: input
    whose scales, low-rank factors or rotation do not fit their storage dtype raises
    :class:`TensorError`, and values far below the float16 resolution of the scales warn with
    :class:`~gear_lab.errors.PrecisionWarning`.
    """
    tc = _resolve(config, kind)[0]
    return compress_ranks(x, config, [tc.rank], kind, ignore=ignore)[0]
