"""Fused Triton kernels for block-wise GEAR (Kang et al. 2024): one program per block of
``n_b`` tokens of one (batch, head), ``x`` ``[batch, kv_heads, seq, head_dim]`` contiguous.

Compression (:func:`gear_compress_kernel`) does everything in registers, in one pass over the
input: the exact outlier count per vector (iterated arg-max / arg-min, so no sort), grouped
min/max quantization with outlier positions excluded from the statistics and fp16 scale / zero
rounded outwards, bit packing, the residual ``X - D`` (zero at outliers), seeded power
(subspace) iteration with Gram-Schmidt re-orthonormalisation after every product, stored as
``left = Q`` (orthonormal) and ``right = Q^T R`` like the torch reference. Its outputs are bit-for-bit the layout of
:mod:`gear_lab.compression` (codes packed row-major, little-endian within a byte).

Decompression (:func:`gear_decompress_kernel`) unpacks, dequantizes, adds ``left @ right``
and writes the outliers back, again one program per block.

Big products use ``tl.dot`` with the rank padded to ``RP >= 16``; the power iteration runs in
TF32 on GPUs (it only needs the subspace), the final projection in 3xTF32 (fp32 accuracy).
Under ``TRITON_INTERPRET=1`` everything runs in numpy on the CPU (slow: tests only).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _half_outward(v, UP: tl.constexpr):
    """Round fp32 ``v`` to fp16 towards +inf (``UP``) or -inf, like ``torch.nextafter``."""
    h = v.to(tl.float16)
    back = h.to(tl.float32)
    bits = h.to(tl.int16, bitcast=True)
    if UP:
        wrong = back < v
        fixed = tl.where(h > 0, bits + 1, tl.where(h == 0, 1, bits - 1))
    else:
        wrong = back > v
        fixed = tl.where(h > 0, bits - 1, tl.where(h == 0, -32767, bits + 1))
    return tl.where(wrong, fixed.to(tl.int16).to(tl.float16, bitcast=True), h)


@triton.jit
def _rint(v):
    """Round half to even (``torch.round``) for ``0 <= v < 2**22``."""
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _pick(key, picked, pos, AXIS: tl.constexpr, LARGEST: tl.constexpr, N: tl.constexpr):
    """One arg-max (``LARGEST``) or arg-min per vector along ``AXIS`` among unpicked entries;
    returns (index per vector, one-hot selection)."""
    if LARGEST:
        masked = tl.where(picked, float("-inf"), key)
        best = tl.max(masked, axis=AXIS, keep_dims=True)
    else:
        masked = tl.where(picked, float("inf"), key)
        best = tl.min(masked, axis=AXIS, keep_dims=True)
    hit = (masked == best) & (picked == 0)
    idx = tl.min(tl.where(hit, pos, N), axis=AXIS, keep_dims=True)
    return idx, pos == idx


@triton.jit
def _col(m, cols, j):
    """Column ``j`` of ``m`` as a ``[rows, 1]`` tensor."""
    return tl.sum(tl.where(cols == j, m, 0.0), axis=1, keep_dims=True)


@triton.jit
def _orthonormalize(m, cols, RANK: tl.constexpr):
    """Modified Gram-Schmidt on the first ``RANK`` columns of ``m`` ``[n, RP]`` (the others
    are zero); a column with no new direction becomes zero."""
    for j in tl.static_range(RANK):
        v = _col(m, cols, j)
        for i in tl.static_range(j):
            q = _col(m, cols, i)
            v = v - tl.sum(q * v, axis=0, keep_dims=True) * q
        norm = tl.sqrt(tl.sum(v * v, axis=0, keep_dims=True))
        v = tl.where(norm > 1e-30, v / tl.where(norm > 1e-30, norm, 1.0), 0.0)
        m = tl.where(cols == j, v, m)
    return m


@triton.jit
def gear_compress_kernel(
    x_ptr,
    omega_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_val_ptr,
    out_idx_ptr,
    left_ptr,
    right_ptr,
    bad_ptr,
    seq,
    n_blocks,
    NB: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    CHANNEL: tl.constexpr,
    G: tl.constexpr,
    K_HI: tl.constexpr,
    K_LO: tl.constexpr,
    MAGNITUDE: tl.constexpr,
    OUT_CHANNEL: tl.constexpr,
    RANK: tl.constexpr,
    RP: tl.constexpr,
    LOOPS: tl.constexpr,
    ITER_PRECISION: tl.constexpr,
    FINAL_PRECISION: tl.constexpr,
):
    """Compress one ``[NB, D]`` block: see the module docstring. Output layouts (per block,
    blocks in ``[batch, kv_heads, n_blocks]`` order): codes ``[NB, D * BITS / 8]`` uint8;
    scale / zero ``[NB / G, D]`` (channel groups) or ``[NB, D / G]`` (token groups) fp16;
    outliers ``[NB, K]`` (token vectors) or ``[K, D]`` (channel vectors); left ``[NB, RANK]``
    (orthonormal columns), right ``[RANK, D]`` fp16; ``bad`` 1 where the block holds NaN / Inf."""
    pid = tl.program_id(0)
    bh = pid // n_blocks
    blk = pid % n_blocks
    rows = tl.arange(0, NB)[:, None]
    cols = tl.arange(0, D)[None, :]
    base = bh.to(tl.int64) * seq * D + blk.to(tl.int64) * NB * D
    raw = tl.load(x_ptr + base + rows * D + cols)
    xf = raw.to(tl.float32)
    finite = tl.abs(xf) < float("inf")
    tl.store(bad_ptr + pid, tl.max(tl.max(tl.where(finite, 0, 1), axis=1), axis=0))

    # S: exact count of outliers per vector (rows = token vectors, columns = channel vectors)
    K: tl.constexpr = K_HI + K_LO
    picked = tl.zeros((NB, D), dtype=tl.int1)
    if K > 0:
        blk_out = pid.to(tl.int64) * (K * D if OUT_CHANNEL else NB * K)
        if OUT_CHANNEL:
            pos = rows + cols * 0
            vec = cols
            ax: tl.constexpr = 0
            n_pos: tl.constexpr = NB
            stride_slot: tl.constexpr = D
            stride_vec: tl.constexpr = 1
        else:
            pos = cols + rows * 0
            vec = rows
            ax: tl.constexpr = 1
            n_pos: tl.constexpr = D
            stride_slot: tl.constexpr = 1
            stride_vec: tl.constexpr = K
        key = tl.abs(xf) if MAGNITUDE else xf
        for i in tl.static_range(K):
            idx, sel = _pick(key, picked, pos, ax, i < K_HI, n_pos)
            picked = picked | sel
            val = tl.sum(tl.where(sel, xf, 0.0), axis=ax, keep_dims=True)
            off = blk_out + vec * stride_vec + i * stride_slot
            tl.store(out_idx_ptr + off, idx.to(out_idx_ptr.dtype.element_ty))
            tl.store(out_val_ptr + off, val.to(out_val_ptr.dtype.element_ty))

    # D: grouped uint-BITS quantization, statistics without outliers
    LEVELS: tl.constexpr = (1 << BITS) - 1
    if CHANNEL:
        grouped = tl.reshape(xf, (NB // G, G, D))
        gpick = tl.reshape(picked, (NB // G, G, D))
        red: tl.constexpr = 1
    else:
        grouped = tl.reshape(xf, (NB, D // G, G))
        gpick = tl.reshape(picked, (NB, D // G, G))
        red: tl.constexpr = 2
    lo = tl.min(tl.where(gpick, float("inf"), grouped), axis=red, keep_dims=True)
    hi = tl.max(tl.where(gpick, float("-inf"), grouped), axis=red, keep_dims=True)
    empty = lo > hi
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    zero_h = _half_outward(lo, False)
    zero = zero_h.to(tl.float32)
    scale_h = _half_outward(tl.math.div_rn(hi - zero, LEVELS * 1.0), True)
    scale = scale_h.to(tl.float32)
    inverse = tl.where(scale > 0, tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)
    codes = tl.minimum(tl.maximum(_rint((grouped - zero) * inverse), 0.0), LEVELS * 1.0)
    deq = tl.reshape(zero + codes * scale, (NB, D))
    if CHANNEL:
        g_i = tl.arange(0, NB // G)[:, None]
        s_off = pid.to(tl.int64) * (NB // G) * D + g_i * D + cols
        tl.store(scale_ptr + s_off, tl.reshape(scale_h, (NB // G, D)))
        tl.store(zero_ptr + s_off, tl.reshape(zero_h, (NB // G, D)))
    else:
        g_i = tl.arange(0, D // G)[None, :]
        s_off = pid.to(tl.int64) * NB * (D // G) + rows * (D // G) + g_i
        tl.store(scale_ptr + s_off, tl.reshape(scale_h, (NB, D // G)))
        tl.store(zero_ptr + s_off, tl.reshape(zero_h, (NB, D // G)))
    PER: tl.constexpr = 8 // BITS
    icodes = tl.reshape(codes.to(tl.int32), (NB, D // PER, PER))
    shifts = (tl.arange(0, PER) * BITS)[None, None, :]
    packed = tl.sum(icodes << shifts, axis=2)
    b_cols = tl.arange(0, D // PER)[None, :]
    c_off = pid.to(tl.int64) * NB * (D // PER) + rows * (D // PER) + b_cols
    tl.store(codes_ptr + c_off, packed.to(tl.uint8))

    # L: rank-RANK power iteration on the residual: left = Q, right = Q^T R
    if RANK > 0:
        res = tl.where(picked, 0.0, xf - deq)
        r_cols = tl.arange(0, RP)[None, :]
        r_rows = tl.arange(0, RP)[:, None]
        omega = tl.load(
            omega_ptr + tl.arange(0, D)[:, None] * RANK + r_cols, mask=r_cols < RANK, other=0.0
        )
        q = _orthonormalize(tl.dot(res, omega, input_precision=ITER_PRECISION), r_cols, RANK)
        res_t = tl.trans(res)
        for _ in tl.static_range(LOOPS):
            z = _orthonormalize(tl.dot(res_t, q, input_precision=ITER_PRECISION), r_cols, RANK)
            q = _orthonormalize(tl.dot(res, z, input_precision=ITER_PRECISION), r_cols, RANK)
        right = tl.trans(tl.dot(res_t, q, input_precision=FINAL_PRECISION))  # [RP, D] = Q^T R
        l_off = pid.to(tl.int64) * NB * RANK + rows * RANK + r_cols
        tl.store(left_ptr + l_off, q.to(tl.float16), mask=r_cols < RANK)
        r_off = pid.to(tl.int64) * RANK * D + r_rows * D + cols
        tl.store(right_ptr + r_off, right.to(tl.float16), mask=r_rows < RANK)


@triton.jit
def gear_decompress_kernel(
    y_ptr,
    codes_ptr,
    scale_ptr,
    zero_ptr,
    out_val_ptr,
    out_idx_ptr,
    left_ptr,
    right_ptr,
    seq,
    n_blocks,
    NB: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    CHANNEL: tl.constexpr,
    G: tl.constexpr,
    K: tl.constexpr,
    OUT_CHANNEL: tl.constexpr,
    RANK: tl.constexpr,
):
    """Rebuild one ``[NB, D]`` block of ``y`` ``[batch, kv_heads, seq, head_dim]``:
    ``where(outlier, S, zero + code * scale + left @ right)`` (layouts as in
    :func:`gear_compress_kernel`)."""
    pid = tl.program_id(0)
    bh = pid // n_blocks
    blk = pid % n_blocks
    rows = tl.arange(0, NB)[:, None]
    cols = tl.arange(0, D)[None, :]
    PER: tl.constexpr = 8 // BITS
    c_off = pid.to(tl.int64) * NB * (D // PER) + rows * (D // PER) + cols // PER
    byte = tl.load(codes_ptr + c_off).to(tl.int32)
    code = ((byte >> ((cols % PER) * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
    if CHANNEL:
        s_off = pid.to(tl.int64) * (NB // G) * D + (rows // G) * D + cols
    else:
        s_off = pid.to(tl.int64) * NB * (D // G) + rows * (D // G) + cols // G
    scale = tl.load(scale_ptr + s_off).to(tl.float32)
    zero = tl.load(zero_ptr + s_off).to(tl.float32)
    y = zero + code * scale
    for j in tl.static_range(RANK):
        lj = tl.load(left_ptr + pid.to(tl.int64) * NB * RANK + rows * RANK + j).to(tl.float32)
        rj = tl.load(right_ptr + pid.to(tl.int64) * RANK * D + j * D + cols).to(tl.float32)
        y += lj * rj
    if K > 0:
        if OUT_CHANNEL:
            for i in tl.static_range(K):
                off = pid.to(tl.int64) * K * D + i * D + cols
                idx = tl.load(out_idx_ptr + off).to(tl.int32)
                y = tl.where(rows == idx, tl.load(out_val_ptr + off).to(tl.float32), y)
        else:
            for i in tl.static_range(K):
                off = pid.to(tl.int64) * NB * K + rows * K + i
                idx = tl.load(out_idx_ptr + off).to(tl.int32)
                y = tl.where(cols == idx, tl.load(out_val_ptr + off).to(tl.float32), y)
    base = bh.to(tl.int64) * seq * D + blk.to(tl.int64) * NB * D
    tl.store(y_ptr + base + rows * D + cols, y.to(y_ptr.dtype.element_ty))
