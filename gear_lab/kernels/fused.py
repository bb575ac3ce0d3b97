"""Dispatch to the fused Triton GEAR kernels (:mod:`gear_lab.kernels.gear_triton`), with the
torch implementation (:func:`gear_lab.compression.compress`) as the reference they are tested
against. Results are ordinary :class:`gear_lab.compression.Compressed` objects, in the library's
packed format, so everything downstream (sizes, metrics, ``decompress()``) works unchanged.

Covered: block-wise compression (``CompressionConfig.block_size`` = n_b, a power of two in
16..256) of ``[batch, kv_heads, seq, head_dim]`` float16 / bfloat16 / float32 tensors, head_dim
a power of two in 16..256; 1, 2, 4 or 8 bits, per-channel or per-token groups whose size is a
power of two (or the whole block / head_dim); signed or magnitude outliers along either axis;
power-iteration low rank up to rank 32 with float16 factors. Not covered (``ConfigError``):
rotation, FP8, exact SVD, other factor dtypes, 3/5/6/7 bits, non-block mode. Without Triton,
or without CUDA outside Triton's CPU interpreter (``TRITON_INTERPRET=1``),
:class:`KernelUnavailableError`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

from gear_lab.compression import (
    Compressed,
    CompressionConfig,
    LowRank,
    Outliers,
    Quantized,
    TensorCompression,
    index_dtype,
    outlier_count,
)
from gear_lab.compression.lowrank import gaussian_start
from gear_lab.errors import ConfigError, KernelUnavailableError, TensorError

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_RANK = 32


def _pow2(n: int, low: int, high: int) -> bool:
    return low <= n <= high and n & (n - 1) == 0


def fused_unavailable_reason(device: torch.device | str) -> str | None:
    """``None`` when the fused kernels can run on ``device``, else why not (one line)."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install 'gear-lab[kernels]')"
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"the fused kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got {device}"


def _require_device(device: torch.device) -> None:
    reason = fused_unavailable_reason(device)
    if reason is not None:
        raise KernelUnavailableError(reason)


def _group(tc: TensorCompression, block: int, dim: int) -> int:
    """Group size inside one ``[block, dim]`` block (as :func:`gear_lab.compression.quantize`)."""
    n = block if tc.axis == "channel" else dim
    size = n if tc.group_size is None else min(tc.group_size, n)
    if n % size or size & (size - 1):
        raise ConfigError(
            f"the fused kernel needs a power-of-two group size dividing {n}, got {tc.group_size}"
        )
    return size


def _check_settings(tc: TensorCompression, block: int | None, dim: int) -> int:
    """Validate what the kernel covers; returns the group size."""
    if block is None:
        raise ConfigError("the fused kernel is block-wise: set CompressionConfig.block_size")
    if not _pow2(block, 16, 256):
        raise ConfigError(
            f"the fused kernel needs block_size a power of two in 16..256, got {block}"
        )
    if not _pow2(dim, 16, 256):
        raise ConfigError(f"the fused kernel needs head_dim a power of two in 16..256, got {dim}")
    if tc.bits not in (1, 2, 4, 8):
        raise ConfigError(f"the fused kernel needs bits in 1, 2, 4, 8, got {tc.bits}")
    if tc.rotate or tc.fp8 is not None or tc.codebook is not None or tc.qjl:
        raise ConfigError("the fused kernel does not cover rotation, fp8, codebooks or qjl")
    if tc.rank > 0 and tc.lowrank != "power":
        raise ConfigError("the fused kernel computes the low rank by power iteration only")
    if tc.factor_dtype != "float16":
        raise ConfigError(f"the fused kernel keeps float16 factors, got {tc.factor_dtype}")
    if tc.rank > min(block, dim, MAX_RANK):
        raise ConfigError(
            f"the fused kernel covers rank <= {min(block, dim, MAX_RANK)} here, got {tc.rank}"
        )
    return _group(tc, block, dim)


@functools.lru_cache(maxsize=32)
def _omega(dim: int, rank: int, seed: int, device: torch.device) -> Tensor:
    """The power iteration's seeded Gaussian start ``[dim, rank]`` (the torch reference's),
    cached so that a GPU call does no host-to-device copy."""
    return gaussian_start(dim, rank, seed, device, torch.float32).contiguous()


def _precisions(device: torch.device) -> tuple[str, str]:
    """(power iteration, final projection) ``tl.dot`` precisions: TF32 / 3xTF32 on GPUs,
    plain fp32 in the interpreter."""
    return ("tf32", "tf32x3") if device.type == "cuda" else ("ieee", "ieee")


def compress_fused(x: Tensor, config: CompressionConfig, kind: str = "keys") -> Compressed:
    """:func:`gear_lab.compression.compress` of ``x`` ``[batch, kv_heads, seq, head_dim]`` with the
    fused kernel: same packed format, same settings; agrees with the torch reference up to
    float rounding (TF32 in the low-rank fit on GPUs) and the order of tied outliers."""
    if not isinstance(config, CompressionConfig):
        raise ConfigError("compress_fused needs a CompressionConfig with block_size set")
    tc = config.for_kind(kind)
    if not isinstance(x, Tensor) or x.dtype not in _DTYPES or x.dim() < 2 or x.numel() == 0:
        raise TensorError("compress_fused needs a non-empty float16/bfloat16/float32 tensor")
    block, (seq, dim) = config.block_size, x.shape[-2:]
    group = _check_settings(tc, block, dim)
    _require_device(x.device)
    n_blocks = seq // block
    used = n_blocks * block
    common = {
        "shape": x.shape,
        "dtype": x.dtype,
        "device": x.device,
        "config": tc,
        "block_size": block,
    }
    if n_blocks == 0 or tc.is_identity:
        return Compressed(body_shape=None, full_precision=x, **common)
    from gear_lab.kernels.gear_triton import gear_compress_kernel

    lead = tuple(x.shape[:-2])
    body_shape = torch.Size((*lead, n_blocks, block, dim))
    xc = x.contiguous()
    dev = x.device
    channel, out_channel = tc.axis == "channel", tc.outlier_axis == "channel"
    k = outlier_count(tc.outliers, block if out_channel else dim)
    k_hi = k if tc.outlier_mode == "magnitude" else k - k // 2
    codes = torch.empty(body_shape.numel() * tc.bits // 8, dtype=torch.uint8, device=dev)
    meta_shape = (block // group, 1, dim) if channel else (block, dim // group, 1)
    scale = torch.empty((*lead, n_blocks, *meta_shape), dtype=torch.float16, device=dev)
    zero = torch.empty_like(scale)
    out_shape = (*lead, n_blocks, *((k, dim) if out_channel else (block, k)))
    out_val = torch.empty(out_shape, dtype=x.dtype, device=dev)
    out_idx = torch.empty(out_shape, dtype=index_dtype(block if out_channel else dim), device=dev)
    left = torch.empty((*lead, n_blocks, block, tc.rank), dtype=torch.float16, device=dev)
    right = torch.empty((*lead, n_blocks, tc.rank, dim), dtype=torch.float16, device=dev)
    omega = _omega(dim, max(tc.rank, 1), tc.seed, dev)
    grid = (body_shape[:-2].numel(),)
    bad = torch.empty(grid, dtype=torch.int32, device=dev)
    iter_prec, final_prec = _precisions(dev)
    gear_compress_kernel[grid](
        xc, omega, codes, scale, zero, out_val, out_idx, left, right, bad, seq, n_blocks,
        NB=block, D=dim, BITS=tc.bits, CHANNEL=channel, G=group, K_HI=k_hi, K_LO=k - k_hi,
        MAGNITUDE=tc.outlier_mode == "magnitude", OUT_CHANNEL=out_channel, RANK=tc.rank,
        RP=max(16, 1 << (tc.rank - 1).bit_length()), LOOPS=tc.loops,
        ITER_PRECISION=iter_prec, FINAL_PRECISION=final_prec, num_warps=8,
    )  # fmt: skip
    finite = [torch.isfinite(t).all() for t in (scale, zero, left, right)]
    flags = torch.stack([bad.any(), ~(finite[0] & finite[1]), ~(finite[2] & finite[3])])
    bad_input, overflow, factor_overflow = flags.tolist()
    if bad_input:
        raise TensorError("input holds NaN or Inf values")
    if overflow:
        raise TensorError("values exceed the float16 range of the scales / zero points")
    if factor_overflow:
        raise TensorError("values exceed the float16 range of the low-rank factors")
    axis = "channel" if out_channel else "token"
    return Compressed(
        body_shape=body_shape,
        base=Quantized(codes, scale, zero, tc.bits, tc.axis, tc.group_size, body_shape),
        outliers=Outliers(out_val, out_idx, axis, body_shape) if k else None,
        lowrank=LowRank(left, right) if tc.rank else None,
        full_precision=x[..., used:, :] if used < seq else None,
        **common,
    )


def decompress_fused(c: Compressed) -> Tensor:
    """``c.decompress()`` with the fused kernel, for a block-wise :class:`Compressed` of the
    settings :func:`compress_fused` covers (made by either implementation)."""
    if not isinstance(c, Compressed):
        raise ConfigError("decompress_fused needs a Compressed")
    if c.body_shape is None:
        return c.decompress()
    block, dim = c.body_shape[-2:]
    group = _check_settings(c.config, c.block_size, dim)
    if not isinstance(c.base, Quantized):
        raise ConfigError("decompress_fused needs a quantized backbone (bits set)")
    _require_device(c.device)
    from gear_lab.kernels.gear_triton import gear_decompress_kernel

    y = torch.empty(c.shape, dtype=c.dtype, device=c.device)
    seq, n_blocks = c.shape[-2], c.body_shape[-3]
    q = c.base
    out, low = c.outliers, c.lowrank
    dummy = q.codes
    out_channel = out is not None and out.axis == "channel"
    k = 0 if out is None else out.values.shape[-2 if out_channel else -1]
    gear_decompress_kernel[(c.body_shape[:-2].numel(),)](
        y, q.codes, q.scale.contiguous(), q.zero.contiguous(),
        dummy if out is None else out.values.contiguous(),
        dummy if out is None else out.indices.contiguous(),
        dummy if low is None else low.left.contiguous(),
        dummy if low is None else low.right.contiguous(),
        seq, n_blocks, NB=block, D=dim, BITS=q.bits, CHANNEL=q.axis == "channel", G=group,
        K=k, OUT_CHANNEL=out_channel, RANK=0 if low is None else low.rank, num_warps=4,
    )  # fmt: skip
    limit = torch.finfo(c.dtype).max  # as in Compressed.decompress: stay in the input's range
    y.clamp_(-limit, limit)
    if c.full_precision is not None:
        y[..., n_blocks * block :, :] = c.full_precision
    return y
