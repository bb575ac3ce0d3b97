"""FP8 (e4m3 / e5m2) round trip, a baseline for the quantized backbone.

Tensors are ``[..., seq, head_dim]``; each group (same grouping as
:func:`gear_lab.compression.quantize.quantize`), or each whole ``[seq, head_dim]`` matrix
(``per_tensor``), gets a float16 scale ``absmax / fp8_max``, and each entry one byte, stored
as the uint8 view of ``torch.float8_*``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from gear_lab.compression.quantize import (
    compute_dtype,
    from_groups,
    group_dim,
    group_range,
    to_groups,
    to_half,
    warn_unresolved,
)

FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True, eq=False)
class Fp8Tensor:
    """One fp8 byte per entry plus a float16 scale per group (per matrix with ``per_tensor``)."""

    codes: Tensor
    scale: Tensor
    fmt: str
    axis: str
    group_size: int | None
    shape: torch.Size
    per_tensor: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The reconstruction ``[..., seq, head_dim]`` in ``dtype``."""
        values = self.codes.view(FP8_DTYPES[self.fmt]).to(dtype)
        if self.per_tensor:
            return (values.view(*self.shape[:-2], -1) * self.scale.to(dtype)).view(self.shape)
        grouped = to_groups(values.view(self.shape), self.axis, self.group_size)
        grouped = grouped * self.scale.to(dtype)
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
    per_tensor: bool = False,
) -> Fp8Tensor:
    """Round ``x`` ``[..., seq, head_dim]`` to fp8 ``fmt`` after scaling each group's absmax
    (ignoring ``exclude``) to the format's largest finite value; all-zero groups stay zero.
    ``per_tensor``: one scale per ``[seq, head_dim]`` matrix (``axis``/``group_size`` unused)."""
    if per_tensor:  # the whole matrix as one token group of seq * head_dim entries
        flat = x.flatten(-2).unsqueeze(-2)
        if exclude is not None:
            exclude = exclude.expand(x.shape).flatten(-2).unsqueeze(-2)
        grouped = fp8_quantize(flat, fmt, "token", None, exclude)
        return replace(
            grouped, scale=grouped.scale.view(*x.shape[:-2], 1), shape=x.shape, per_tensor=True
        )
    fp8 = FP8_DTYPES[fmt]
    work = compute_dtype(x.dtype)
    grouped = to_groups(x.to(work), axis, group_size)
    if exclude is not None:
        exclude = to_groups(exclude.expand(x.shape), axis, group_size)
    lo, hi = group_range(grouped, axis, exclude)
    top = torch.maximum(-lo, hi)
    scale = to_half(top / torch.finfo(fp8).max, math.inf)
    scale_w = scale.to(work)
    if bool(((top > 0) & (top < scale_w * torch.finfo(fp8).tiny)).any()):
        warn_unresolved()  # the float16 scale is so coarse that the codes fall below fp8 normals
    inverse = torch.where(scale_w > 0, scale_w.reciprocal(), torch.zeros_like(scale_w))
    limit = torch.finfo(fp8).max
    scaled = from_groups((grouped * inverse).clamp_(-limit, limit), axis, x.shape[group_dim(axis)])
    return Fp8Tensor(
        scaled.to(fp8).view(torch.uint8).reshape(-1), scale, fmt, axis, group_size, x.shape
    )
