"""Low-rank residual factors (gear_lab.compression.lowrank): exact SVD and seeded power iteration."""

from __future__ import annotations

from dataclasses import replace

import scipy.stats
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
from gear_lab.compression.lowrank import power_lowrank_ranks, subspace_factors

# a rank from the shared power iteration may be off a separate one's tail energy by this factor
# (worst seen: 1.07 over 2593 random matrices; on average it is 2 % closer, see below)
POWER_TOLERANCE = 1.10
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
    power = compress_ranks(x, TensorCompression(**{**tc.to_dict(), "lowrank": "power"}), ranks)
    alone = compress(x, TensorCompression(**{**tc.to_dict(), "lowrank": "power", "rank": 4}))
    assert torch.equal(power[-1].decompress(), alone.decompress())  # the largest rank: exact
    assert [c.nbytes for c in power] == [c.nbytes for c in results]


@PROPERTY
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(4, 48), st.integers(4, 24)),
    seed=st.integers(0, 10**6),
    data=st.data(),
)
def test_subspace_factors_are_the_truncated_svd_within_the_basis(shape, seed, data):
    """Below the basis' rank, the factors are the best approximation of that rank within it:
    ``q`` times the truncated SVD of ``projected`` (its singular values and product, up to the
    float16 rounding of the kept factors), including rank-deficient projections."""
    x = make_tensor(seed, (1, *shape), style="channels")
    top = data.draw(st.integers(2, min(shape[-2:])))
    ranks = sorted(set(data.draw(st.lists(st.integers(1, top - 1), min_size=1, max_size=3))))
    q = torch.linalg.qr(x.double() @ torch.randn(shape[-1], top, dtype=torch.float64)).Q
    projected = q.mT @ x.double()
    if data.draw(st.booleans()):  # rank-deficient: the last component carries no energy
        projected[..., -1, :] = 0.0
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    scale = x.double().abs().amax().clamp_min(1e-30)
    for rank, kept in zip(
        ranks, subspace_factors(q.float(), projected.float(), ranks), strict=True
    ):
        assert kept.rank == rank
        want = q @ (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        got = kept.product(torch.float64)
        assert torch.allclose(got, want, rtol=0, atol=4e-3 * float(scale)), rank


@PROPERTY
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(4, 48), st.integers(4, 24)),
    seed=st.integers(0, 10**6),
    style=st.sampled_from(["gauss", "channels"]),
    data=st.data(),
)
def test_power_ranks_share_one_iteration_within_its_tolerance(shape, seed, style, data):
    """Ranks from one power iteration at the largest rank: that rank is exactly
    :func:`power_lowrank`; each smaller rank is never better than the exact SVD of its rank and
    never worse than a separate power iteration of its rank by more than the iteration's
    tolerance, in tail energy (the residual's norm beyond the fit)."""
    x = make_tensor(seed, (1, *shape), style=style)
    top = data.draw(st.integers(2, min(shape[-2:])))
    ranks = sorted(set(data.draw(st.lists(st.integers(1, top - 1), min_size=1, max_size=3))))
    ranks.append(top)
    shared = power_lowrank_ranks(x, ranks, loops=3, seed=seed % 97)
    alone = power_lowrank(x, top, loops=3, seed=seed % 97)
    assert torch.equal(shared[-1].left, alone.left) and torch.equal(shared[-1].right, alone.right)
    norm = x.double().flatten(-2).norm(dim=-1)
    for rank, factors in zip(ranks, shared, strict=True):
        assert factors.rank == rank
        err = (x.double() - factors.product(torch.float64)).flatten(-2).norm(dim=-1)
        separate = power_lowrank(x, rank, loops=3, seed=seed % 97).product(torch.float64)
        err_separate = (x.double() - separate).flatten(-2).norm(dim=-1)
        slack = 2e-3 * norm + 1e-6  # float16 factors
        assert (err >= tail_energy(x, rank) - slack).all()
        assert (err <= POWER_TOLERANCE * err_separate + slack).all()


def test_power_ranks_are_on_average_closer_than_separate_iterations():
    """Paired over 120 random matrices, the shared iteration's smaller ranks leave less tail
    energy than separate power iterations of those ranks (one-sided t-test, p < 0.01): the
    extra columns of the largest rank oversample the smaller ones."""
    gen = torch.Generator().manual_seed(11)
    ratios = []
    for trial in range(40):
        seq, dim = (int(v) for v in torch.randint(8, 48, (2,), generator=gen))
        x = make_tensor(trial, (1, 3, seq, dim), style=("gauss", "channels")[trial % 2])
        top = min(seq, dim, 8)
        ranks = [max(1, top // 4), max(1, top // 2), top]
        for rank, factors in zip(ranks, power_lowrank_ranks(x, ranks, seed=trial), strict=True):
            if rank == top:
                continue
            err = (x - factors.product()).flatten(-2).norm(dim=-1)
            alone = (x - power_lowrank(x, rank, seed=trial).product()).flatten(-2).norm(dim=-1)
            ratios += (err / alone).flatten().tolist()
    test = scipy.stats.ttest_1samp(ratios, 1.0, alternative="less")
    assert len(ratios) >= 120 and test.pvalue < 0.01, (sum(ratios) / len(ratios), test.pvalue)


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
