"""Compiled CPU path of GEAR compression and decompression (Kang et al. 2024), one pass per
``[seq, head_dim]`` matrix (a block of ``n_b`` tokens block-wise), OpenMP over the matrices.

:func:`gear_lab.compression.compress` / ``compress_ranks`` / ``Compressed.decompress`` use it for
CPU tensors whose settings it covers: float16 / bfloat16 / float32 ``[..., seq, head_dim]``,
uniform quantization of 1 to 8 bits along either axis with any group size, signed or magnitude
outliers along either axis, power-iteration low rank with float16 / bfloat16 factors, no
``ignore`` mask, and a multiple of 8 entries per matrix. Rotation, FP8, exact SVD, float8
factors and the other quantizers (codebooks, QJL) run the torch reference, as does everything
when the library cannot be built or loaded. Its results are the reference's: packed codes,
scales, zero points, outlier indices and values bit for bit, low-rank factors to within the
power iteration's float32 rounding (same seeded start), reconstructions bit for bit.
Where the reference would warn or raise (NaN / Inf input, scales beyond float16, values
below its resolution), the call is handed to the reference, which does; the kernel checks its
input for NaN / Inf itself, so the caller need not.

The C++ source is ``gear_lab/csrc/gear_cpu.cpp``, built and loaded by :mod:`gear_lab.native`:
where that fails, one warning names the reason and the torch reference is used.
``GEAR_LAB_KERNEL=reference`` (or ``with reference():``) forces the reference, e.g. to compare
the two.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gear_lab import native
from gear_lab.compression.config import TensorCompression
from gear_lab.compression.lowrank import LowRank, gaussian_start
from gear_lab.compression.outliers import Outliers, index_dtype, outlier_count
from gear_lab.compression.quantize import Quantized, leading_like

if TYPE_CHECKING:
    from gear_lab.compression.gear import Compressed

KERNEL_ENV = native.KERNEL_ENV
reference = native.reference  # within the block, the torch reference runs

_DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_FACTORS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_KEPT = {torch.float16: 1, torch.bfloat16: 2}  # factors the kernel balances and rounds itself
# TensorCompression fields the kernel implements; every other field must keep its default.
_HANDLED = frozenset(
    {"bits", "axis", "group_size", "outliers", "outlier_mode", "outlier_axis", "rank", "loops"}
    | {"lowrank", "seed", "factor_dtype"}
)

_p = ctypes.c_void_p
_i32, _i64 = ctypes.c_int32, ctypes.c_int64


class _CompressArgs(ctypes.Structure):
    _fields_ = [
        ("x", _p), ("dtype", _i32), ("lead_ndim", _i32), ("lead_sizes", _p),
        ("lead_strides", _p), ("matrices", _i64), ("n", _i64), ("d", _i64), ("bits", _i32),
        ("channel_axis", _i32), ("group", _i64), ("out_hi", _i32), ("out_lo", _i32),
        ("magnitude", _i32), ("out_channel", _i32), ("index_bytes", _i32), ("rank", _i32),
        ("loops", _i32), ("omega", _p), ("codes", _p), ("scale", _p), ("zero", _p),
        ("out_values", _p), ("out_index", _p), ("factors", _i32), ("left", _p), ("right", _p),
        ("lower", _i32), ("lower_left", _p), ("lower_right", _p), ("threads", _i32),
        ("flags", _p),
    ]  # fmt: skip


class _DecompressArgs(ctypes.Structure):
    _fields_ = [
        ("codes", _p), ("scale", _p), ("zero", _p), ("bits", _i32), ("channel_axis", _i32),
        ("group", _i64), ("matrices", _i64), ("n", _i64), ("d", _i64), ("out_values", _p),
        ("out_index", _p), ("out_k", _i32), ("out_channel", _i32), ("index_bytes", _i32),
        ("left", _p), ("right", _p), ("rank", _i32), ("factor_bf16", _i32), ("out", _p),
        ("lead_ndim", _i32), ("lead_sizes", _p), ("lead_strides", _p), ("dtype", _i32),
        ("threads", _i32),
    ]  # fmt: skip


def kernel_unavailable_reason() -> str | None:
    """``None`` when the compiled CPU path can run (building it on first call), else why not
    (one line): forced off, or the build / load failed."""
    return native.unavailable_reason()


def _covers(tc: TensorCompression, ranks: Sequence[int]) -> bool:
    for f in fields(tc):
        if f.name not in _HANDLED and getattr(tc, f.name) != f.default:
            return False
    return (
        tc.bits is not None
        and tc.factor_dtype in _FACTORS
        and (max(ranks) == 0 or tc.lowrank == "power")
    )


def _group(tc_group: int | None, length: int) -> int:
    return length if tc_group is None else min(tc_group, length)


@functools.lru_cache(maxsize=32)
def _omega(cols: int, rank: int, seed: int) -> Tensor:
    """The reference's seeded Gaussian start ``[cols, rank]`` (float32), drawn once."""
    return gaussian_start(cols, rank, seed, torch.device("cpu"), torch.float32).contiguous()


def _threads(matrices: int) -> int:
    """torch's intra-op thread count, at most one thread per matrix."""
    return max(1, min(torch.get_num_threads(), matrices))


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _int64s(values: Sequence[int]) -> ctypes.Array:
    """A C ``int64_t`` array of ``values`` (leading sizes or strides; pass it with
    :func:`ctypes.addressof` and keep it alive for the call)."""
    return (_i64 * len(values))(*values)


def compress_body(
    body: Tensor, tc: TensorCompression, ranks: Sequence[int], ignore: Tensor | None
) -> tuple[Quantized, Outliers | None, list[LowRank | None]] | None:
    """The quantized backbone, outliers and low-rank factors (one per rank, ``None`` for rank
    0) of ``body`` ``[..., n, d]`` on the compiled path, or ``None`` where the reference must
    run (also where ``body`` holds NaN / Inf: the reference raises)."""
    if (
        ignore is not None
        or body.device.type != "cpu"
        or body.dtype not in _DTYPES
        or not _covers(tc, ranks)
        or body.shape[-1] * body.shape[-2] % 8
    ):
        return None
    lib = native.library()
    if lib is None:
        return None
    n, d = body.shape[-2:]
    if body.stride(-1) != 1 or body.stride(-2) != d:
        body = body.contiguous()
    lead = body.shape[:-2]
    matrices = lead.numel()
    group = _group(tc.group_size, n if tc.axis == "channel" else d)
    groups = -(-(n if tc.axis == "channel" else d) // group)
    meta = (*lead, groups, 1, d) if tc.axis == "channel" else (*lead, n, groups, 1)
    out_len = n if tc.outlier_axis == "channel" else d
    k = outlier_count(tc.outliers, out_len)
    k_hi = k if tc.outlier_mode == "magnitude" else k - k // 2
    out_shape = (*lead, k, d) if tc.outlier_axis == "channel" else (*lead, n, k)
    top = max(ranks)
    codes = torch.empty(body.numel() // 8 * tc.bits, dtype=torch.uint8)
    scale = torch.empty(meta, dtype=torch.float16)
    zero = torch.empty(meta, dtype=torch.float16)
    values = torch.empty(out_shape, dtype=body.dtype) if k else None
    indices = torch.empty(out_shape, dtype=index_dtype(out_len)) if k else None
    fitted = sorted({r for r in ranks if r})
    # the kernel keeps the largest rank's factors and, for several ranks, the best
    # approximation of the next largest within its subspace, which the smaller ones truncate
    lower = max((r for r in fitted if r < top), default=0)
    kept_dtype = _FACTORS[tc.factor_dtype]
    left = torch.empty((*lead, n, top), dtype=kept_dtype) if top else None
    right = torch.empty((*lead, top, d), dtype=kept_dtype) if top else None
    lower_left = torch.empty((*lead, n, lower), dtype=kept_dtype) if lower else None
    lower_right = torch.empty((*lead, lower, d), dtype=kept_dtype) if lower else None
    omega = _omega(d, top, tc.seed) if top else None
    sizes, strides = _int64s(list(lead) or [1]), _int64s(list(body.stride()[:-2]) or [0])
    flags = torch.zeros(4, dtype=torch.int32)
    args = _CompressArgs(
        body.data_ptr(), _DTYPES[body.dtype], len(sizes), ctypes.addressof(sizes),
        ctypes.addressof(strides), matrices, n, d, tc.bits, tc.axis == "channel", group, k_hi,
        k - k_hi, tc.outlier_mode == "magnitude", tc.outlier_axis == "channel",
        0 if indices is None else indices.element_size(), top, tc.loops, _ptr(omega),
        codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), _ptr(values), _ptr(indices),
        _KEPT[kept_dtype], _ptr(left), _ptr(right), lower, _ptr(lower_left), _ptr(lower_right),
        _threads(matrices), flags.data_ptr(),
    )  # fmt: skip
    lib.gear_compress(ctypes.byref(args))
    if flags.any():  # the reference raises or warns (NaN / Inf input too), and decides how
        return None
    base = Quantized(codes, scale, zero, tc.bits, tc.axis, tc.group_size, body.shape)
    outliers = Outliers(values, indices, tc.outlier_axis, body.shape) if k else None
    kept = {top: LowRank(left, right)} if top else {}
    if lower:
        within = LowRank(lower_left, lower_right)
        kept |= {r: within.truncate(r) for r in fitted if r < top}
    return base, outliers, [kept.get(r) for r in ranks]


def decompress_body(c: Compressed, into: Tensor | None = None) -> Tensor | None:
    """The body of ``c.decompress()`` (``c.body_shape``, input dtype) on the compiled path, or
    ``None`` where the reference must run. Written into ``into`` when given (and returned):
    ``c.body_shape`` with the leading dim possibly split (``[rows, blocks, ...]``,
    :func:`~gear_lab.compression.quantize.leading_like`), any strides; straight in place
    where each ``[n, d]`` matrix's rows are contiguous (e.g. blocks of a cache's
    ``[batch, kv_heads, seq, head_dim]`` buffer), else through a copy."""
    q, out, low = c.base, c.outliers, c.lowrank
    if (
        c.body_shape is None
        or c.device.type != "cpu"
        or c.dtype not in _DTYPES
        or type(q) is not Quantized
        or c.sketch is not None
        or not _covers(c.config, [0])
        or (out is not None and type(out) is not Outliers)
        or (
            low is not None
            and (low.left_scale is not None or low.left.dtype not in _FACTORS.values())
        )
        or c.body_shape[-1] * c.body_shape[-2] % 8
    ):
        return None
    lib = native.library()
    if lib is None:
        return None
    n, d = c.body_shape[-2:]
    direct = into is not None and into.stride(-1) == 1 and into.stride(-2) == d
    y = into if direct else torch.empty(c.body_shape, dtype=c.dtype)
    lead, steps = y.shape[:-2] or (1,), y.stride()[:-2] or (0,)
    sizes, strides = _int64s(lead), _int64s(steps)
    channel = q.axis == "channel"
    out_channel = out is not None and out.axis == "channel"
    k = 0 if out is None else out.values.shape[-2 if out_channel else -1]
    contiguous = [
        None if t is None else t.contiguous()
        for t in (
            q.codes, q.scale, q.zero, None if out is None else out.values.to(c.dtype),
            None if out is None else out.indices, None if low is None else low.left,
            None if low is None else low.right.to(low.left.dtype),
        )
    ]  # fmt: skip
    codes, scale, zero, values, indices, left, right = contiguous
    args = _DecompressArgs(
        codes.data_ptr(), scale.data_ptr(), zero.data_ptr(), q.bits, channel,
        _group(q.group_size, n if channel else d), c.body_shape[:-2].numel(), n, d,
        _ptr(values), _ptr(indices), k, out_channel,
        0 if indices is None else indices.element_size(), _ptr(left), _ptr(right),
        0 if low is None else low.rank, left is not None and left.dtype == torch.bfloat16,
        y.data_ptr(), len(lead), ctypes.addressof(sizes), ctypes.addressof(strides),
        _DTYPES[c.dtype], _threads(c.body_shape[:-2].numel()),
    )  # fmt: skip
    lib.gear_decompress(ctypes.byref(args))
    if into is not None and not direct:
        into.copy_(leading_like(y, into))
    return y if into is None else into
