"""Uniform asymmetric grouped quantization and bit packing (gear_lab.compression.quantize)."""

from __future__ import annotations

import math

import pytest
import torch
from compress_helpers import PROPERTY, make_tensor, tensors
from hypothesis import given
from hypothesis import strategies as st

from gear_lab.compression import pack_codes, quantize, quantize_reconstruct, unpack_codes
from gear_lab.errors import TensorError


def group_bounds(x: torch.Tensor, axis: str, group_size: int | None, exclude=None):
    """Reference per-entry (min, max) of each entry's group, by explicit slicing."""
    x = x.double()
    if exclude is not None:
        lo_src, hi_src = x.masked_fill(exclude, math.inf), x.masked_fill(exclude, -math.inf)
    else:
        lo_src = hi_src = x
    dim = -2 if axis == "channel" else -1
    n = x.shape[dim]
    size = n if group_size is None else group_size
    lo, hi = torch.empty_like(x), torch.empty_like(x)
    for start in range(0, n, size):
        length = min(size, n - start)
        lo.narrow(dim, start, length).copy_(
            lo_src.narrow(dim, start, length)
            .amin(dim, keepdim=True)
            .expand_as(lo.narrow(dim, start, length))
        )
        hi.narrow(dim, start, length).copy_(
            hi_src.narrow(dim, start, length)
            .amax(dim, keepdim=True)
            .expand_as(hi.narrow(dim, start, length))
        )
    return lo, hi


@PROPERTY
@given(
    x=tensors(),
    bits=st.integers(1, 8),
    axis=st.sampled_from(("channel", "token")),
    group_size=st.one_of(st.none(), st.integers(1, 80)),
)
def test_error_at_most_half_a_step(x, bits, axis, group_size):
    q, values = quantize_reconstruct(x, bits, axis, group_size)
    assert torch.equal(values, q.dequantize())  # the codes at hand give the same reconstruction
    x_hat = q.dequantize(torch.float64)
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    lo, hi = group_bounds(x, axis, group_size)
    step = (hi - lo) / (2**bits - 1)
    # fp16 rounding of scale (up) and zero (down) widens the step by at most a few ulps
    slack = step * 2**-9 + (lo.abs() + hi.abs()) * 2**-11 + 1e-7
    assert ((x.double() - x_hat).abs() <= step / 2 + slack).all()


@PROPERTY
@given(
    x=tensors(max_seq=40, max_dim=24),
    bits=st.integers(1, 8),
    axis=st.sampled_from(("channel", "token")),
    group_size=st.one_of(st.none(), st.integers(1, 50)),
    seed=st.integers(0, 1000),
)
def test_statistics_ignore_excluded_entries(x, bits, axis, group_size, seed):
    gen = torch.Generator().manual_seed(seed)
    exclude = torch.rand(x.shape, generator=gen) < 0.2
    spiked = x.masked_fill(exclude, 1e4)  # excluded entries must not widen any group
    q = quantize(spiked, bits, axis, group_size, exclude)
    lo, hi = group_bounds(x, axis, group_size, exclude)
    lo, hi = lo.nan_to_num(posinf=0.0), hi.nan_to_num(neginf=0.0)
    step = (hi - lo).clamp_min(0) / (2**bits - 1)
    slack = step * 2**-9 + (lo.abs() + hi.abs()) * 2**-11 + 1e-7
    err = (x.double() - q.dequantize(torch.float64)).abs()
    assert (err <= step / 2 + slack)[~exclude].all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_constant_and_zero_groups_are_exact_never_nan(dtype, axis):
    x = torch.zeros(2, 3, 70, 16, dtype=dtype)
    x[0] = 0.75
    x[1, :, :, 3] = -2.5  # constant channel
    for bits in (1, 2, 8):
        x_hat = quantize(x, bits, axis, 64).dequantize(torch.float64)
        assert torch.isfinite(x_hat).all()
        assert torch.equal(x_hat[0], x[0].double())
    const = torch.full((1, 1, 5, 8), 0.1, dtype=dtype)
    x_hat = quantize(const, 2, axis, None).dequantize(torch.float64)
    # exact where the constant is a float16 value; float32 within float16 rounding
    assert (x_hat - const.double()).abs().max() <= 0.1 * 2**-10


def test_short_last_group_uses_its_own_statistics():
    x = make_tensor(0, (1, 2, 70, 8))
    x[..., 64:, :] = 3.0  # the 6-token tail group is constant: exact only if it is its own group
    x_hat = quantize(x, 2, "channel", 64).dequantize()
    assert torch.equal(x_hat[..., 64:, :], x[..., 64:, :])
    # seq shorter than the group size: one short group, quantized, not left in full precision
    short = make_tensor(1, (1, 1, 10, 8))
    q = quantize(short, 2, "channel", 64)
    assert q.codes.numel() == math.ceil(short.numel() / 8) * 2
    assert q.scale.numel() == 8


@pytest.mark.parametrize("bits", range(1, 9))
def test_packed_size_is_real(bits):
    x = make_tensor(2, (1, 2, 33, 16))
    q = quantize(x, bits, "token", 8)
    assert q.codes.dtype == torch.uint8
    assert q.codes.numel() == math.ceil(x.numel() / 8) * bits
    assert q.scale.dtype == q.zero.dtype == torch.float16
    assert q.scale.numel() == q.zero.numel() == 2 * 33 * 2


@PROPERTY
@given(bits=st.integers(1, 8), n=st.integers(1, 300), seed=st.integers(0, 1000))
def test_pack_unpack_identity(bits, n, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8) * bits
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    for dtype in (torch.float32, torch.float16, torch.float64, torch.int32):  # codes as numbers
        as_numbers = unpack_codes(packed, bits, n, dtype)
        assert as_numbers.dtype == dtype and torch.equal(as_numbers, codes.to(dtype))
    # dense little-endian layout: code i of each 8 starts at bit bits * i
    first = codes[:8].tolist()
    word = int.from_bytes(bytes(packed[:bits].tolist()), "little")
    assert word == sum(c << (bits * i) for i, c in enumerate(first))


def test_four_two_bit_codes_per_byte():
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 3, 3], dtype=torch.uint8)
    assert pack_codes(codes, 2).tolist() == [0b00111001, 0b11111111]


def test_values_beyond_float16_metadata_raise():
    x = torch.tensor([[[[0.0, 1e6]]]])
    with pytest.raises(TensorError, match="float16"):
        quantize(x, 4, "token", None)
