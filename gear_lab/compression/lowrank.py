"""Low-rank correction ``L`` of GEAR (Kang et al. 2024): rank ``r`` per ``[seq, head_dim]``
matrix, by exact SVD or by seeded randomized power (subspace) iteration.

Inputs are ``[..., seq, head_dim]`` (canonically ``[batch, kv_heads, seq, head_dim]``); every
leading index is its own matrix. The fit runs in the input's dtype; only the kept factors are
rounded, to the ``factor_dtype`` (float16 by default, bfloat16, or float8_e4m3 with a float16
scale per rank component). SVD factors are balanced as ``U sqrt(S)`` and ``sqrt(S) V^T`` and
ordered by singular value, so truncating them gives the best approximation of the smaller rank.
Every kept pair is first balanced by powers of two (:func:`balance`) so large or tiny residuals
fit the factor dtype; factors that still overflow raise :class:`TensorError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gear_lab.errors import TensorError

FACTOR_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3": torch.float8_e4m3fn,
}
_FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@dataclass(frozen=True, eq=False)
class LowRank:
    """``left`` ``[..., seq, r]`` and ``right`` ``[..., r, head_dim]`` in the factor dtype; for
    float8 factors ``left_scale`` ``[..., 1, r]`` and ``right_scale`` ``[..., r, 1]`` (float16,
    one per rank component) multiply them back."""

    left: Tensor
    right: Tensor
    left_scale: Tensor | None = None
    right_scale: Tensor | None = None

    @classmethod
    def keep(cls, left: Tensor, right: Tensor, factor_dtype: str = "float16") -> LowRank:
        """Round fitted factors (any float dtype) to ``factor_dtype`` (a key of
        :data:`FACTOR_DTYPES`) after :func:`balance`; float8_e4m3 scales each rank component
        to ``amax / 448``. Factors that still do not fit raise :class:`TensorError`."""
        dtype = FACTOR_DTYPES[factor_dtype]
        left, right = balance(left, right)
        if dtype != torch.float8_e4m3fn:
            kept = cls(left.to(dtype), right.to(dtype))
        else:
            left_q, left_scale = _fp8(left, -2)
            right_q, right_scale = _fp8(right, -1)
            kept = cls(left_q, right_q, left_scale, right_scale)
        if not all(bool(torch.isfinite(t.float()).all()) for t in kept.tensors().values()):
            raise TensorError(
                f"values exceed the {factor_dtype} range of the low-rank factors; "
                "use factor_dtype='bfloat16' or scale the input down"
            )
        return kept

    @property
    def rank(self) -> int:
        return self.left.shape[-1]

    def product(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``left @ right`` ``[..., seq, head_dim]`` in ``dtype`` (float8 factors dequantized)."""
        left, right = self.left.to(dtype), self.right.to(dtype)
        if self.left_scale is not None:
            left = left * self.left_scale.to(dtype)
            right = right * self.right_scale.to(dtype)
        return left @ right

    def truncate(self, rank: int) -> LowRank:
        """The leading ``rank`` components (the best of that rank for SVD factors)."""
        return self.components(0, rank)

    def components(self, start: int, stop: int) -> LowRank:
        """Rank components ``start`` to ``stop`` (views)."""
        scales = (None, None)
        if self.left_scale is not None:
            scales = (self.left_scale[..., start:stop], self.right_scale[..., start:stop, :])
        return LowRank(self.left[..., start:stop], self.right[..., start:stop, :], *scales)

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``lowrank_left`` and ``lowrank_right``, plus ``lowrank_left_scale``
        and ``lowrank_right_scale`` for float8 factors."""
        kept = {"lowrank_left": self.left, "lowrank_right": self.right}
        if self.left_scale is not None:
            kept["lowrank_left_scale"] = self.left_scale
            kept["lowrank_right_scale"] = self.right_scale
        return kept


def balance(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """Scale each rank component by a power of two (``left[..., j] * 2**k``,
    ``right[..., j, :] / 2**k``) so both have about the same largest magnitude: the product is
    unchanged and neither factor over- or underflows a narrow dtype before it has to."""
    big_left = left.abs().amax(-2, keepdim=True)  # [..., 1, r]
    big_right = right.abs().amax(-1, keepdim=True).mT  # [..., 1, r]
    shift = torch.round(0.5 * (torch.log2(big_right) - torch.log2(big_left)))
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    factor = torch.exp2(shift)
    return left * factor, right / factor.mT


def _fp8(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``x`` as float8_e4m3 with a float16 scale ``amax / 448`` along ``dim`` (1 where amax is
    0); the scale is rounded to float16 first so the stored pair dequantizes consistently."""
    amax = x.abs().amax(dim=dim, keepdim=True)
    scale = (amax / _FP8_MAX).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (x / scale.to(x.dtype)).clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def _factors(u: Tensor, s: Tensor, vh: Tensor, factor_dtype: str) -> LowRank:
    root = s.clamp_min(0).sqrt()
    return LowRank.keep(u * root.unsqueeze(-2), root.unsqueeze(-1) * vh, factor_dtype)


def svd_lowrank(r: Tensor, rank: int, factor_dtype: str = "float16") -> LowRank:
    """Best rank-``rank`` factors of each matrix of ``r`` by exact SVD (``torch.linalg.svd``),
    kept in ``factor_dtype``."""
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    return _factors(u[..., :rank], s[..., :rank], vh[..., :rank, :], factor_dtype)


def gaussian_start(cols: int, rank: int, seed: int, device: torch.device, dtype: torch.dtype):
    """The seeded Gaussian ``[cols, rank]`` start block, drawn on the CPU (identical on every
    device) and shared by all matrices, so results do not depend on the batch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(cols, rank, generator=generator, dtype=torch.float64).to(device, dtype)


def power_lowrank(
    r: Tensor, rank: int, loops: int = 3, seed: int = 0, factor_dtype: str = "float16"
) -> LowRank:
    """Rank-``rank`` factors by randomized subspace iteration (Halko et al. 2011): a seeded
    Gaussian start, ``loops`` applications of ``R R^T`` with QR re-orthonormalisation after
    every product; ``left`` is the orthonormal basis ``Q``, ``right`` the projection
    ``Q^T R`` (components are not ordered: use :func:`svd_lowrank` to truncate), kept in
    ``factor_dtype`` after :func:`balance` (``left``'s columns are then orthogonal, scaled by
    powers of two)."""
    return power_lowrank_ranks(r, [rank], loops, seed, factor_dtype)[0]


def power_lowrank_ranks(
    r: Tensor, ranks: list[int], loops: int = 3, seed: int = 0, factor_dtype: str = "float16"
) -> list[LowRank]:
    """Factors at each of ``ranks`` (all >= 1) from one subspace iteration at the largest,
    ``k``: rank ``k`` gets exactly :func:`power_lowrank`'s factors; a smaller rank ``j`` the
    best rank-``j`` approximation of ``r`` within that rank-``k`` subspace (an SVD of the small
    ``Q^T R`` ``[..., k, head_dim]``, Halko et al. 2011, algorithm 5.1), ordered by singular
    value. That is not bitwise what :func:`power_lowrank` gives at rank ``j`` (its own
    ``j``-column start): the extra ``k - j`` columns oversample, so it is usually closer."""
    top = max(ranks)
    q = torch.linalg.qr(r @ gaussian_start(r.shape[-1], top, seed, r.device, r.dtype)).Q
    rt = r.mT
    for _ in range(loops):
        z = torch.linalg.qr(rt @ q).Q
        q = torch.linalg.qr(r @ z).Q
    return subspace_factors(q, q.mT @ r, ranks, factor_dtype)


def subspace_factors(
    q: Tensor, projected: Tensor, ranks: list[int], factor_dtype: str = "float16"
) -> list[LowRank]:
    """The kept factors of :func:`power_lowrank_ranks` from its fitted basis ``q``
    ``[..., seq, k]`` and projection ``projected = q^T r`` ``[..., k, head_dim]`` (``k`` the
    largest of ``ranks``); the compiled CPU path computes the same in C++."""
    top = q.shape[-1]
    below = [k for k in ranks if k < top]
    if not below:
        return [LowRank.keep(q, projected, factor_dtype)] * len(ranks)
    # SVD of the small projection from the eigenvectors of its Gram matrix, in float64
    # (several times faster than a batched gesdd on CPU): projected = U S V^T, so the
    # kept pair is (q U sqrt(S), U^T projected / sqrt(S)) over the leading components;
    # a component without energy (S = 0) gets zero factors
    gram = projected.double() @ projected.double().mT  # [..., k, k]
    energy, vectors = torch.linalg.eigh(gram)  # ascending
    keep = max(below)
    energy, vectors = energy.flip(-1)[..., :keep], vectors.flip(-1)[..., :keep]
    # one sign per component (the largest entry of its eigenvector positive), as the C++ path
    largest = vectors.gather(-2, vectors.abs().argmax(-2, keepdim=True))
    vectors = vectors * torch.where(largest < 0, -1.0, 1.0)
    root = energy.clamp_min(0).sqrt().sqrt()  # sqrt(S)
    inverse = torch.where(root > 0, root.reciprocal(), torch.zeros_like(root))
    left = q @ (vectors * root.unsqueeze(-2)).to(q.dtype)
    right = (vectors.mT @ projected.double() * inverse.unsqueeze(-1)).to(q.dtype)
    # one keep for both sets (balance and rounding act per component)
    kept = LowRank.keep(torch.cat([q, left], -1), torch.cat([projected, right], -2), factor_dtype)
    return [kept.truncate(top) if k == top else kept.components(top, top + k) for k in ranks]
