"""Fused Triton kernels (optional extra ``gear-lab[kernels]``) for block-wise GEAR
compression and decompression; the torch implementation in :mod:`gear_lab.compression` is the
reference. See :mod:`gear_lab.kernels.fused` for what is covered."""

from gear_lab.kernels.fused import compress_fused, decompress_fused, fused_unavailable_reason

__all__ = ["compress_fused", "decompress_fused", "fused_unavailable_reason"]
