"""The QJL sign sketch (gear_lab.compression.qjl) and TurboQuant's keys: unbiasedness by a
seeded Monte Carlo with a tolerance from the estimator's variance, and the estimator written
out directly against the attention the reconstruction gives."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from compress_helpers import make_tensor

from gear_lab.compression import (
    Compressed,
    compress,
    get_preset,
    hadamard_rotation,
    qjl_sketch,
    sketch_matrix,
)

CPU = torch.device("cpu")


def qjl_variance(q: torch.Tensor, r: torch.Tensor, m: int) -> float:
    """Var of ``sqrt(pi/2)/m ||r|| sum_i <s_i, q> sign(<s_i, r>)`` over Gaussian ``S``: each
    term ``Y_i = <s_i, q> sign(<s_i, r>)`` has ``E[Y^2] = ||q||^2`` and ``E[Y] = sqrt(2/pi)
    <q, r> / ||r||``, so the variance is ``(pi/2 ||q||^2 ||r||^2 - <q, r>^2) / m``, at most
    ``pi / (2m) ||q||^2 ||r||^2`` (q orthogonal to r), at least ``(pi/2 - 1) / m`` of it."""
    qq, rr, qr = float(q @ q), float(r @ r), float(q @ r)
    return (math.pi / 2 * qq * rr - qr**2) / m


@pytest.mark.parametrize(("d", "angle"), [(16, 0.3), (32, 1.2), (12, math.pi / 2)])
def test_qjl_inner_products_are_unbiased(d, angle):
    """Over 4000 sketch seeds: the mean estimate of <q, r> is within 5 standard errors of it,
    and the sample variance within 15 % of the derived variance."""
    g = torch.Generator().manual_seed(d)
    u, v = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64)).Q.T
    r = 2.0 * u  # ||r|| = 2 is exact in float16, so the stored norm adds no bias
    q = 3.0 * (math.cos(angle) * u + math.sin(angle) * v)
    seeds = 4000
    estimates = torch.tensor(
        [
            float(q @ qjl_sketch(r[None], seed).reconstruct(torch.float64)[0])
            for seed in range(seeds)
        ],
        dtype=torch.float64,
    )
    variance = qjl_variance(q, r, d)
    assert variance <= math.pi / (2 * d) * float(q @ q) * float(r @ r) + 1e-12
    assert abs(float(estimates.mean()) - float(q @ r)) < 5 * math.sqrt(variance / seeds)
    assert abs(float(estimates.var()) / variance - 1) < 0.15


def test_sketch_is_seeded_packed_and_exact_for_zero():
    r = make_tensor(0, (2, 3, 5, 12), torch.float64)
    a, b = qjl_sketch(r, 7), qjl_sketch(r, 7)
    assert torch.equal(a.signs, b.signs) and torch.equal(a.norm, b.norm)
    assert not torch.equal(a.signs, qjl_sketch(r, 8).signs)
    assert a.signs.shape == (2, 3, 5, 2) and a.signs.dtype == torch.uint8  # 12 bits -> 2 bytes
    assert a.norm.shape == (2, 3, 5, 1) and a.norm.dtype == torch.float16
    s = sketch_matrix(12, 12, 7, CPU, torch.float64)
    bits = (r @ s.T >= 0).to(torch.uint8)
    unpacked = torch.stack([(a.signs[..., i // 8] >> (i % 8)) & 1 for i in range(12)], -1)
    assert torch.equal(unpacked, bits)
    zero = qjl_sketch(torch.zeros(1, 1, 3, 8), 0)
    assert torch.equal(zero.reconstruct(), torch.zeros(1, 1, 3, 8))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_attention_scores_are_the_qjl_estimator(bits):
    """<q, k_hat> of the decompressed keys equals TurboQuant's estimator written out:
    ``<q, k_mse> + sqrt(pi/2)/m ||r|| <S P q, sign(S P r)>`` (P the rotation, r = k - k_mse,
    k_mse the (bits - 1)-bit codebook reconstruction), so attention uses the estimator."""
    d = 32
    k = make_tensor(bits, (1, 2, 24, d), torch.float64, style="channels")
    q = make_tensor(bits + 10, (1, 2, 24, d), torch.float64)
    tc = get_preset("turboquant", bits=bits).keys
    c = compress(k, tc)
    k_mse = compress(k, replace(tc, bits=bits - 1, qjl=False)).decompress()
    rotation = hadamard_rotation(d, tc.seed, CPU, torch.float64)
    s = sketch_matrix(d, d, tc.seed, CPU, torch.float64)
    signs = torch.where((k - k_mse) @ rotation @ s.T >= 0, 1.0, -1.0).double()
    norm = c.sketch.norm.double()  # ||r|| as stored (float16)
    torch.testing.assert_close(norm, (k - k_mse).norm(dim=-1, keepdim=True), rtol=1e-3, atol=0)
    scores = q @ c.decompress().mT
    want = q @ k_mse.mT + math.sqrt(math.pi / 2) / d * (q @ rotation @ s.T) @ (norm * signs).mT
    torch.testing.assert_close(scores, want, rtol=1e-9, atol=1e-9)
    assert c.bytes_by_part()["sketch"] == 2 * 24 * (d // 8 + 2)
    assert c.bytes_by_part()["scales"] == 2 * 24 * 2  # one float16 norm per token
    assert c.bytes_by_part()["codes"] == 2 * 24 * d * (bits - 1) // 8


def test_qjl_composes_with_outliers_low_rank_and_blocks():
    x = make_tensor(5, (2, 2, 40, 16), torch.float32, style="channels")
    # without rotation, so that kept outliers sit at input coordinates
    config = get_preset("turboquant", bits=3, rank=2, outliers=0.1, block_size=16, rotate=False)
    c = compress(x, config, "keys")
    x_hat = c.decompress()
    mask = c.outlier_mask()
    assert mask.any() and torch.equal(x_hat[mask], x[mask])
    assert torch.equal(x_hat[..., 32:, :], x[..., 32:, :])
    assert c.sketch.signs.shape == (2, 2, 2, 16, 2)
    joined = Compressed.cat([c, c])
    assert torch.equal(joined.decompress(), torch.cat([x_hat, x_hat]))
    assert torch.equal(joined.select(torch.tensor([3])).decompress(), x_hat[1:])
