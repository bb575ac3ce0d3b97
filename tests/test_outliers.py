"""Exact-fraction sparse outliers (gear_lab.compression.outliers) and their use in compress()."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import PROPERTY, make_tensor, tensors
from hypothesis import given
from hypothesis import strategies as st

from gear_lab.compression import (
    TensorCompression,
    compress,
    extract_outliers,
    get_preset,
    index_dtype,
    outlier_count,
)

AXES = st.sampled_from(("token", "channel"))
MODES = st.sampled_from(("signed", "magnitude"))
FRACTIONS = st.sampled_from((0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.9))


def vectors(x: torch.Tensor, axis: str) -> torch.Tensor:
    """The ``axis`` vectors of ``x`` as rows."""
    return (x if axis == "token" else x.mT).reshape(-1, x.shape[-1 if axis == "token" else -2])


@PROPERTY
@given(x=tensors(), fraction=FRACTIONS, mode=MODES, axis=AXES)
def test_exact_count_and_the_extremes_are_picked(x, fraction, mode, axis):
    out = extract_outliers(x, fraction, mode, axis)
    n = x.shape[-1] if axis == "token" else x.shape[-2]
    k = outlier_count(fraction, n)
    assert k == int(fraction * n + 0.5)
    mask = out.mask()
    rows, kept_rows = vectors(x, axis), vectors(mask, axis)
    assert (kept_rows.sum(-1) == k).all()  # exactly k distinct entries per vector
    assert out.values.dtype == x.dtype and out.indices.dtype == index_dtype(n)
    for row, kept in zip(rows, kept_rows, strict=True):
        picked = row[kept].double().sort().values
        if mode == "magnitude":
            want = row.double().abs().sort().values[n - k :]
            assert torch.equal(picked.abs().sort().values, want)
        else:
            ordered = row.double().sort().values
            want = torch.cat([ordered[: k // 2], ordered[n - (k - k // 2) :]])
            assert torch.equal(picked, want)


@PROPERTY
@given(
    x=tensors(max_seq=40),
    fraction=FRACTIONS,
    mode=MODES,
    axis=AXES,
    bits=st.integers(1, 4),
    rank=st.integers(0, 1),
)
def test_outliers_restored_exactly_by_compress(x, fraction, mode, axis, bits, rank):
    tc = TensorCompression(
        bits=bits, outliers=fraction, outlier_mode=mode, outlier_axis=axis, rank=rank
    )
    c = compress(x, tc)
    mask = c.outlier_mask()
    assert mask.shape == x.shape
    assert torch.equal(c.decompress()[mask], x[mask])
    n = x.shape[-1] if axis == "token" else x.shape[-2]
    assert int(mask.sum()) == outlier_count(fraction, n) * (x.numel() // n)


@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("seq", [1, 5, 63, 64, 130])
def test_count_right_on_short_blocks_and_any_head_count(heads, seq):
    """The per-vector fraction never drifts with block length or head count (a pitfall of the
    reference code): key outliers per channel inside each 64-token block."""
    x = make_tensor(seq, (2, heads, seq, 16), style="channels")
    config = get_preset("gear", outliers=0.1, rank=0, block_size=32, key_outlier_axis="channel")
    c = compress(x, config, "keys")
    mask = c.outlier_mask()
    blocks = seq // 32
    per_block = outlier_count(0.1, 32)
    assert int(mask[..., : blocks * 32, :].sum()) == per_block * blocks * 2 * heads * 16
    assert not mask[..., blocks * 32 :, :].any()  # the full-precision tail holds no outliers


def test_index_dtype_is_the_smallest_that_fits():
    assert index_dtype(256) == torch.uint8
    assert index_dtype(257) == torch.int16
    assert index_dtype(2**15) == torch.int16
    assert index_dtype(2**15 + 1) == torch.int32
    x = make_tensor(3, (1, 1, 300, 4))
    assert extract_outliers(x, 0.05, axis="channel").indices.dtype == torch.int16


def test_excluded_entries_are_not_picked():
    x = make_tensor(4, (1, 2, 10, 32))
    exclude = torch.zeros(x.shape, dtype=torch.bool)
    exclude[..., 5] = True
    x[..., 5] = 100.0  # the largest entries of every token, but excluded (e.g. padding)
    for mode in ("signed", "magnitude"):
        out = extract_outliers(x, 0.1, mode, "token", exclude)
        assert not (out.mask() & exclude).any()
        assert (out.mask().sum(-1) == outlier_count(0.1, 32)).all()


def test_fraction_zero_keeps_nothing():
    x = make_tensor(5, (1, 1, 8, 8))
    c = compress(x, TensorCompression(bits=2, outliers=0.0))
    assert c.bytes_by_part()["outliers"] == 0 and not c.outlier_mask().any()
