"""Non-uniform scalar quantization with Lloyd-Max codebooks (Lloyd 1982; Max 1960).

Tensors are ``[..., seq, head_dim]``, grouped as in :mod:`gear_lab.compression.quantize`
(``axis="channel"``: a group is ``group_size`` tokens of one channel; ``axis="token"``:
``group_size`` channels of one token). Each group is normalized, each normalized entry is
coded as its nearest level of a ``2**bits``-level codebook, and codes are packed densely.

Codebooks (``TensorCompression.codebook``):

- ``"gaussian"``: fixed levels, Lloyd-Max for N(0, 1), after normalizing each group by its
  mean and standard deviation (for rotated inputs, whose entries are close to Gaussian);
- ``"sphere"``: fixed levels, Lloyd-Max for one coordinate of a uniform random unit vector in
  ``R^n`` (density proportional to ``(1 - t^2)^((n - 3) / 2)``, ``n`` the group size), after
  dividing each group by its L2 norm: TurboQuant's scalar quantizer (Zandieh et al. 2025);
- ``"fitted"``: a codebook per channel (``axis="channel"``) or per token (``axis="token"``),
  fitted by 1-D k-means (Lloyd's algorithm) on that vector's mean/std-normalized entries;
- ``"fitted-head"``: one fitted codebook per ``[seq, head_dim]`` matrix (per head, and per
  block block-wise), on all its normalized entries (KVQuant's non-uniform datatype, Hooper et
  al. 2024, with the calibration set being the tensor itself).

Fitted codebooks are calibrated on the tensor being compressed (in a live cache: the prompt,
then each block; on a dump: that dump's tensor) and kept as float16 data; fixed codebooks are
regenerated from ``bits`` (and ``n``) and cost no bytes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gear_lab.compression.quantize import (
    compute_dtype,
    from_groups,
    group_dim,
    pack_codes,
    to_groups,
    to_half,
    unpack_codes,
)

FITTED = ("fitted", "fitted-head")
KMEANS_ITERATIONS = 20  # Lloyd iterations of a fitted codebook, from quantile starts
_GRID = 1 << 20  # cells of the density grid of a fixed codebook
_LLOYD_TOLERANCE = 1e-12
# Lloyd converges slowly with many levels: up to 6 bits it reaches the tolerance within this
# many iterations; at 8 bits it stops about 1e-4 from the optimum (a second-order MSE loss)
_LLOYD_MAX_ITERATIONS = 20_000


def _lloyd_max(density: np.ndarray, edges: np.ndarray, levels: int) -> np.ndarray:
    """Lloyd-Max levels of the density sampled at the centres of the cells ``edges`` (float64):
    started at the quantiles of ``density^(1/3)`` (the high-resolution optimum, Panter and
    Dite 1951), then alternating midpoint boundaries and conditional means until the levels
    move by less than the tolerance (or the iteration cap); symmetrized."""
    centres = (edges[:-1] + edges[1:]) / 2
    mass = density / density.sum()
    cum_mass = np.concatenate([[0.0], np.cumsum(mass)])
    cum_moment = np.concatenate([[0.0], np.cumsum(mass * centres)])
    compander = np.concatenate([[0.0], np.cumsum(np.cbrt(mass))])
    q = np.interp((np.arange(levels) + 0.5) / levels, compander / compander[-1], edges)
    for _ in range(_LLOYD_MAX_ITERATIONS):
        bounds = np.concatenate([edges[:1], (q[1:] + q[:-1]) / 2, edges[-1:]])
        cell_mass = np.diff(np.interp(bounds, edges, cum_mass))
        new = np.diff(np.interp(bounds, edges, cum_moment)) / np.maximum(cell_mass, 1e-300)
        done = np.abs(new - q).max() < _LLOYD_TOLERANCE
        q = new
        if done:
            break
    return (q - q[::-1]) / 2


@functools.lru_cache(maxsize=64)
def _fixed_levels(bits: int, codebook: str, n: int) -> Tensor:
    if codebook == "gaussian":
        edges = np.linspace(-12.0, 12.0, _GRID + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        density = np.exp(-(centres**2) / 2)
    else:
        edges = np.linspace(-1.0, 1.0, _GRID + 1)
        centres = (edges[:-1] + edges[1:]) / 2
        density = (1.0 - centres**2) ** ((n - 3) / 2)
    return torch.from_numpy(_lloyd_max(density, edges, 1 << bits))


def lloyd_max_levels(bits: int, codebook: str = "gaussian", n: int = 0) -> Tensor:
    """The ``2**bits`` sorted Lloyd-Max levels (float64, CPU) of N(0, 1) (``"gaussian"``) or of
    one coordinate of a uniform unit vector in ``R^n`` (``"sphere"``), computed once per
    setting by Lloyd's iteration on a fine grid of the density (e.g. 1 bit, Gaussian:
    ``+-sqrt(2 / pi)``)."""
    return _fixed_levels(bits, codebook, n if codebook == "sphere" else 0)


def fit_codebooks(samples: Tensor, valid: Tensor, levels: int) -> Tensor:
    """1-D k-means per row: ``samples`` ``[..., n]`` (``valid``: bool like it, the entries that
    count) -> sorted levels ``[..., levels]``, each row started at its valid entries' quantiles
    ``(i + 1/2) / levels`` and refined by :data:`KMEANS_ITERATIONS` Lloyd iterations (an empty
    cell keeps its level; a row without valid entries gets zeros)."""
    count = valid.sum(-1, keepdim=True)
    ordered = samples.masked_fill(~valid, math.inf).sort(-1).values
    ranks = (torch.arange(levels, device=samples.device) + 0.5) / levels
    pos = (ranks * count).long().clamp(max=samples.shape[-1] - 1)
    books = ordered.gather(-1, pos).masked_fill(count == 0, 0.0)
    weight = valid.to(samples.dtype)
    for _ in range(KMEANS_ITERATIONS):
        cells = nearest(samples, books)
        sums = torch.zeros_like(books).scatter_add_(-1, cells, samples * weight)
        counts = torch.zeros_like(books).scatter_add_(-1, cells, weight)
        books = torch.where(counts > 0, sums / counts.clamp_min(1), books).sort(-1).values
    return books


def nearest(z: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the sorted ``levels`` for every entry of ``z``: ``levels`` 1-D
    (shared) or ``[..., L]`` with rows matching ``z`` ``[..., n]``; ties go to the lower level."""
    bounds = (levels[..., 1:] + levels[..., :-1]) / 2
    if levels.dim() == 1:
        return torch.bucketize(z.contiguous(), bounds)
    return torch.searchsorted(bounds.contiguous(), z.contiguous())


def _rows(t: Tensor, codebook: str, axis: str) -> Tensor:
    """``t`` ``[..., seq, d]`` as one row per fitted codebook: ``[..., d, seq]`` per channel,
    ``[..., seq, d]`` per token, ``[..., 1, seq * d]`` per matrix."""
    if codebook == "fitted-head":
        return t.flatten(-2).unsqueeze(-2)
    return t.mT if axis == "channel" else t


def _unrows(rows: Tensor, codebook: str, axis: str, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_rows`."""
    if codebook == "fitted-head":
        return rows.reshape(shape)
    return rows.mT if axis == "channel" else rows


def _group_len(n: int, group_size: int | None) -> int:
    return n if group_size is None else min(group_size, n)


@dataclass(frozen=True, eq=False)
class CodebookQuantized:
    """Packed codes, a float16 ``scale`` (and ``zero``, except for ``"sphere"``) per group, and
    for fitted codebooks the float16 ``levels`` ``[..., books, 2**bits]``:
    ``x ~ zero + scale * level[code]``."""

    codes: Tensor
    scale: Tensor
    zero: Tensor | None
    levels: Tensor | None
    bits: int
    codebook: str
    axis: str
    group_size: int | None
    shape: torch.Size

    def _lookup(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        """Level values of ``codes`` ``[..., seq, d]`` (int64) in ``dtype``."""
        if self.levels is None:
            n = _group_len(self.shape[group_dim(self.axis)], self.group_size)
            return lloyd_max_levels(self.bits, self.codebook, n).to(codes.device, dtype)[codes]
        rows = _rows(codes, self.codebook, self.axis)
        values = self.levels.to(dtype).gather(-1, rows)
        return _unrows(values, self.codebook, self.axis, codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reconstruction ``[..., seq, head_dim]`` in ``dtype``."""
        codes = unpack_codes(self.codes, self.bits, math.prod(self.shape)).view(self.shape)
        return _denormalize(self._lookup(codes.long(), dtype), self)

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``codes`` (packed uint8), ``scale`` and ``zero`` (float16), and
        ``codebook`` (float16) when fitted."""
        kept = {
            "codes": self.codes,
            "scale": self.scale,
            "zero": self.zero,
            "codebook": self.levels,
        }
        return {name: t for name, t in kept.items() if t is not None}


def _denormalize(values: Tensor, q: CodebookQuantized) -> Tensor:
    """``zero + scale * values`` per group, ``values`` ``[..., seq, d]``."""
    grouped = to_groups(values, q.axis, q.group_size).mul_(q.scale.to(values.dtype))
    if q.zero is not None:
        grouped = grouped.add_(q.zero.to(values.dtype))
    return from_groups(grouped, q.axis, q.shape[group_dim(q.axis)])


def _valid(grouped: Tensor, axis: str, n: int, exclude: Tensor | None) -> Tensor:
    """Bool in the :func:`to_groups` view: true at real (not padding), non-excluded entries."""
    dim = group_dim(axis)
    groups, size = grouped.shape[dim - 1], grouped.shape[dim]
    real = torch.arange(groups * size, device=grouped.device).view(groups, size) < n
    real = real if axis == "token" else real.unsqueeze(-1)
    return real.expand(grouped.shape) if exclude is None else real & ~exclude


def codebook_quantize(
    x: Tensor,
    bits: int,
    codebook: str,
    axis: str = "channel",
    group_size: int | None = 64,
    exclude: Tensor | None = None,
) -> tuple[CodebookQuantized, Tensor]:
    """Quantize ``x`` ``[..., seq, head_dim]`` to ``bits``-bit codes of ``codebook`` (see the
    module docstring); returns the container and its reconstruction (equal to ``dequantize``
    in the compute dtype). Normalization statistics and fitted codebooks ignore padding and
    entries where ``exclude`` (bool, broadcastable to ``x``) is set; a group whose scale is 0
    is reconstructed as its zero point."""
    work = compute_dtype(x.dtype)
    dim, n = group_dim(axis), x.shape[group_dim(axis)]
    grouped = to_groups(x.to(work), axis, group_size)
    if exclude is not None:
        exclude = to_groups(exclude.expand(x.shape), axis, group_size)
    valid = _valid(grouped, axis, n, exclude)
    weight = valid.to(work)
    count = weight.sum(dim, keepdim=True).clamp_min(1)
    zero = None
    if codebook == "sphere":
        scale = to_half((grouped.square() * weight).sum(dim, keepdim=True).sqrt(), math.inf)
        centred = grouped
    else:
        zero = to_half((grouped * weight).sum(dim, keepdim=True) / count, -math.inf)
        centred = grouped - zero.to(work)
        var = (centred.square() * weight).sum(dim, keepdim=True) / count
        scale = to_half(var.sqrt(), math.inf)
    scale_w = scale.to(work)
    inverse = torch.where(scale_w > 0, scale_w.reciprocal(), torch.zeros_like(scale_w))
    z = from_groups(centred * inverse, axis, n)
    levels = None
    if codebook in FITTED:
        rows = _rows(z, codebook, axis)
        valid_rows = _rows(from_groups(valid, axis, n), codebook, axis)
        levels = fit_codebooks(rows, valid_rows, 1 << bits).to(torch.float16)
        codes_rows = nearest(rows, levels.to(work))
        codes = _unrows(codes_rows, codebook, axis, z.shape)
    else:
        shared = lloyd_max_levels(bits, codebook, _group_len(n, group_size)).to(x.device, work)
        codes = nearest(z, shared)
    q = CodebookQuantized(
        pack_codes(codes, bits), scale, zero, levels, bits, codebook, axis, group_size, x.shape
    )
    return q, _denormalize(q._lookup(codes, work), q)
