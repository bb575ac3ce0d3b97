"""Uniform asymmetric (min/max) grouped quantization, 1 to 8 bits, with dense bit packing.

The quantized backbone ``D`` of GEAR (Kang et al. 2024, section 3) and of KIVI / KCVT.
Tensors are ``[..., seq, head_dim]`` (canonically ``[batch, kv_heads, seq, head_dim]``).
``axis="channel"``: a group is ``group_size`` consecutive tokens of one channel;
``axis="token"``: ``group_size`` consecutive channels of one token; ``group_size=None``: the
whole axis (KCVT). A last group shorter than ``group_size`` is quantized on its own entries.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from gear_lab.errors import PrecisionWarning, TensorError

_HALF_RESOLUTION = 2.0**-24  # the smallest positive float16 (subnormal)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float dtype arithmetic runs in: float32, or float64 for float64 input."""
    return torch.promote_types(dtype, torch.float32)


def group_dim(axis: str) -> int:
    """The dimension of ``[..., seq, head_dim]`` along which ``axis`` groups run."""
    return -2 if axis == "channel" else -1


def to_groups(x: Tensor, axis: str, group_size: int | None) -> Tensor:
    """View ``x`` ``[..., seq, d]`` with the grouped dimension split into ``(groups, size)``.

    ``channel``: ``[..., n_groups, size, d]``; ``token``: ``[..., seq, n_groups, size]``; the
    group members sit along :func:`group_dim`. A short last group is padded by repeating its
    last entry, which leaves min, max and absmax of the group unchanged.
    """
    dim = group_dim(axis)
    n = x.shape[dim]
    size = n if group_size is None else min(group_size, n)
    groups = math.ceil(n / size)
    pad = groups * size - n
    if pad:
        sizes = list(x.shape)
        sizes[dim] = pad
        x = torch.cat([x, x.narrow(dim, n - 1, 1).expand(sizes)], dim)
    return x.unflatten(dim, (groups, size))


def from_groups(grouped: Tensor, axis: str, n: int) -> Tensor:
    """Inverse of :func:`to_groups`: merge the group dimensions, drop the padding."""
    dim = group_dim(axis)
    return grouped.flatten(dim - 1, dim).narrow(dim, 0, n)


def _affine(codes: Tensor, scale: Tensor, zero: Tensor, out: Tensor) -> Tensor:
    """``out = codes * scale + zero`` (grouped views; ``out`` may be ``codes``), rounded after
    the product and after the sum (not one fused multiply-add): the one reconstruction formula
    of :meth:`Quantized.dequantize` and :func:`quantize_reconstruct`."""
    return torch.mul(codes, scale, out=out).add_(zero)


def group_range(grouped: Tensor, axis: str, exclude: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-group (min, max) of a :func:`to_groups` view, ignoring ``exclude`` (same view).

    Groups with every entry excluded get (0, 0).
    """
    dim = group_dim(axis)
    if exclude is None:
        return grouped.amin(dim, keepdim=True), grouped.amax(dim, keepdim=True)
    lo = torch.where(exclude, math.inf, grouped).amin(dim, keepdim=True)
    hi = torch.where(exclude, -math.inf, grouped).amax(dim, keepdim=True)
    empty = lo > hi
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def to_half(value: Tensor, direction: float) -> Tensor:
    """Round to float16 towards ``direction`` (``-inf`` or ``inf``); overflow raises
    :class:`TensorError` (fp16 metadata cannot hold it)."""
    half = value.to(torch.float16)
    wrong = half.to(value.dtype) < value if direction > 0 else half.to(value.dtype) > value
    half = torch.where(wrong, torch.nextafter(half, torch.full_like(half, direction)), half)
    if not torch.isfinite(half).all():
        raise TensorError("values exceed the float16 range of the scales / zero points")
    return half


def _lanes(width: int, keep: int) -> int:
    """A 64-bit mask keeping the low ``keep`` bits of every ``width``-bit lane."""
    lane = (1 << keep) - 1
    return sum(lane << shift for shift in range(0, 64, width))


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes ``< 2**bits`` densely into uint8: every 8 codes fill ``bits`` bytes
    (e.g. four 2-bit codes per byte; 3-bit codes cross byte boundaries). Code ``i`` of each 8
    sits at bit ``bits * i`` (little endian). Returns ``ceil(numel / 8) * bits`` bytes, 1-D.

    Each 8 codes are read as one int64 and compacted in three shift-and-mask steps.
    """
    flat = codes.reshape(-1).to(torch.uint8)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat
    words = flat.view(torch.int64)
    for width in (16, 32, 64):  # join the two halves of every lane: k bits each
        k = bits * width // 16
        low = _lanes(width, k)
        words = (words & low) | ((words >> (width // 2 - k)) & (low << k))
    # contiguous: for 1 bit the slice is a strided view that would keep all 8 bytes alive
    return words.view(torch.uint8).view(-1, 8)[:, :bits].reshape(-1).contiguous()


# a dtype of each width, to read a byte's codes as one element
_WIDE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


@functools.cache
def _code_table(bits: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The codes each byte holds (``bits`` dividing 8), as ``dtype``: ``[256]`` elements of a
    dtype as wide as the ``8 // bits`` codes (a 1-D gather is several times faster than one of
    rows), else ``[256, 8 // bits]``."""
    shifts = torch.arange(0, 8, bits)
    table = ((torch.arange(256)[:, None] >> shifts) & ((1 << bits) - 1)).to(device, dtype)
    wide = _WIDE.get(table.shape[1] * table.element_size())
    return table if wide is None else table.view(wide).view(-1)


def unpack_codes(packed: Tensor, bits: int, numel: int, dtype: torch.dtype = torch.uint8) -> Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as a 1-D tensor of ``dtype``
    (uint8 by default; a float dtype gives them as numbers without an integer pass).

    Widths that divide 8 (1, 2, 4 bits) never cross a byte: every byte is looked up in a table
    of the ``8 // bits`` codes it holds (one gather); other widths undo the three
    shift-and-mask steps."""
    if bits == 8:
        return packed[:numel].to(dtype)
    if 8 % bits == 0:
        per_byte = 8 // bits
        used = packed[: -(-numel // per_byte)].to(torch.int32)
        codes = _code_table(bits, dtype, packed.device).index_select(0, used)
        return codes.view(dtype).view(-1)[:numel]
    rows = packed.view(-1, bits)
    words = torch.zeros(rows.shape[0], 8, dtype=torch.uint8, device=packed.device)
    words[:, :bits] = rows
    words = words.view(torch.int64)
    for width in (64, 32, 16):  # split every lane's 2k low bits into its two halves
        k = bits * width // 16
        low = _lanes(width, k)
        words = (words & low) | ((words & (low << k)) << (width // 2 - k))
    return words.view(torch.uint8).reshape(-1)[:numel].to(dtype)


def leading_like(t: Tensor, out: Tensor) -> Tensor:
    """``t`` ``[n, ...]`` viewed with ``out``'s leading dims, where ``out`` has ``t``'s shape
    but for ``n`` split into several (``[rows, blocks, ...]`` for ``[rows * blocks, ...]``)."""
    return t.unflatten(0, out.shape[: out.dim() - t.dim() + 1])


@dataclass(frozen=True, eq=False)
class Quantized:
    """Packed codes plus float16 scale and zero point per group (``x ~ zero + code * scale``)."""

    codes: Tensor
    scale: Tensor
    zero: Tensor
    bits: int
    axis: str
    group_size: int | None
    shape: torch.Size

    def dequantize(self, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """The reconstruction ``[..., seq, head_dim]`` in ``dtype``, written into ``out`` when
        given (``dtype``; this shape, or with the leading dim split as :func:`leading_like`
        reads it; any strides, e.g. a view of a cache's buffer)."""
        codes = unpack_codes(self.codes, self.bits, math.prod(self.shape), dtype)
        kept = (codes.view(self.shape), self.scale.to(dtype), self.zero.to(dtype))
        if out is not None:  # scale and zero have a group dim more: split explicitly
            split = out.shape[: out.dim() - len(self.shape) + 1]
            kept = tuple(t.unflatten(0, split) for t in kept)
        codes, scale, zero = kept
        dim = group_dim(self.axis)
        n = self.shape[dim]
        grouped = to_groups(codes, self.axis, self.group_size)
        if out is None or grouped.shape[dim] * grouped.shape[dim - 1] != n:
            # a new tensor, or a short last group padded: reconstruct, then copy
            values = from_groups(_affine(grouped, scale, zero, grouped), self.axis, n)
            return values if out is None else out.copy_(values)
        _affine(grouped, scale, zero, to_groups(out, self.axis, self.group_size))
        return out

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``codes`` (packed uint8), ``scale``, ``zero`` (float16)."""
        return {"codes": self.codes, "scale": self.scale, "zero": self.zero}


def _quantize(
    x: Tensor, bits: int, axis: str, group_size: int | None, exclude: Tensor | None
) -> tuple[Quantized, Tensor]:
    """The :class:`Quantized` of ``x`` and its codes as floats in the :func:`to_groups` view."""
    levels = (1 << bits) - 1
    work = compute_dtype(x.dtype)
    grouped = to_groups(x.to(work), axis, group_size)
    if exclude is not None:
        exclude = to_groups(exclude.expand(x.shape), axis, group_size)
    lo, hi = group_range(grouped, axis, exclude)
    zero = to_half(lo, -math.inf)
    scale = to_half((hi - zero.to(work)) / levels, math.inf)
    scale_w = scale.to(work)
    _warn_unresolved(lo, hi, zero.to(work), scale_w, levels)
    inverse = torch.where(scale_w > 0, scale_w.reciprocal(), torch.zeros_like(scale_w))
    codes = torch.sub(grouped, zero.to(work)).mul_(inverse).round_().clamp_(0, levels)
    packed = pack_codes(from_groups(codes.to(torch.uint8), axis, x.shape[group_dim(axis)]), bits)
    return Quantized(packed, scale, zero, bits, axis, group_size, x.shape), codes


def _warn_unresolved(lo: Tensor, hi: Tensor, zero: Tensor, scale: Tensor, levels: int) -> None:
    """Warn (:class:`PrecisionWarning`) when a group's float16 zero point and scale bound its
    error by more than twice the exact half step and more than float16's relative precision:
    its values are far below float16 resolution (about 6e-8), e.g. 1e-9."""
    step = (hi - lo) / levels
    error = torch.where(scale > 0, scale / 2, lo - zero)  # worst error with the stored pair
    allowed = torch.maximum(step, torch.maximum(lo.abs(), hi.abs()) * 2.0**-9)
    if bool((error > allowed).any()):
        warn_unresolved()


def warn_unresolved() -> None:
    """The :class:`PrecisionWarning` for values below the float16 resolution of the scales."""
    warnings.warn(
        f"values below the float16 resolution of the scales / zero points "
        f"({_HALF_RESOLUTION:.2g}) are reconstructed with large relative error; "
        "scale the input up or keep it in full precision",
        PrecisionWarning,
        stacklevel=5,
    )


def quantize(
    x: Tensor,
    bits: int,
    axis: str = "channel",
    group_size: int | None = 64,
    exclude: Tensor | None = None,
) -> Quantized:
    """Quantize ``x`` ``[..., seq, head_dim]`` to ``bits`` bits per entry, grouped along ``axis``.

    Statistics ignore entries where ``exclude`` (bool, broadcastable to ``x``) is set, e.g.
    outliers kept elsewhere or padding. The zero point is rounded down and the scale up to
    float16, so every non-excluded entry is within half a step of its reconstruction; a
    constant group gets scale 0 and is exact (for float16 / bfloat16 input).
    """
    return _quantize(x, bits, axis, group_size, exclude)[0]


def quantize_reconstruct(
    x: Tensor,
    bits: int,
    axis: str = "channel",
    group_size: int | None = 64,
    exclude: Tensor | None = None,
) -> tuple[Quantized, Tensor]:
    """:func:`quantize` plus its reconstruction (equal to ``dequantize`` in the compute dtype),
    made from the codes at hand instead of unpacking them again."""
    q, codes = _quantize(x, bits, axis, group_size, exclude)
    work = codes.dtype
    values = _affine(codes, q.scale.to(work), q.zero.to(work), codes)
    return q, from_groups(values, axis, x.shape[group_dim(axis)])
