"""Low-rank residual factors (gear_lab.compression.lowrank): exact SVD and seeded power iteration."""

from __future__ import annotations

from dataclasses import replace

import torch
from compress_helpers import PROPERTY, make_tensor
from hypothesis import given
from hypothesis import strategies as st

from gear_lab.compression import (
    TensorCompression,
    compress,
    compress_ranks,
    power_lowrank,
    svd_lowrank,
)

SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.integers(1, 24))


def tail_energy(x: torch.Tensor, rank: int) -> torch.Tensor:
    """sqrt of the singular-value energy beyond ``rank``, per matrix."""
    s = torch.linalg.svdvals(x.double())
    return s[..., rank:].pow(2).sum(-1).sqrt()


@PROPERTY
@given(shape=SHAPES, seed=st.integers(0, 10**6), data=st.data())
def test_svd_residual_error_is_the_tail_energy(shape, seed, data):
    x = make_tensor(seed, shape)
    rank = data.draw(st.integers(1, min(shape[-2:])))
    # pure low rank through compress (no quantizer, no outliers): residual = x itself
    c = compress(x, TensorCompression(bits=None, rank=rank, lowrank="svd"))
    err = (x.double() - c.decompress().double()).flatten(-2).norm(dim=-1)
    norm = x.double().flatten(-2).norm(dim=-1)
    # float16 factors add at most a few float16 ulps of the approximation itself
    assert ((err - tail_energy(x, rank)).abs() <= 2e-3 * norm + 1e-6).all()


def test_power_iteration_seeded_and_close_to_svd():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(2, 3, 64, 4, generator=gen) @ torch.randn(2, 3, 4, 32, generator=gen)
    x = low + 0.01 * torch.randn(2, 3, 64, 32, generator=gen)
    a, b = power_lowrank(x, 4, loops=3, seed=7), power_lowrank(x, 4, loops=3, seed=7)
    assert torch.equal(a.left, b.left) and torch.equal(a.right, b.right)  # bit-identical
    other = power_lowrank(x, 4, loops=3, seed=8)
    assert not torch.equal(other.left, a.left)
    err_power = (x - a.product()).norm()
    err_svd = (x - svd_lowrank(x, 4).product()).norm()
    assert err_power <= 1.05 * err_svd + 1e-3
    # one loop already beats doing nothing; more loops are not worse on a gapped spectrum
    assert (x - power_lowrank(x, 4, loops=1, seed=7).product()).norm() < x.norm()


def test_factors_are_float16_and_per_matrix():
    x = make_tensor(1, (2, 3, 20, 16))
    for factors in (svd_lowrank(x, 3), power_lowrank(x, 3)):
        assert factors.left.dtype == factors.right.dtype == torch.float16
        assert factors.left.shape == (2, 3, 20, 3) and factors.right.shape == (2, 3, 3, 16)


def test_batch_elements_do_not_share_a_subspace():
    """Compressing a batch equals compressing each element alone (the reference code reused
    batch element 0's subspace for every element)."""
    x = make_tensor(2, (3, 2, 48, 16), style="channels")
    for method in ("power", "svd"):
        tc = TensorCompression(bits=2, axis="token", group_size=8, rank=3, lowrank=method)
        batch = compress(x, tc).decompress()
        for b in range(3):
            alone = compress(x[b : b + 1], tc).decompress()
            torch.testing.assert_close(batch[b : b + 1], alone, rtol=1e-5, atol=1e-6)


def test_zero_residual_gives_zero_factors():
    x = torch.zeros(1, 2, 16, 8)
    for method in ("power", "svd"):
        c = compress(x, TensorCompression(bits=None, rank=2, lowrank=method))
        assert torch.equal(c.decompress(), x)


def test_compress_ranks_shares_one_svd_and_matches_separate_calls():
    x = make_tensor(3, (1, 2, 40, 16), style="channels")
    tc = TensorCompression(bits=2, group_size=16, outliers=0.05, lowrank="svd")
    ranks = [0, 1, 2, 4]
    results = compress_ranks(x, tc, ranks)
    errors = []
    for r, c in zip(ranks, results, strict=True):
        alone = compress(x, TensorCompression(**{**tc.to_dict(), "rank": r}))
        assert c.config.rank == r
        assert torch.equal(c.decompress(), alone.decompress())
        assert c.nbytes == alone.nbytes
        errors.append((x - c.decompress()).norm())
    assert errors == sorted(errors, reverse=True)  # more rank, less error (exact SVD)
    power = compress_ranks(x, TensorCompression(**{**tc.to_dict(), "lowrank": "power"}), [2])[0]
    alone = compress(x, TensorCompression(**{**tc.to_dict(), "lowrank": "power", "rank": 2}))
    assert torch.equal(power.decompress(), alone.decompress())


def test_float8_factors_halve_the_bytes_and_keep_the_error():
    """float8_e4m3 factors (plus a float16 scale per rank component) cost about half the bytes
    of float16 ones, measured from ``tensors()``. Their product is off by e4m3's rounding (3
    mantissa bits: a few % of ``L``), which is within 2 % of the fp16 error when the matrix is
    low rank plus comparable noise, as GEAR's quantization residual is."""
    gen = torch.Generator().manual_seed(3)
    low = torch.randn(2, 3, 64, 4, generator=gen) @ torch.randn(2, 3, 4, 64, generator=gen)
    x = low + 0.5 * torch.randn(2, 3, 64, 64, generator=gen)
    for method in ("power", "svd"):
        base = TensorCompression(bits=None, rank=4, lowrank=method)
        half, eight = (
            compress(x, replace(base, factor_dtype=d)) for d in ("float16", "float8_e4m3")
        )
        assert set(eight.tensors()) == {
            "lowrank_left",
            "lowrank_right",
            "lowrank_left_scale",
            "lowrank_right_scale",
        }
        assert eight.lowrank.left.dtype == eight.lowrank.right.dtype == torch.float8_e4m3fn
        assert eight.nbytes == sum(t.nbytes for t in eight.tensors().values())
        assert eight.bytes_by_part()["lowrank"] == eight.nbytes
        assert 0.5 < eight.nbytes / half.nbytes < 0.52  # 1 byte / entry + 2 x 2 bytes per rank
        err16, err8 = ((c.decompress() - x).norm() / x.norm() for c in (half, eight))
        assert err16 < err8 <= 1.02 * err16
        p16, p8 = half.lowrank.product(), eight.lowrank.product()
        assert (p8 - p16).norm() / p16.norm() < 0.05  # e4m3 rounding, not a scale error
    svd8 = svd_lowrank(x, 4, "float8_e4m3")
    two = svd8.truncate(2)
    assert two.left_scale.shape == (2, 3, 1, 2) and two.right_scale.shape == (2, 3, 2, 1)
    torch.testing.assert_close(two.product(), svd_lowrank(x, 2, "float8_e4m3").product())


def test_bfloat16_factors_and_zero_columns():
    x = make_tensor(4, (1, 2, 24, 16))
    factors = power_lowrank(x, 3, factor_dtype="bfloat16")
    assert factors.left.dtype == factors.right.dtype == torch.bfloat16
    assert factors.left_scale is None
    zero = svd_lowrank(torch.zeros(1, 1, 8, 8), 2, "float8_e4m3")  # amax 0: scale guarded
    assert torch.equal(zero.product(), torch.zeros(1, 1, 8, 8))
