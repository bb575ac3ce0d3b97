"""Low-rank correction ``L`` of GEAR (Kang et al. 2024): rank ``r`` per ``[seq, head_dim]``
matrix, by exact SVD or by seeded randomized power (subspace) iteration.

Inputs are ``[..., seq, head_dim]`` (canonically ``[batch, kv_heads, seq, head_dim]``); every
leading index is its own matrix. Factors are stored in float16; SVD factors are
balanced as ``U sqrt(S)`` and ``sqrt(S) V^T`` and ordered by singular value, so truncating
them gives the best approximation of the smaller rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class LowRank:
    """``left`` ``[..., seq, r]`` and ``right`` ``[..., r, head_dim]``, float16."""

    left: Tensor
    right: Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def product(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``left @ right`` ``[..., seq, head_dim]`` in ``dtype``."""
        return self.left.to(dtype) @ self.right.to(dtype)

    def truncate(self, rank: int) -> LowRank:
        """The leading ``rank`` components (the best of that rank for SVD factors)."""
        return LowRank(self.left[..., :rank], self.right[..., :rank, :])

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``lowrank_left`` and ``lowrank_right``."""
        return {"lowrank_left": self.left, "lowrank_right": self.right}


def _factors(u: Tensor, s: Tensor, vh: Tensor) -> LowRank:
    root = s.clamp_min(0).sqrt()
    return LowRank(
        (u * root.unsqueeze(-2)).to(torch.float16), (root.unsqueeze(-1) * vh).to(torch.float16)
    )


def svd_lowrank(r: Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` factors of each matrix of ``r`` by exact SVD (``torch.linalg.svd``)."""
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return _factors(u[..., :rank], s[..., :rank], vh[..., :rank, :])


def gaussian_start(cols: int, rank: int, seed: int, device: torch.device, dtype: torch.dtype):
    """The seeded Gaussian ``[cols, rank]`` start block, drawn on the CPU (identical on every
    device) and shared by all matrices, so results do not depend on the batch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(cols, rank, generator=generator, dtype=torch.float64).to(device, dtype)


def power_lowrank(r: Tensor, rank: int, loops: int = 3, seed: int = 0) -> LowRank:
    """Rank-``rank`` factors by randomized subspace iteration (Halko et al. 2011): a seeded
    Gaussian start, ``loops`` applications of ``R R^T`` with QR re-orthonormalisation after
    every product; ``left`` is the orthonormal basis ``Q``, ``right`` the projection
    ``Q^T R`` (components are not ordered: use :func:`svd_lowrank` to truncate)."""
    q = torch.linalg.qr(r @ gaussian_start(r.shape[-1], rank, seed, r.device, r.dtype)).Q
    rt = r.mT
    for _ in range(loops):
        z = torch.linalg.qr(rt @ q).Q
        q = torch.linalg.qr(r @ z).Q
    return LowRank(q.to(torch.float16), (q.mT @ r).to(torch.float16))
