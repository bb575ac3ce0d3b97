"""FP8 (e4m3 / e5m2) round trip, a baseline for the quantized backbone.

Tensors are ``[..., seq, head_dim]``; each group (same grouping as
:func:`gear_lab.compress.quantize.quantize`) gets a float16 scale ``absmax / fp8_max``, and
each entry one byte, stored as the uint8 view of ``torch.float8_*``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gear_lab.compress.quantize import (
    compute_dtype,
    from_groups,
    group_dim,
    group_range,
    to_groups,
    to_half,
)

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True, eq=False)
class Fp8Tensor:
    """One fp8 byte per entry plus a float16 scale per group."""

    codes: Tensor
    scale: Tensor
    fmt: str
    axis: str
    group_size: int | None
    shape: torch.Size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reconstruction ``[..., seq, head_dim]`` in ``dtype``."""
        values = self.codes.view(FP8_DTYPES[self.fmt]).to(dtype).view(self.shape)
        grouped = to_groups(values, self.axis, self.group_size) * self.scale.to(dtype)
        return from_groups(grouped, self.axis, self.shape[group_dim(self.axis)])

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``codes`` (uint8 view of fp8) and ``scale`` (float16)."""
        return {"codes": self.codes, "scale": self.scale}


def fp8_quantize(
    x: Tensor,
    fmt: str = "e4m3",
    axis: str = "channel",
    group_size: int | None = 64,
    exclude: Tensor | None = None,
) -> Fp8Tensor:
    """Round ``x`` ``[..., seq, head_dim]`` to fp8 ``fmt`` after scaling each group's absmax
    (ignoring ``exclude``) to the format's largest finite value; all-zero groups stay zero."""
    fp8 = FP8_DTYPES[fmt]
    work = compute_dtype(x.dtype)
    grouped = to_groups(x.to(work), axis, group_size)
    if exclude is not None:
        exclude = to_groups(exclude.expand(x.shape), axis, group_size)
    lo, hi = group_range(grouped, axis, exclude)
    scale = to_half(torch.maximum(-lo, hi) / torch.finfo(fp8).max, math.inf)
    scale_w = scale.to(work)
    inverse = torch.where(scale_w > 0, scale_w.reciprocal(), torch.zeros_like(scale_w))
    limit = torch.finfo(fp8).max
    scaled = from_groups((grouped * inverse).clamp_(-limit, limit), axis, x.shape[group_dim(axis)])
    return Fp8Tensor(
        scaled.to(fp8).view(torch.uint8).reshape(-1), scale, fmt, axis, group_size, x.shape
    )
