"""GEAR composition, the Compressed container and block-wise streaming (gear_lab.compression.gear)."""

from __future__ import annotations

import math

import pytest
import torch
from compress_helpers import PROPERTY, make_tensor, tensors
from hypothesis import given
from hypothesis import strategies as st

from gear_lab.compression import (
    CompressionConfig,
    TensorCompression,
    compress,
    get_preset,
    list_presets,
    outlier_count,
)
from gear_lab.errors import ConfigError, TensorError


def rel_error(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x.double() - x_hat.double()).norm() / x.double().norm())


@PROPERTY
@given(
    x=tensors(),
    preset=st.sampled_from(list_presets()),
    kind=st.sampled_from(("keys", "values")),
    bits=st.integers(1, 8),
    block_size=st.sampled_from((None, 1, 16, 64)),
)
def test_sizes_are_measured_from_the_kept_tensors(x, preset, kind, bits, block_size):
    overrides = {"block_size": block_size, "rank": int(preset != "none")}
    if preset not in ("fp8", "none"):
        overrides["bits"] = max(bits, 2) if get_preset(preset).keys.qjl else bits
    if x.shape[-1] & (x.shape[-1] - 1):  # the Hadamard rotation needs a power-of-two head_dim
        overrides["rotate"] = False
    c = compress(x, get_preset(preset, **overrides), kind)
    kept = c.tensors()
    assert c.nbytes == sum(t.nbytes for t in kept.values())
    assert c.bits_per_entry == 8 * c.nbytes / x.numel() and c.numel == x.numel()
    assert sum(c.bytes_by_part().values()) == c.nbytes
    assert set(c.bytes_by_part()) == {
        "codes",
        "scales",
        "codebook",
        "outliers",
        "lowrank",
        "sketch",
        "full_precision",
    }
    x_hat = c.decompress()
    assert (x_hat.shape, x_hat.dtype, x_hat.device) == (x.shape, x.dtype, x.device)
    assert c.shape == x.shape and c.dtype == x.dtype
    assert torch.isfinite(x_hat).all()
    if preset == "none":
        assert torch.equal(x_hat, x) and c.bits_per_entry == 8 * x.element_size()


@PROPERTY
@given(x=tensors(max_seq=40, max_dim=16), seed=st.integers(0, 2**20))
def test_seeded_runs_are_bit_identical(x, seed):
    rank = min(2, *x.shape[-2:])
    config = get_preset("gear", bits=2, rank=rank, seed=seed, group_size=16, outliers=0.1)
    a, b = compress(x, config), compress(x, config)
    assert a.tensors().keys() == b.tensors().keys()
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name
    assert torch.equal(a.decompress(), b.decompress())


def test_reconstruction_is_outliers_else_backbone_plus_low_rank():
    x = make_tensor(0, (1, 2, 64, 32), style="channels")
    tc = TensorCompression(bits=2, group_size=32, outliers=0.05, rank=2, lowrank="svd")
    c = compress(x, tc)
    mask = c.outlier_mask()
    backbone = c.base.dequantize()
    expected = torch.where(mask, x, backbone + c.lowrank.product())
    torch.testing.assert_close(c.decompress(), expected, rtol=0, atol=1e-6)
    # each added part lowers the error on tensors with outlier channels
    errors = [
        rel_error(x, compress(x, TensorCompression(**{**tc.to_dict(), **o})).decompress())
        for o in ({"outliers": 0.0, "rank": 0}, {"rank": 0}, {})
    ]
    assert errors == sorted(errors, reverse=True)


def test_block_mode_compresses_each_block_once_and_keeps_the_tail():
    x = make_tensor(1, (2, 3, 150, 16), torch.float16, style="channels")
    config = get_preset("gear", bits=2, rank=2, group_size=16, block_size=64)
    c = compress(x, config, "values")
    x_hat = c.decompress()
    assert torch.equal(x_hat[..., 128:, :], x[..., 128:, :])  # partial block: full precision
    assert c.bytes_by_part()["full_precision"] == x[..., 128:, :].nbytes
    for start in (0, 64):  # each block alone gives the same result: own statistics, own rank
        block = x[..., start : start + 64, :]
        alone = compress(block, config.for_kind("values")).decompress()
        torch.testing.assert_close(x_hat[..., start : start + 64, :], alone, rtol=2e-3, atol=1e-3)
    assert c.lowrank.left.shape == (2, 3, 2, 64, 2)  # one rank-2 factor pair per block
    short = compress(x[..., :50, :], config, "values")  # shorter than one block: all kept
    assert torch.equal(short.decompress(), x[..., :50, :]) and short.bits_per_entry == 16


@pytest.mark.parametrize("preset", ["gear", "kivi", "quant", "fp8", "gear-kcvt"])
@pytest.mark.parametrize("seq", [1, 3, 10])
def test_short_sequences(preset, seq):
    """seq shorter than G and seq of 1: one short group, quantized, no error."""
    x = make_tensor(seq, (1, 2, seq, 8))
    c = compress(x, get_preset(preset, rank=1), "keys")
    assert c.decompress().shape == x.shape
    assert torch.isfinite(c.decompress()).all()


@pytest.mark.parametrize("preset", list_presets())
@pytest.mark.parametrize("fill", [0.0, -1.5])
def test_all_zero_and_constant_tensors(preset, fill):
    x = torch.full((1, 2, 70, 16), fill, dtype=torch.float16)
    x_hat = compress(x, get_preset(preset, rank=int(preset != "none"))).decompress()
    if fill and get_preset(preset).keys.codebook == "sphere":  # no zero point: only 0 is exact
        assert rel_error(x, x_hat) < 0.2
    else:
        assert torch.equal(x_hat, x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_input_raise(bad):
    x = make_tensor(0, (1, 1, 8, 8))
    x[0, 0, 3, 3] = bad
    with pytest.raises(TensorError, match="NaN or Inf"):
        compress(x, get_preset("gear"))


@pytest.mark.parametrize(
    "x",
    [torch.ones(1, 1, 4, 4, dtype=torch.int32), torch.ones(8), torch.ones(1, 1, 0, 4)],
    ids=["integer", "1-d", "empty"],
)
def test_bad_tensors_raise(x):
    with pytest.raises(TensorError):
        compress(x, get_preset("quant"))


def test_shape_dependent_config_errors():
    x = make_tensor(0, (1, 2, 20, 8))
    with pytest.raises(ConfigError, match="rank 9 exceeds"):
        compress(x, TensorCompression(rank=9))
    with pytest.raises(ConfigError, match="rank 5 exceeds"):
        compress(x, get_preset("gear", rank=5, block_size=4))
    with pytest.raises(ConfigError, match="power-of-two"):
        compress(make_tensor(0, (1, 1, 4, 12)), get_preset("quant", rotate=True))
    with pytest.raises(ConfigError, match="kind"):
        compress(x, get_preset("gear"), "queries")
    with pytest.raises(ConfigError, match="TensorCompression or CompressionConfig"):
        compress(x, {"bits": 2})
    # a group larger than the axis is fine: one short group
    assert compress(x, TensorCompression(group_size=1000)).decompress().shape == x.shape


def test_ignored_positions_leave_the_statistics_alone():
    """Padding (``ignore``) is excluded from outliers, quantization statistics and low rank."""
    x = make_tensor(2, (2, 2, 32, 16))
    ignore = torch.zeros(2, 1, 32, 1, dtype=torch.bool)
    ignore[0, :, :5] = True  # left padding of batch element 0
    padded = x.clone()
    padded[0, :, :5] = 1e3
    config = get_preset("gear", bits=2, group_size=32, rank=2)
    c = compress(padded, config, ignore=ignore)
    clean = compress(x, config)
    keep = ~ignore.expand(x.shape)
    assert not (c.outlier_mask() & ~keep).any()
    assert rel_error(x[keep], c.decompress()[keep]) < 1.5 * rel_error(x, clean.decompress())
    with pytest.raises(TensorError, match="ignore"):
        compress(x, config, ignore=torch.zeros(32, 1))


def test_config_dataclass_as_input_and_kinds():
    x = make_tensor(3, (1, 2, 64, 16))
    config = CompressionConfig(
        keys=TensorCompression(bits=2, axis="channel"), values=TensorCompression(bits=4)
    )
    assert compress(x, config, "keys").config.bits == 2
    assert compress(x, config, "keys_pre_rope").config.bits == 2
    assert compress(x, config, "values").config.bits == 4


def test_real_keys_gear_beats_plain_quant_and_sizes_match_the_formula(smol_dump):
    from gear_lab import open_dump

    with open_dump(smol_dump) as dump:
        layer = dump.layers[len(dump.layers) // 2]
        keys = dump.load("keys", layer)[None]  # [1, kv_heads, 128, head_dim]
        values = dump.load("values", layer)[None]
    n_b, dim = 64, keys.shape[-1]
    gear = get_preset("gear", bits=2, group_size=64, outliers=0.02, rank=2, block_size=n_b)
    quant = get_preset("quant", bits=2, group_size=64, block_size=n_b)
    for kind, x in (("keys", keys), ("values", values)):
        c_gear, c_quant = compress(x, gear, kind), compress(x, quant, kind)
        assert rel_error(x, c_gear.decompress()) < rel_error(x, c_quant.decompress())
    # measured bits of 2-bit GEAR, G = 64, s = 2 %, r = 2 on 64 x 64 blocks
    c = compress(keys, gear, "keys")
    k = outlier_count(0.02, dim)  # per token (outlier_axis="token")
    per_block = (
        n_b * dim * 2 / 8  # packed 2-bit codes
        + dim * (n_b // 64) * 2 * 2  # fp16 scale + zero per channel group
        + n_b * k * (keys.element_size() + 1)  # outlier values (dump dtype) + uint8 index
        + 2 * (n_b + dim) * 2  # fp16 rank-2 factors
    )
    assert c.bits_per_entry == pytest.approx(8 * per_block / (n_b * dim))
    notes = 2 + 32 / 64 + 0.02 * (16 + 16) + 2 * (n_b + dim) * 16 / (n_b * dim)
    assert abs(c.bits_per_entry - notes) < 0.1 * notes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["gear", "kivi", "fp8", "gear-kcvt"])
def test_cuda_matches_cpu(preset):
    x = make_tensor(4, (2, 4, 200, 64), torch.float16, style="channels")
    config = get_preset(preset, rank=2, block_size=64, rotate=preset == "gear")
    cpu = compress(x, config)
    gpu = compress(x.cuda(), config)
    x_hat = gpu.decompress()
    assert x_hat.device.type == "cuda" and x_hat.dtype == x.dtype
    assert all(t.device.type == "cuda" for t in gpu.tensors().values())
    assert gpu.nbytes == cpu.nbytes
    assert abs(rel_error(x, x_hat.cpu()) - rel_error(x, cpu.decompress())) < 0.02
