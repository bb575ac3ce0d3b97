"""Orthogonal rotation of head_dim before quantization (beyond GEAR; as in QuaRot / SpinQuant):
a normalised Walsh-Hadamard matrix with seeded random sign flips, inverted after.

Tensors are ``[..., seq, head_dim]``; head_dim must be a power of two. The rotation is
regenerated from the seed, so it costs no stored bytes per tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gear_lab.errors import ConfigError


def hadamard_rotation(dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Orthogonal ``[dim, dim]`` matrix ``diag(signs) @ H / sqrt(dim)`` (H: Sylvester Hadamard)."""
    if dim < 1 or dim & (dim - 1):
        raise ConfigError(f"rotate needs a power-of-two head_dim, got {dim}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim, 1), generator=generator).to(torch.float64) * 2 - 1
    return (signs * h / dim**0.5).to(device, dtype)


def rotate(x: Tensor, seed: int) -> Tensor:
    """``x @ M`` for ``x`` ``[..., seq, head_dim]`` (float32 or float64)."""
    return x @ hadamard_rotation(x.shape[-1], seed, x.device, x.dtype)


def unrotate(y: Tensor, seed: int) -> Tensor:
    """Inverse of :func:`rotate`: ``y @ M^T``."""
    return y @ hadamard_rotation(y.shape[-1], seed, y.device, y.dtype).mT
