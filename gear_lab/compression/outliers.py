"""Sparse outliers ``S`` of GEAR (Kang et al. 2024): an exact fraction of each vector kept as is.

Tensors are ``[..., seq, head_dim]``. ``axis="token"``: the vectors are tokens (``head_dim``
entries each); ``axis="channel"``: the vectors are channels (``seq`` entries each). Each
vector keeps exactly :func:`outlier_count` entries, so the fraction does not drift with block
length or head count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gear_lab.compression.quantize import group_dim, leading_like


def outlier_count(fraction: float, length: int) -> int:
    """Entries kept per vector of ``length``: ``round(fraction * length)``, halves rounded up."""
    return math.floor(fraction * length + 0.5)


def index_dtype(length: int) -> torch.dtype:
    """The smallest integer dtype that holds positions ``0 .. length - 1``."""
    if length <= 256:
        return torch.uint8
    if length <= 2**15:
        return torch.int16
    return torch.int32


@dataclass(frozen=True, eq=False)
class Outliers:
    """``values`` (input dtype) at ``indices`` (smallest int dtype) along ``axis``; for
    ``token`` both are ``[..., seq, k]``, for ``channel`` ``[..., k, head_dim]``."""

    values: Tensor
    indices: Tensor
    axis: str
    shape: torch.Size

    def mask(self) -> Tensor:
        """Bool ``[..., seq, head_dim]``, true where an outlier is kept."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        return mask.scatter_(group_dim(self.axis), self.indices.long(), True)

    def scatter_into(self, y: Tensor) -> Tensor:
        """``y`` (``[..., seq, head_dim]``, or with the leading dim split as
        :func:`~gear_lab.compression.quantize.leading_like` reads it) with the outliers written
        in place."""
        index, values = (leading_like(t, y) for t in (self.indices.long(), self.values))
        return y.scatter_(group_dim(self.axis), index, values.to(y.dtype))

    def clear(self, y: Tensor) -> Tensor:
        """``y`` (``[..., seq, head_dim]``) with zeros written in place at the outliers."""
        return y.scatter_(group_dim(self.axis), self.indices.long(), 0.0)

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``outlier_values`` and ``outlier_indices``."""
        return {"outlier_values": self.values, "outlier_indices": self.indices}


def extract_outliers(
    x: Tensor,
    fraction: float,
    mode: str = "signed",
    axis: str = "token",
    exclude: Tensor | None = None,
) -> Outliers:
    """Pick ``outlier_count(fraction, n)`` entries of every ``axis`` vector of ``x``.

    ``signed``: the ``ceil(k / 2)`` largest and ``floor(k / 2)`` smallest values; ``magnitude``:
    the ``k`` largest ``|x|``. Entries where ``exclude`` (bool, broadcastable) is set are picked
    only when a vector has too few others. Values keep ``x``'s dtype (exact).
    """
    dim = group_dim(axis)
    k = outlier_count(fraction, x.shape[dim])
    if mode == "magnitude":
        key = x.abs()
        if exclude is not None:
            key = torch.where(exclude, -1.0, key)
        indices = key.topk(k, dim, sorted=False).indices
    else:
        high, low = k - k // 2, k // 2
        key = x if exclude is None else torch.where(exclude, -math.inf, x)
        top = key.topk(high, dim, sorted=False).indices
        key = x if exclude is None else torch.where(exclude, math.inf, x)
        key = key.scatter(dim, top, math.inf)
        bottom = key.topk(low, dim, largest=False, sorted=False).indices
        indices = torch.cat([top, bottom], dim)
    return Outliers(x.gather(dim, indices), indices.to(index_dtype(x.shape[dim])), axis, x.shape)
