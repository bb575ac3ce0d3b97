"""Numbers are finite or refused: every ``Compressed`` decompresses to finite values, or
``compress`` raises ``TensorError``; never a silent Inf / NaN (issue 12)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gear_lab.compression import CompressionConfig, TensorCompression, compress
from gear_lab.errors import ConfigError, PrecisionWarning, TensorError

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def randn(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def full_range(dtype: torch.dtype, shape: tuple[int, ...] = (1, 2, 64, 16)) -> torch.Tensor:
    """Gaussian values scaled so the largest magnitude is the dtype's largest finite value."""
    x = randn(shape)
    top = torch.finfo(dtype).max
    return (x / x.abs().max() * top).clamp(-top, top).to(dtype)


def finite_or_refused(x: torch.Tensor, config: TensorCompression | CompressionConfig) -> bool:
    """True when compressed and decompressed finite (same shape / dtype), False when refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PrecisionWarning)
            c = compress(x, config)
    except TensorError as err:
        assert "\n" not in str(err)
        return False
    y = c.decompress()
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), f"non-finite decompression of a finite input ({config})"
    return True


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float16_full_range_quantizes_to_finite_values(bits: int) -> None:
    x = full_range(torch.float16)
    y = compress(x, TensorCompression(bits=bits, group_size=None)).decompress()
    assert torch.isfinite(y).all()
    step = (x.float().amax() - x.float().amin()) / (2**bits - 1)
    assert ((y.float() - x.float()).abs() <= step / 2 * 1.01).all()  # still within half a step


@pytest.mark.parametrize(
    "config",
    [
        TensorCompression(bits=4, rank=2, outliers=0.02),
        TensorCompression(bits=None, fp8="e4m3"),
        TensorCompression(bits=None, fp8="e5m2", fp8_scale="tensor"),
        TensorCompression(bits=2, rank=4, lowrank="svd", rotate=True),
    ],
)
def test_float16_full_range_other_methods(config: TensorCompression) -> None:
    assert finite_or_refused(full_range(torch.float16), config)


def test_one_bit_on_the_full_float16_range_is_refused() -> None:
    """The scale of 1 bit over [-65504, 65504] does not fit float16: refused, not Inf."""
    with pytest.raises(TensorError, match="float16 range"):
        compress(full_range(torch.float16), TensorCompression(bits=1, group_size=None))


@pytest.mark.parametrize("lowrank", ["svd", "power"])
def test_low_rank_only_on_large_values(lowrank: str) -> None:
    x = randn((1, 2, 64, 16)) * 1e8
    tc = TensorCompression(bits=None, rank=2, lowrank=lowrank)
    y = compress(x, tc).decompress()  # balanced factors fit float16
    assert torch.isfinite(y).all()
    with pytest.raises(TensorError, match="low-rank factors"):
        compress(randn((1, 2, 64, 16)) * 1e12, tc)
    assert finite_or_refused(
        randn((1, 2, 64, 16)) * 1e12,
        TensorCompression(bits=None, rank=2, lowrank=lowrank, factor_dtype="bfloat16"),
    )


def test_one_bit_power_low_rank_on_large_values_is_finite_and_unchanged() -> None:
    """Long sequences make ``Q^T R`` overflow float16 unless the power factors are balanced
    (by powers of two, so scaling the input scales the result exactly)."""
    x = randn((1, 2, 1024, 16))
    x = x / x.abs().max()
    tc = TensorCompression(bits=1, rank=4, group_size=None, lowrank="power")
    small, big = compress(x, tc).decompress(), compress(x * 2.0**14, tc).decompress()
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big, small * 2.0**14, rtol=1e-3, atol=1e-2)


def test_values_below_float16_resolution_warn() -> None:
    x = randn((1, 2, 64, 16)) * 1e-9
    with pytest.warns(PrecisionWarning, match="float16 resolution"):
        compress(x, TensorCompression(bits=4))
    with pytest.warns(PrecisionWarning, match="float16 resolution"):
        compress(x * 1e-3, TensorCompression(bits=None, fp8="e4m3"))  # fp8 resolves 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        for scale in (1e-3, 1.0, 1e3):  # ordinary magnitudes stay silent
            compress(randn((1, 2, 64, 16)) * scale, TensorCompression(bits=4, rank=2))
        compress(torch.full((1, 1, 64, 16), 0.1), TensorCompression(bits=2))  # constant groups
        compress(x, TensorCompression(bits=None, fp8="e4m3"))


def test_rotation_beyond_the_dtype_range_is_refused() -> None:
    x = torch.full((1, 1, 8, 16), 60000.0, dtype=torch.float16)  # a rotated token grows x4
    with pytest.raises(TensorError, match="rotated values exceed the float16 range"):
        compress(x, TensorCompression(bits=4, outliers=0.1, rotate=True))


MAGNITUDES = [1e-12, 1e-9, 1e-6, 1e-3, 1.0, 1e3, 3e4, 65504.0, 1e6, 1e9, 1e15, 1e30, 3e38]


@st.composite
def inputs(draw: st.DrawFn) -> torch.Tensor:
    """A finite tensor of a float dtype, anywhere in that dtype's range (sometimes at its edge)."""
    dtype = draw(st.sampled_from(DTYPES))
    top = torch.finfo(dtype).max
    shape = (1, draw(st.integers(1, 2)), draw(st.integers(2, 40)), draw(st.sampled_from([4, 8])))
    scale = draw(st.sampled_from([m for m in MAGNITUDES if m <= top]))
    x = randn(shape, draw(st.integers(0, 2**16))) * scale
    edge = draw(st.sampled_from(["none", "entries", "token"]))
    if edge == "entries":  # pin the extremes of the dtype's range
        flat = x.view(-1)
        flat[0], flat[-1] = top, -top
    elif edge == "token":  # a whole token at the limit (rotation adds up its entries)
        x[..., 0, :] = top
    return x.clamp(-top, top).to(dtype)


@st.composite
def configs(draw: st.DrawFn) -> TensorCompression | CompressionConfig:
    bits = draw(st.sampled_from([None, 1, 2, 3, 4, 8]))
    fp8 = draw(st.sampled_from([None, "e4m3", "e5m2"])) if bits is None else None
    try:
        tc = TensorCompression(
            bits=bits,
            fp8=fp8,
            axis=draw(st.sampled_from(["channel", "token"])),
            group_size=draw(st.sampled_from([None, 2, 4])),
            outliers=draw(st.sampled_from([0.0, 0.1])),
            rank=draw(st.integers(0, 2)),
            lowrank=draw(st.sampled_from(["power", "svd"])),
            rotate=draw(st.booleans()),
            factor_dtype=draw(st.sampled_from(["float16", "bfloat16", "float8_e4m3"])),
        )
    except ConfigError:
        return TensorCompression(bits=4)
    block = draw(st.sampled_from([None, 2]))
    return tc if block is None else CompressionConfig(keys=tc, values=tc, block_size=block)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=inputs(), config=configs())
def test_finite_input_gives_finite_output_or_tensor_error(x, config) -> None:
    with contextlib.suppress(ConfigError):  # e.g. rank > min(seq, head_dim): not about numbers
        finite_or_refused(x, config)


@pytest.mark.parametrize("dtype", DTYPES)
def test_modest_values_are_never_refused(dtype: torch.dtype) -> None:
    """Refusal is for values near the storage formats' limits, not for ordinary K/V."""
    x = (randn((1, 2, 32, 8)) * 10).to(dtype)
    for tc in (
        TensorCompression(bits=2, rank=2, outliers=0.05),
        TensorCompression(bits=None, rank=2),
        TensorCompression(bits=None, fp8="e4m3"),
        TensorCompression(bits=1, rank=2, lowrank="svd", rotate=True),
    ):
        assert finite_or_refused(x, tc)
