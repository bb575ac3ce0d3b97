"""The compiled CPU path (:mod:`gear_lab.compression.cpu_kernel`) against the torch reference
(``cpu_kernel.reference()``): packed codes, scales, zero points, outlier indices and values bit
for bit, low-rank factors within the power iteration's tolerance (same seeded start), and
decompression bit for bit. Skipped only where the library cannot be built here."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import make_tensor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gear_lab import native
from gear_lab.compression import (
    Compressed,
    CompressionConfig,
    TensorCompression,
    compress,
    compress_ranks,
    cpu_kernel,
    get_preset,
)
from gear_lab.errors import PrecisionWarning, TensorError

REASON = cpu_kernel.kernel_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"compiled CPU path: {REASON}")
EXACT = ("codes", "scale", "zero", "outlier_values", "outlier_indices", "full_precision", "sink")


def reference_compress(x, config, **kwargs) -> Compressed:
    with cpu_kernel.reference():
        return compress(x, config, **kwargs)


def reference_decompress(c: Compressed) -> torch.Tensor:
    with cpu_kernel.reference():
        return c.decompress()


def assert_matches(got: Compressed, ref: Compressed, factors: bool = True) -> None:
    """Same kept tensors (names, shapes, dtypes); the exact ones bit for bit; low-rank factors
    close (each left column's direction and sign, each rank-1 term ``left_j right_j``)."""
    gt, rt = got.tensors(), ref.tensors()
    assert {n: (t.shape, t.dtype) for n, t in gt.items()} == {
        n: (t.shape, t.dtype) for n, t in rt.items()
    }
    for name in EXACT:
        if name in rt:
            assert torch.equal(gt[name], rt[name]), name
    if ref.lowrank is None:
        return
    g, r = got.lowrank, ref.lowrank
    product = r.product()
    scale = product.norm(dim=(-2, -1), keepdim=True) + 1e-30
    torch.testing.assert_close(g.product() / scale, product / scale, rtol=0, atol=2e-3)
    if factors:
        terms = [f.left.float().unsqueeze(-1) * f.right.float().unsqueeze(-3) for f in (g, r)]
        torch.testing.assert_close(*(t / scale.unsqueeze(-1) for t in terms), rtol=0, atol=2e-3)
        units = [torch.nn.functional.normalize(f.left.float(), dim=-2) for f in (g, r)]
        torch.testing.assert_close(*units, rtol=0, atol=5e-3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.integers(1, 8),
    axis=st.sampled_from(["channel", "token"]),
    group=st.sampled_from([None, 4, 7, 16, 64, 1000]),
    outliers=st.sampled_from([0.0, 0.02, 0.05, 0.2]),
    mode=st.sampled_from(["signed", "magnitude"]),
    outlier_axis=st.sampled_from(["token", "channel"]),
    rank=st.integers(0, 4),
    factor_dtype=st.sampled_from(["float16", "bfloat16"]),
    block=st.sampled_from([None, 8, 16, 64]),
    shape=st.tuples(
        st.integers(1, 2), st.integers(1, 3), st.integers(8, 80), st.sampled_from([8, 12, 16, 64])
    ),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    style=st.sampled_from(["gauss", "channels", "blocky"]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_the_reference(
    bits, axis, group, outliers, mode, outlier_axis, rank, factor_dtype, block, shape, dtype,
    style, scale, seed,
):  # fmt: skip
    tc = TensorCompression(
        bits=bits, axis=axis, group_size=group, outliers=outliers, outlier_mode=mode,
        outlier_axis=outlier_axis, rank=min(rank, shape[-1], block or shape[-2]), seed=seed,
        factor_dtype=factor_dtype,
    )  # fmt: skip
    config = CompressionConfig(keys=tc, values=tc, block_size=block)
    x = make_tensor(seed, shape, dtype, scale, style)
    got = compress(x, config)
    ref = reference_compress(x, config)
    # blocky tensors repeat rows: the residual may have less rank than asked, and the extra
    # factor columns are then rounding noise in both implementations (their product is not)
    assert_matches(got, ref, factors=style != "blocky")
    assert torch.equal(ref.decompress(), reference_decompress(ref))
    assert torch.equal(got.decompress(), reference_decompress(got))


# 0.01 / 0.02 / 0.03: one or two largest and smallest per vector (the kernel's one-scan heap),
# 0.05 / 0.3: more (a partial sort, a selection)
@pytest.mark.parametrize("outliers", [0.01, 0.02, 0.03, 0.05, 0.3])
@pytest.mark.parametrize("outlier_axis", ["token", "channel"])
@pytest.mark.parametrize("mode", ["signed", "magnitude"])
def test_tied_outliers_come_out_in_the_reference_order(outliers, outlier_axis, mode):
    """Values on a coarse grid tie often: the partial sort / selection must reproduce
    torch.topk's order, not only its set."""
    gen = torch.Generator().manual_seed(3)
    x = (torch.randint(-6, 7, (1, 2, 128, 128), generator=gen) / 4).half()
    config = get_preset(
        "gear", bits=2, outliers=outliers, outlier_axis=outlier_axis, outlier_mode=mode,
        rank=0, block_size=64,
    )  # fmt: skip
    assert_matches(compress(x, config), reference_compress(x, config))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    outliers=st.sampled_from([0.01, 0.02, 0.03, 0.05]),
    mode=st.sampled_from(["signed", "magnitude"]),
    d=st.sampled_from([64, 128]),
    step=st.sampled_from([0.0, 1 / 64]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    zeros=st.booleans(),
)
def test_outliers_of_register_sized_rows_match_the_reference(
    seed, outliers, mode, d, step, dtype, zeros
):
    """Rows of 64 / 128 entries take the kernel's selection in registers (largest two at
    once; from 16-bit inputs, with each entry's position in the low mantissa bits):
    Gaussian values, continuous or on a grid where the extremes sometimes tie, or mostly
    +0 and -0 (equal values with different bits)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 64, d, generator=gen)
    if step:
        x = (x / step).round() * step
    if zeros:
        signs = torch.where(torch.rand(x.shape, generator=gen) < 0.5, -0.0, 0.0)
        x = torch.where(torch.rand(x.shape, generator=gen) < 0.97, signs, x)
    config = get_preset(
        "gear", bits=2, outliers=outliers, outlier_axis="token", outlier_mode=mode, rank=0,
        block_size=64,
    )  # fmt: skip
    x = x.to(dtype)
    assert_matches(compress(x, config), reference_compress(x, config))


def test_llama_shaped_gear_2bit():
    """The benchmark's setting (2-bit, G 64, s 2 %, r 2, n_b 64) on keys with outlier
    channels, with a partial trailing block."""
    x = make_tensor(7, (1, 2, 4096 + 40, 128), torch.float16, 1.0, "channels")
    config = get_preset("gear", bits=2, group_size=64, outliers=0.02, rank=2, block_size=64)
    for kind in ("keys", "values"):
        got, ref = compress(x, config, kind=kind), reference_compress(x, config, kind=kind)
        assert_matches(got, ref)
        assert torch.equal(got.decompress(), reference_decompress(got))


@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("group", [16, 24, 64])
@pytest.mark.parametrize("d", [24, 40, 48, 128])
def test_vector_and_leftover_lanes_match_the_reference(axis, group, d):
    """Widths and groups that split into 16-lane vectors plus a remainder (channels left over
    from the vector code and statistics loops, rows left over from the 16-row token
    statistics), with outliers to skip."""
    tc = TensorCompression(bits=3, axis=axis, group_size=group, outliers=0.05, rank=2)
    config = CompressionConfig(keys=tc, values=tc, block_size=40)
    x = make_tensor(d + group, (1, 2, 80, d), torch.float16, 1.0, "channels")
    got = compress(x, config)
    assert_matches(got, reference_compress(x, config))
    assert torch.equal(got.decompress(), reference_decompress(got))


def test_ranks_share_one_fit_like_the_reference():
    x = make_tensor(11, (1, 2, 128, 64), torch.float16, 1.0, "gauss")
    config = get_preset("gear", bits=2, outliers=0.05, block_size=64)
    got = compress_ranks(x, config, [0, 1, 3, 2])
    with cpu_kernel.reference():
        ref = compress_ranks(x, config, [0, 1, 3, 2])
    for g, r in zip(got, ref, strict=True):
        assert_matches(g, r)


def test_stacked_parts_decompress_on_the_compiled_path():
    config = get_preset("gear", bits=4, rank=2, outliers=0.1, group_size=16, block_size=32)
    x = make_tensor(5, (3, 2, 96, 32), torch.bfloat16, 30.0, "channels")
    parts = Compressed.cat([compress(x[i : i + 1], config) for i in range(3)])
    picked = parts.select(torch.tensor([2, 0]))
    for c in (parts, picked):
        assert torch.equal(c.decompress(), reference_decompress(c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pad", [0, 8])
def test_decompress_into_a_cache_view_matches_the_reference(dtype, pad):
    """Six blocks decompressed into the ``[rows, blocks, kv_heads, n_b, head_dim]`` view of a
    ``[rows, kv_heads, seq, head_dim]`` buffer, as the memory-true cache does: in place (each
    block's rows contiguous) or, with padded rows, through a copy; the reference's values,
    nothing outside the view written."""
    config = get_preset("gear", bits=2, rank=2, outliers=0.05, group_size=16, block_size=16)
    x = make_tensor(9, (6, 2, 16, 32), dtype, 1.0, "channels")  # 2 rows x 3 blocks of 16
    c = compress(x, config)
    buffer = torch.full((2, 2, 80, 32 + pad), float("nan"), dtype=dtype)
    view = buffer[:, :, 16:64, :32].unflatten(2, (3, 16)).transpose(1, 2)
    assert c.decompress_into(view) is view
    assert torch.equal(view, reference_decompress(c).unflatten(0, (2, 3)))
    outside = torch.ones_like(buffer, dtype=torch.bool)
    outside[:, :, 16:64, :32] = False
    assert buffer[outside].isnan().all()


@pytest.mark.parametrize(
    "overrides",
    [
        {"rotate": True},
        {"lowrank": "svd", "rank": 2},
        {"factor_dtype": "float8_e4m3", "rank": 2},
        {"bits": None, "fp8": "e4m3"},
        {"codebook": "gaussian"},
        {"qjl": True},
    ],
)
def test_settings_it_does_not_cover_run_the_reference(overrides):
    tc = get_preset("gear", **overrides).keys
    body = torch.randn(1, 1, 2, 16, 16)
    assert cpu_kernel.compress_body(body, tc, [tc.rank], None) is None
    covered = get_preset("gear").keys
    assert cpu_kernel.compress_body(body, covered, [covered.rank], None) is not None
    assert cpu_kernel.compress_body(body, covered, [covered.rank], body > 0) is None
    assert cpu_kernel.compress_body(body.double(), covered, [covered.rank], None) is None


def test_environment_forces_the_reference(monkeypatch):
    tc = get_preset("gear").keys
    body = torch.randn(1, 1, 2, 16, 16)
    monkeypatch.setenv(cpu_kernel.KERNEL_ENV, "reference")
    assert cpu_kernel.compress_body(body, tc, [tc.rank], None) is None
    assert "forced off" in cpu_kernel.kernel_unavailable_reason()


def test_reference_warnings_and_errors_are_kept():
    config = get_preset("gear", bits=2, rank=1, outliers=0.05, block_size=16)
    with pytest.warns(PrecisionWarning):
        compress(torch.randn(1, 1, 32, 16) * 1e-9, config)
    with pytest.raises(TensorError, match="float16 range"):
        compress(torch.randn(1, 1, 32, 16) * 1e6, config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["sink", "body", "rest"])
def test_nan_and_inf_input_raise_on_the_compiled_path(dtype, bad, where):
    """The kernel checks the blocks it compresses itself (handing them to the reference, which
    raises); the sinks and the trailing partial block, which it does not see, are checked
    apart."""
    config = get_preset("gear", bits=2, rank=2, outliers=0.05, block_size=16, sinks=2)
    x = make_tensor(4, (1, 2, 2 + 48 + 5, 16), dtype)
    x[0, 1, {"sink": 1, "body": 30, "rest": 52}[where], 7] = bad
    with pytest.raises(TensorError, match="NaN or Inf"):
        compress(x, config)
    tc = config.keys
    body = x[..., 2:50, :].unflatten(-2, (3, 16))
    assert (cpu_kernel.compress_body(body, tc, [tc.rank], None) is None) == (where == "body")


def test_failed_build_falls_back_with_one_notice(monkeypatch):
    def broken() -> None:
        raise OSError("c++ failed: simulated")

    monkeypatch.setattr(native, "_load", broken)
    native._built.cache_clear()
    try:
        x = make_tensor(1, (1, 2, 64, 32), torch.float16)
        config = get_preset("gear", bits=2, rank=2, outliers=0.05, block_size=32)
        with pytest.warns(RuntimeWarning, match="compiled CPU kernel unavailable") as notices:
            first = compress(x, config)
            compress(x, config)
            first.decompress()
        assert len(notices) == 1 and "simulated" in str(notices[0].message)
        assert "simulated" in cpu_kernel.kernel_unavailable_reason()
        assert_matches(first, reference_compress(x, config))
    finally:
        native._built.cache_clear()


def test_portable_build_matches_the_reference(monkeypatch, tmp_path):
    """Built for a baseline x86-64 / generic CPU (no AVX-512, no F16C: the scalar fallbacks),
    the library still gives the reference's results."""
    import platform

    march = "-march=x86-64" if platform.machine() in ("x86_64", "AMD64") else "-O3"
    flags = [march if f == "-march=native" else f for f in native.FLAGS]
    monkeypatch.setattr(native, "FLAGS", flags)
    monkeypatch.setattr(native, "_build_dir", lambda: tmp_path)
    portable = native._load()
    monkeypatch.setattr(native, "library", lambda: portable)
    for outliers, axis in ((0.02, "token"), (0.05, "channel")):
        config = get_preset(
            "gear", bits=2, group_size=64, outliers=outliers, outlier_axis=axis, rank=2,
            block_size=64,
        )  # fmt: skip
        x = make_tensor(2, (1, 2, 128 + 5, 64), torch.float16, 1.0, "channels")
        got = compress(x, config)
        assert_matches(got, reference_compress(x, config))
        assert torch.equal(got.decompress(), reference_decompress(got))
