"""GEAR composition ``X_hat = D + L + S`` (Kang et al. 2024) and the :class:`Compressed` container.

Inputs are ``[batch, kv_heads, seq, head_dim]`` (any ``[..., seq, head_dim]`` works the same
way: leading dimensions are independent matrices), any float dtype, CPU or CUDA. Order:
optional rotation of head_dim; outliers ``S`` picked and removed; the backbone ``D`` quantized
with statistics that exclude outlier positions; the low rank ``L`` fitted to the residual
``X - D`` at non-outlier positions; reconstruction ``where(outlier, S, D + L)``.

Block-wise streaming (``CompressionConfig.block_size = n_b``): each block of ``n_b`` tokens is
compressed once with its own statistics and low rank (blocks are batched as an extra leading
dimension); a trailing partial block is kept in full precision and reported as such.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from gear_lab.compression.config import CompressionConfig, TensorCompression
from gear_lab.compression.fp8 import Fp8Tensor, fp8_quantize
from gear_lab.compression.lowrank import LowRank, power_lowrank, svd_lowrank
from gear_lab.compression.outliers import Outliers, extract_outliers, outlier_count
from gear_lab.compression.quantize import (
    Quantized,
    compute_dtype,
    group_dim,
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
    "outlier_values": "outliers",
    "outlier_indices": "outliers",
    "lowrank_left": "lowrank",
    "lowrank_right": "lowrank",
    "lowrank_left_scale": "lowrank",
    "lowrank_right_scale": "lowrank",
    "full_precision": "full_precision",
}
PARTS = ("codes", "scales", "outliers", "lowrank", "full_precision")


@dataclass(frozen=True, eq=False)
class Compressed:
    """What a compressed cache keeps for one ``[batch, kv_heads, seq, head_dim]`` tensor.

    ``body_shape``: the shape of the compressed leading tokens as the building blocks saw
    them (``[..., seq, d]``, or ``[..., n_blocks, n_b, d]`` block-wise; ``None`` when nothing
    is compressed); ``full_precision``: the tokens kept as they are (``[..., rest, d]``).
    """

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    config: TensorCompression
    block_size: int | None
    body_shape: torch.Size | None
    base: Quantized | Fp8Tensor | None = None
    outliers: Outliers | None = None
    lowrank: LowRank | None = None
    full_precision: Tensor | None = None

    @property
    def numel(self) -> int:
        """Entries of the original tensor."""
        return math.prod(self.shape)

    def tensors(self) -> dict[str, Tensor]:
        """Exactly the tensors kept (names are keys of the part table of :meth:`bytes_by_part`)."""
        kept: dict[str, Tensor] = {}
        for piece in (self.base, self.outliers, self.lowrank):
            if piece is not None:
                kept.update(piece.tensors())
        if self.full_precision is not None:
            kept["full_precision"] = self.full_precision
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
        """Bytes per part: ``codes``, ``scales``, ``outliers``, ``lowrank``, ``full_precision``."""
        sizes = dict.fromkeys(PARTS, 0)
        for name, tensor in self.tensors().items():
            sizes[_PARTS[name]] += tensor.nbytes
        return sizes

    def _body(self) -> Tensor:
        """Reconstruction of the compressed tokens, ``body_shape``, in the compute dtype."""
        work = compute_dtype(self.dtype)
        if self.base is not None:
            y = self.base.dequantize(work)
        else:
            y = torch.zeros(self.body_shape, dtype=work, device=self.device)
        if self.lowrank is not None:
            # in place: one reconstruction-sized temporary less
            y = y.add_(self.lowrank.product(work))
        if self.outliers is not None:
            y = self.outliers.scatter_into(y)
        if self.config.rotate:
            y = unrotate(y, self.config.seed)
        return y

    def _join(self, body: Tensor | None, rest: Tensor | None) -> Tensor:
        """Concatenate the body (reshaped to ``[..., tokens, d]``) and the full-precision rest."""
        pieces = [] if body is None else [body.reshape(*self.shape[:-2], -1, self.shape[-1])]
        pieces += [] if rest is None else [rest]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -2)

    def decompress(self) -> Tensor:
        """``X_hat`` with the shape, dtype and device of the input. The reconstruction, made in
        the compute dtype from finite parts, is clamped into the input dtype's finite range
        (where the input lay), so e.g. a float16 top code at 65504 + rounding stays finite."""
        body = None
        if self.body_shape is not None:
            limit = torch.finfo(self.dtype).max
            body = self._body().clamp_(-limit, limit).to(self.dtype)
        return self._join(body, self.full_precision)

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
                for name in ("base", "outliers", "lowrank", "full_precision")
            )
        )
        if not same:
            raise TensorError("Compressed parts differ in config, dtype, device or trailing shape")
        if isinstance(self.base, Quantized) and math.prod(self.base.shape[1:]) % 8:
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
            full_precision=None if self.full_precision is None else join(gather("full_precision")),
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
        return self._join(body, rest)


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TensorError("compress needs a floating-point torch.Tensor")
    if x.dim() < 2 or x.numel() == 0:
        raise TensorError(
            f"compress needs a non-empty [batch, kv_heads, seq, head_dim] tensor, got {tuple(x.shape)}"
        )
    if not torch.isfinite(torch.stack(torch.aminmax(x))).all():
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
) -> list[tuple[Quantized | Fp8Tensor | None, Outliers | None, LowRank | None]]:
    """Compress ``body`` ``[..., seq, d]`` once per rank, sharing everything but the low rank."""
    seq, dim = body.shape[-2:]
    if max(ranks) > min(seq, dim):
        raise ConfigError(
            f"rank {max(ranks)} exceeds min(seq, head_dim) = {min(seq, dim)} of a {seq}x{dim} block"
        )
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
    base: Quantized | Fp8Tensor | None = None
    residual = None  # X - D, filled in only when a low rank is fitted
    if tc.bits is not None and max(ranks) > 0:
        base, residual = quantize_reconstruct(x, tc.bits, tc.axis, tc.group_size, exclude)
    elif tc.bits is not None:
        base = quantize(x, tc.bits, tc.axis, tc.group_size, exclude)
    elif tc.fp8 is not None:
        per_tensor = tc.fp8_scale == "tensor"
        base = fp8_quantize(x, tc.fp8, tc.axis, tc.group_size, exclude, per_tensor)
    factors: list[LowRank | None] = [None] * len(ranks)
    if max(ranks) > 0:
        if residual is None:
            residual = base.dequantize(work) if base is not None else torch.zeros_like(x)
        torch.sub(x, residual, out=residual)
        if outliers is not None:
            outliers.clear(residual)
        if ignore is not None:
            residual.masked_fill_(ignore, 0.0)
        if tc.lowrank == "svd":
            full = svd_lowrank(residual, max(ranks), tc.factor_dtype)
            factors = [full.truncate(r) if r else None for r in ranks]
        else:
            factors = [
                power_lowrank(residual, r, tc.loops, tc.seed, tc.factor_dtype) if r else None
                for r in ranks
            ]
    return [(base, outliers, f) for f in factors]


def _resolve(config: TensorCompression | CompressionConfig, kind: str):
    if isinstance(config, CompressionConfig):
        return config.for_kind(kind), config.block_size
    if isinstance(config, TensorCompression):
        return config, None
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
    rotation, outliers and quantization, and, with ``lowrank="svd"``, one SVD of the residual
    truncated to each rank (with ``"power"`` one power iteration per rank). Results equal
    separate :func:`compress` calls."""
    ranks = list(ranks)
    if not ranks:
        return []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ConfigError(f"ranks must be integers >= 0, got {r!r}")
    tc, block_size = _resolve(config, kind)
    _check_input(x)
    if ignore is not None:
        _check_ignore(ignore, x)
    body, rest = _split(x, block_size)
    ignored_body = None
    if ignore is not None and body is not None:
        ignored_body = _split(ignore.expand(x.shape), block_size)[0]
    common = {"shape": x.shape, "dtype": x.dtype, "device": x.device, "block_size": block_size}
    identity = Compressed(config=tc, body_shape=None, full_precision=x, **common)
    active = sorted({r for r in ranks if body is not None and not replace(tc, rank=r).is_identity})
    pieces = {}
    if active:
        pieces = dict(zip(active, _compress_body(body, tc, active, ignored_body), strict=True))
    results = []
    for r in ranks:
        if r not in pieces:
            results.append(replace(identity, config=replace(tc, rank=r)))
            continue
        base, outliers, factors = pieces[r]
        results.append(
            Compressed(
                config=replace(tc, rank=r),
                body_shape=body.shape,
                base=base,
                outliers=outliers,
                lowrank=factors,
                full_precision=rest,
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
    when a :class:`CompressionConfig`, block-wise when that has ``block_size``).

    ``ignore`` (bool, broadcastable to ``x``, e.g. ``[batch, 1, seq, 1]`` for padding) marks
    entries left out of the outlier choice, the quantization statistics and the low-rank fit.
    NaN / Inf input raises :class:`TensorError`; a rank above ``min(seq, head_dim)`` (of a
    block) raises :class:`ConfigError`. The result always decompresses to finite values: input
    whose scales, low-rank factors or rotation do not fit their storage dtype raises
    :class:`TensorError`, and values far below the float16 resolution of the scales warn with
    :class:`~gear_lab.errors.PrecisionWarning`.
    """
    tc, _ = _resolve(config, kind)
    return compress_ranks(x, config, [tc.rank], kind, ignore=ignore)[0]
