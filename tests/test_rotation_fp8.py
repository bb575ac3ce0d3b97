"""Hadamard rotation of head_dim and the FP8 round trip (gear_lab.compression.rotation / fp8)."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import PROPERTY, make_tensor, tensors
from hypothesis import given
from hypothesis import strategies as st

from gear_lab.compression import (
    compress,
    fp8_quantize,
    get_preset,
    hadamard_rotation,
    rotate,
    unrotate,
)
from gear_lab.compression.quantize import from_groups, to_groups
from gear_lab.errors import ConfigError


@pytest.mark.parametrize("dim", [1, 2, 8, 64, 128])
def test_rotation_is_orthogonal_seeded_and_inverted(dim):
    m = hadamard_rotation(dim, 5, torch.device("cpu"), torch.float64)
    torch.testing.assert_close(m @ m.T, torch.eye(dim, dtype=torch.float64))
    assert torch.equal(m, hadamard_rotation(dim, 5, torch.device("cpu"), torch.float64))
    if dim >= 8:
        assert not torch.equal(m, hadamard_rotation(dim, 6, torch.device("cpu"), torch.float64))
        assert torch.allclose(m.abs(), torch.full_like(m, dim**-0.5))
    x = make_tensor(dim, (2, 3, 7, dim), torch.float64)
    torch.testing.assert_close(unrotate(rotate(x, 5), 5), x)


@pytest.mark.parametrize("dim", [3, 12, 96])
def test_rotation_needs_a_power_of_two(dim):
    with pytest.raises(ConfigError, match="power-of-two"):
        hadamard_rotation(dim, 0, torch.device("cpu"), torch.float32)


def test_rotation_spreads_outlier_channels():
    """On keys with outlier channels, rotating before 2-bit per-token quantization helps."""
    x = make_tensor(0, (1, 4, 128, 64), style="channels")
    config = get_preset("quant", bits=2, group_size=32, value_group_size=32)
    plain = compress(x, config, "values").decompress()
    rotated = compress(x, get_preset("quant", bits=2, group_size=32, rotate=True), "values")
    assert (x - rotated.decompress()).norm() < (x - plain).norm()
    assert rotated.nbytes == compress(x, config, "values").nbytes  # the rotation is not stored


@PROPERTY
@given(
    x=tensors(),
    fmt=st.sampled_from(("e4m3", "e5m2")),
    axis=st.sampled_from(("channel", "token")),
    group_size=st.one_of(st.none(), st.integers(1, 80)),
    per_tensor=st.booleans(),
)
def test_fp8_round_trip_error_and_size(x, fmt, axis, group_size, per_tensor):
    f = fp8_quantize(x, fmt, axis, group_size, per_tensor=per_tensor)
    x_hat = f.dequantize(torch.float64)
    assert f.codes.dtype == torch.uint8 and f.codes.numel() == x.numel()
    assert f.scale.dtype == torch.float16
    assert torch.isfinite(x_hat).all() and x_hat.shape == x.shape
    mantissa, tiny = (3, 2.0**-9) if fmt == "e4m3" else (2, 2.0**-16)
    # relative rounding of the format, plus its subnormal step times the entry's scale
    if per_tensor:
        assert f.scale.numel() == x.numel() // (x.shape[-2] * x.shape[-1])
        scale = f.scale.double()[..., None]
    else:
        zeros = to_groups(torch.zeros_like(x, dtype=torch.float64), axis, group_size)
        n = x.shape[-2 if axis == "channel" else -1]
        scale = from_groups(zeros + f.scale.double(), axis, n)
    bound = x.double().abs() * 2.0 ** -(mantissa + 1) * 1.001 + scale * tiny
    assert ((x.double() - x_hat).abs() <= bound).all()


def test_fp8_zero_groups_and_preset_bits():
    x = torch.zeros(1, 2, 64, 16)
    x[0, 1] = make_tensor(1, (64, 16))
    c = compress(x, get_preset("fp8"), "keys")
    x_hat = c.decompress()
    assert torch.equal(x_hat[0, 0], x[0, 0]) and torch.isfinite(x_hat).all()
    assert c.bits_per_entry == 8 + 16 / 64  # one byte per entry, fp16 scale per 64-group
    per_matrix = compress(x, get_preset("fp8", fp8_scale="tensor"), "keys")
    assert torch.equal(per_matrix.decompress()[0, 0], x[0, 0])
    assert per_matrix.bytes_by_part()["scales"] == 2 * 2  # one fp16 scale per (batch, head)
