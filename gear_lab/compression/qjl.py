"""QJL: a 1-bit quantized Johnson-Lindenstrauss sketch of a residual, for unbiased inner
products (Zandieh et al. 2024, "QJL"); the second stage of TurboQuant (Zandieh et al. 2025).

Per token vector ``r`` (the last dim, ``d = head_dim``) of a ``[..., seq, head_dim]`` tensor it
keeps ``sign(S r)`` (``m = d`` bits, packed) and ``||r||`` (float16), with ``S`` a seeded
Gaussian ``[m, d]`` matrix regenerated from the seed (no stored bytes). The estimator of
``<q, r>`` for a query ``q`` is ``sqrt(pi / 2) / m * ||r|| * <S q, sign(S r)>``: unbiased, with
variance ``(pi / 2 * ||q||^2 ||r||^2 - <q, r>^2) / m``. It is linear in ``q``, so it equals
``<q, r_hat>`` with ``r_hat = sqrt(pi / 2) / m * ||r|| * S^T sign(S r)`` (:meth:`Sketch.
reconstruct`): attention computed from the reconstruction is exactly the QJL estimator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gear_lab.compression.quantize import pack_codes, unpack_codes
from gear_lab.errors import TensorError

# S is drawn from seed + salt, so it is independent of the rotation signs and the power
# iteration's start, which are drawn from the seed itself
_SALT = 0x514A4C


def sketch_matrix(m: int, d: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The seeded Gaussian ``[m, d]`` matrix ``S`` (drawn in float64 on the CPU, so identical
    on every device)."""
    generator = torch.Generator().manual_seed((seed + _SALT) % 2**63)
    return torch.randn(m, d, generator=generator, dtype=torch.float64).to(device, dtype)


@dataclass(frozen=True, eq=False)
class Sketch:
    """``signs``: uint8 ``[..., seq, ceil(m / 8)]``, bit ``i`` of a token is ``<s_i, r> >= 0``;
    ``norm``: float16 ``[..., seq, 1]``, ``||r||``; ``shape``: the sketched ``[..., seq, d]``."""

    signs: Tensor
    norm: Tensor
    seed: int
    shape: torch.Size

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``r_hat = sqrt(pi / 2) / m * ||r|| * S^T sign(S r)`` ``[..., seq, d]`` in ``dtype``;
        ``E[r_hat] = r`` over the draw of ``S``."""
        m = d = self.shape[-1]
        flat = unpack_codes(self.signs.reshape(-1), 1, self.signs.numel() * 8)
        bits = flat.view(*self.signs.shape[:-1], -1)[..., :m]
        signs = bits.to(dtype).mul_(2).sub_(1)
        s = sketch_matrix(m, d, self.seed, self.signs.device, dtype)
        return (signs @ s).mul_(self.norm.to(dtype) * (math.sqrt(math.pi / 2) / m))

    def tensors(self) -> dict[str, Tensor]:
        """What is stored: ``sketch_signs`` (packed uint8) and ``sketch_norm`` (float16)."""
        return {"sketch_signs": self.signs, "sketch_norm": self.norm}


def qjl_sketch(r: Tensor, seed: int) -> Sketch:
    """The QJL :class:`Sketch` of every token vector of ``r`` ``[..., seq, d]`` (float32 or
    float64) with ``m = d`` signs; norms beyond the float16 range raise :class:`TensorError`."""
    m = d = r.shape[-1]
    bits = (r @ sketch_matrix(m, d, seed, r.device, r.dtype).mT >= 0).to(torch.uint8)
    signs = pack_codes(F.pad(bits, (0, -m % 8)), 1).view(*r.shape[:-1], -1)
    norm = torch.linalg.vector_norm(r, dim=-1, keepdim=True).to(torch.float16)
    if not torch.isfinite(norm).all():
        raise TensorError("residual norms exceed the float16 range of the QJL sketch")
    return Sketch(signs, norm, seed, r.shape)
