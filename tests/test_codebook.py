"""Lloyd-Max / k-means codebook quantization (gear_lab.compression.codebook) against direct
references: scipy's Gaussian and Beta distributions, a numpy k-means, per-group loops."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from compress_helpers import PROPERTY, make_tensor
from hypothesis import given
from hypothesis import strategies as st
from scipy import special, stats

from gear_lab.compression import (
    Compressed,
    CompressionConfig,
    TensorCompression,
    codebook_quantize,
    compress,
    get_preset,
    lloyd_max_levels,
)
from gear_lab.compression.codebook import KMEANS_ITERATIONS, nearest
from gear_lab.errors import ConfigError


def reference_lloyd_max(bits: int, mass, moment, lo: float, hi: float, sd: float) -> np.ndarray:
    """Lloyd-Max levels from a distribution's exact cell mass and first moment (standard
    deviation ``sd``: the start spans +-2 sd, so every start cell holds mass)."""
    levels = 1 << bits
    q = np.linspace(-2 * sd, 2 * sd, levels + 2)[1:-1]
    for _ in range(200_000):
        bounds = np.concatenate([[lo], (q[1:] + q[:-1]) / 2, [hi]])
        new = np.diff(moment(bounds)) / np.diff(mass(bounds))
        if np.abs(new - q).max() < 1e-13:
            return new
        q = new
    raise AssertionError("reference Lloyd-Max did not converge")


def gaussian_reference(bits: int) -> np.ndarray:
    # cell mean of N(0, 1) on [a, b]: (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    return reference_lloyd_max(bits, stats.norm.cdf, lambda t: -stats.norm.pdf(t), -40, 40, 1.0)


def sphere_reference(bits: int, n: int) -> np.ndarray:
    """A coordinate of a uniform unit vector in R^n: t^2 ~ Beta(1/2, (n - 1) / 2)."""
    k = (n - 1) / 2

    def cdf(t):
        return 0.5 + 0.5 * np.sign(t) * special.betainc(0.5, k, t * t)

    def moment(t):  # integral of t * (1 - t^2)^(k - 1) / B(1/2, k)
        return -((1 - t * t) ** k) / (2 * k * special.beta(0.5, k))

    return reference_lloyd_max(bits, cdf, moment, -1.0, 1.0, 1 / math.sqrt(n))


def test_gaussian_levels_are_the_known_lloyd_max_optima():
    torch.testing.assert_close(lloyd_max_levels(1), torch.tensor([-1, 1.0]) * math.sqrt(2 / math.pi),
                               check_dtype=False, rtol=0, atol=1e-6)  # fmt: skip
    two = lloyd_max_levels(2)
    assert np.allclose(two.numpy(), [-1.5104, -0.4528, 0.4528, 1.5104], atol=1e-4)
    three = lloyd_max_levels(3)[4:]
    assert np.allclose(three.numpy(), [0.2451, 0.7560, 1.3440, 2.1520], atol=1e-4)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_gaussian_levels_match_scipy(bits):
    got = lloyd_max_levels(bits).numpy()
    assert got.dtype == np.float64 and np.all(np.diff(got) > 0)
    np.testing.assert_allclose(got, gaussian_reference(bits), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("bits", "n"), [(1, 4), (2, 8), (3, 16), (2, 64), (4, 128)])
def test_sphere_levels_match_scipy(bits, n):
    got = lloyd_max_levels(bits, "sphere", n).numpy()
    np.testing.assert_allclose(got, sphere_reference(bits, n), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_sphere_levels_in_three_dimensions_are_uniform(bits):
    """Archimedes: a coordinate of a uniform point on S^2 is uniform on [-1, 1], whose
    Lloyd-Max quantizer is the uniform one."""
    levels = 1 << bits
    want = -1 + (2 * np.arange(levels) + 1) / levels
    np.testing.assert_allclose(lloyd_max_levels(bits, "sphere", 3).numpy(), want, atol=1e-6)


def test_sphere_levels_approach_the_gaussian_ones():
    wide = lloyd_max_levels(3, "sphere", 4096) * math.sqrt(4096)
    torch.testing.assert_close(wide, lloyd_max_levels(3), rtol=0, atol=2e-3)


@PROPERTY
@given(
    values=st.lists(st.floats(-10, 10), min_size=1, max_size=40),
    levels=st.lists(st.floats(-10, 10), min_size=1, max_size=9),
)
def test_nearest_picks_the_closest_level(values, levels):
    z = torch.tensor(values, dtype=torch.float64)
    book = torch.tensor(sorted(levels), dtype=torch.float64)
    for idx in (nearest(z, book), nearest(z[None], book[None])[0]):  # shared and per row
        dist = (z[:, None] - book[None, :]).abs()
        torch.testing.assert_close(dist.gather(1, idx[:, None])[:, 0], dist.min(1).values)


def reference_kmeans(samples: np.ndarray, valid: np.ndarray, levels: int) -> np.ndarray:
    """The documented algorithm, one row at a time: quantile starts, Lloyd iterations."""
    x = np.sort(samples[valid])
    if x.size == 0:
        return np.zeros(levels)
    c = x[((np.arange(levels) + 0.5) / levels * x.size).astype(int)]
    for _ in range(KMEANS_ITERATIONS):
        cells = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        for j in range(levels):
            if np.any(cells == j):
                c[j] = x[cells == j].mean()
        c = np.sort(c)
    return c


def half(value: float, up: bool) -> float:
    """``value`` rounded to float16 upwards or downwards (as the stored statistics are)."""
    h = np.float16(value)
    if (up and h < value) or (not up and h > value):
        h = np.nextafter(h, np.float16(np.inf if up else -np.inf))
    return float(h)


def reference_codebook(x, bits, codebook, axis, group_size):
    """Per group loops: normalization by float16 statistics (mean rounded down, std or L2 norm
    up), levels (fitted by :func:`reference_kmeans`), nearest level, reconstruction ``zero +
    scale * level`` in float64. Returns (reconstruction, fitted levels per book or None)."""
    x = x.double().numpy()
    seq, dim = x.shape[-2:]
    size = (seq if axis == "channel" else dim) if group_size is None else group_size
    vectors = np.swapaxes(x, -1, -2) if axis == "channel" else x  # [..., vector, member]
    length = vectors.shape[-1]
    z = np.zeros_like(vectors)
    zero = np.zeros_like(vectors)
    scale = np.zeros_like(vectors)
    for idx in np.ndindex(vectors.shape[:-1]):
        for start in range(0, length, size):
            g = vectors[idx][start : start + size]
            if codebook == "sphere":
                mu, s = 0.0, half(np.sqrt((g**2).sum()), up=True)
            else:
                mu = half(g.mean(), up=False)
                s = half(np.sqrt(((g - mu) ** 2).mean()), up=True)
            zero[idx][start : start + size] = mu
            scale[idx][start : start + size] = s
            z[idx][start : start + size] = (g - mu) / s if s > 0 else 0.0
    fitted = None
    if codebook in ("gaussian", "sphere"):
        books = lloyd_max_levels(bits, codebook, min(size, length)).numpy()
    else:  # k-means ignores the order of a book's entries: a matrix is one flat row
        rows = z.reshape(*z.shape[:-2], 1, -1) if codebook == "fitted-head" else z
        fitted = np.zeros((*rows.shape[:-1], 1 << bits))
        for idx in np.ndindex(rows.shape[:-1]):
            fitted[idx] = reference_kmeans(rows[idx], np.ones(rows.shape[-1], bool), 1 << bits)
        fitted = fitted.astype(np.float16).astype(np.float64)
        books = fitted
    books = np.broadcast_to(books, (*vectors.shape[:-1], 1 << bits))
    recon = np.take_along_axis(books, np.abs(z[..., None] - books[..., None, :]).argmin(-1), -1)
    recon = zero + scale * recon
    return (np.swapaxes(recon, -1, -2) if axis == "channel" else recon), fitted


@PROPERTY
@given(
    seed=st.integers(0, 2**16),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 9), st.integers(1, 9)),
    bits=st.integers(1, 4),
    codebook=st.sampled_from(["gaussian", "sphere", "fitted", "fitted-head"]),
    axis=st.sampled_from(["channel", "token"]),
    group_size=st.sampled_from([None, 3, 4]),
)
def test_codebook_quantize_matches_a_per_group_reference(
    seed, shape, bits, codebook, axis, group_size
):
    """Ragged last groups, per channel / per token / per matrix books, every codebook."""
    x = make_tensor(seed, shape, torch.float64)
    q, recon = codebook_quantize(x, bits, codebook, axis, group_size)
    want, fitted = reference_codebook(x, bits, codebook, axis, group_size)
    np.testing.assert_allclose(recon.numpy(), want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(q.dequantize(torch.float64), recon, rtol=0, atol=0)
    assert (q.levels is None) == (fitted is None)
    if fitted is not None:
        np.testing.assert_array_equal(q.levels.double().numpy(), fitted)


def mse(x: torch.Tensor, tc: TensorCompression) -> float:
    return float((compress(x, tc).decompress().double() - x.double()).square().mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebooks_beat_uniform_levels_on_gaussian_data(bits):
    """At the same bits: Lloyd-Max codebooks, fitted or Gaussian, have a lower MSE than
    min/max uniform levels on Gaussian entries. Per token (64 entries) the fixed sphere levels
    win up to 3 bits; at 4 they spend levels on tails that 64 samples rarely reach, where the
    min/max range of each token adapts (0.0090 vs 0.0080 here)."""
    x = make_tensor(bits, (1, 2, 512, 64))
    uniform = TensorCompression(bits=bits, group_size=None)
    for codebook in ("gaussian", "fitted", "fitted-head"):
        assert mse(x, replace(uniform, codebook=codebook)) < 0.9 * mse(x, uniform), codebook
    token = replace(uniform, axis="token")
    assert (mse(x, replace(token, codebook="sphere")) < mse(x, token)) == (bits < 4)


@pytest.mark.parametrize("codebook", ["gaussian", "sphere", "fitted", "fitted-head"])
@pytest.mark.parametrize("axis", ["channel", "token"])
def test_bytes_are_the_kept_tensors(codebook, axis):
    x = make_tensor(0, (2, 3, 40, 16), torch.float16)
    config = CompressionConfig(*(TensorCompression(bits=3, axis=axis, group_size=8,
                                                   codebook=codebook),) * 2, block_size=16)  # fmt: skip
    c = compress(x, config)
    kept = c.tensors()
    assert c.nbytes == sum(t.nbytes for t in kept.values()) == sum(c.bytes_by_part().values())
    assert kept["codes"].nbytes == 2 * 3 * 32 * 16 * 3 // 8
    assert ("zero" in kept) == (codebook != "sphere")
    assert kept["scale"].dtype == torch.float16
    books = {"fitted": 16, "fitted-head": 1}  # 16 channels, or the 16 tokens of a block
    if codebook in books:
        assert kept["codebook"].dtype == torch.float16
        assert kept["codebook"].shape == (2, 3, 2, books[codebook], 8)
        assert c.bytes_by_part()["codebook"] == kept["codebook"].nbytes
    else:
        assert "codebook" not in kept and c.bytes_by_part()["codebook"] == 0
    x_hat = c.decompress()
    assert (x_hat.shape, x_hat.dtype) == (x.shape, x.dtype) and torch.isfinite(x_hat).all()
    assert torch.equal(x_hat[..., 32:, :], x[..., 32:, :])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_and_seeds_reproduce(dtype):
    x = make_tensor(3, (1, 2, 64, 32), dtype)
    config = get_preset("turboquant", bits=3, rank=1, outliers=0.05)
    for kind in ("keys", "values"):
        a, b = compress(x, config, kind), compress(x, config, kind)
        assert a.tensors().keys() == b.tensors().keys()
        assert all(torch.equal(t, b.tensors()[n]) for n, t in a.tensors().items())
        assert (a.decompress().shape, a.decompress().dtype) == (x.shape, dtype)
        other = compress(x, with_seed(config, 1), kind)
        assert not torch.equal(other.tensors()["codes"], a.tensors()["codes"])


def with_seed(config: CompressionConfig, seed: int) -> CompressionConfig:
    return replace(
        config, keys=replace(config.keys, seed=seed), values=replace(config.values, seed=seed)
    )


def test_statistics_and_codebooks_ignore_outliers_and_ignored_entries():
    x = make_tensor(4, (1, 1, 64, 16), torch.float64)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., ::7, 3] = True
    spiked = torch.where(mask, torch.full_like(x, 1e3), x)
    tc = TensorCompression(bits=3, group_size=None, codebook="fitted")
    clean = compress(x, tc, ignore=mask).tensors()
    dirty = compress(spiked, tc, ignore=mask).tensors()
    for name in ("scale", "zero", "codebook"):
        assert torch.equal(clean[name], dirty[name]), name


def test_compressed_codebook_blocks_stack_and_select():
    g = torch.Generator().manual_seed(0)
    tc = TensorCompression(bits=3, axis="channel", group_size=None, codebook="fitted")
    parts = [compress(torch.randn(n, 2, 16, 8, generator=g), tc) for n in (2, 1)]
    joined = Compressed.cat(parts)
    want = torch.cat([p.decompress() for p in parts])
    assert torch.equal(joined.decompress(), want) and joined.nbytes == sum(p.nbytes for p in parts)
    assert torch.equal(joined.select(torch.tensor([2, 0])).decompress(), want[[2, 0]])


def test_codebook_and_qjl_settings_are_validated():
    with pytest.raises(ConfigError, match="codebook must be one of"):
        TensorCompression(codebook="lloyd")
    with pytest.raises(ConfigError, match="codebook needs bits"):
        TensorCompression(bits=None, fp8="e4m3", codebook="gaussian")
    with pytest.raises(ConfigError, match="qjl needs bits >= 2"):
        TensorCompression(bits=1, qjl=True)
    with pytest.raises(ConfigError, match="qjl must be true or false"):
        TensorCompression(qjl=1)
