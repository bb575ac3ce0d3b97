"""The fused Triton GEAR kernels against the torch reference (gear_lab.compression).

Without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py`` before Triton is first imported), on small shapes. With CUDA they run compiled on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gear_lab.compression import CompressionConfig, TensorCompression, compress, get_preset
from gear_lab.errors import ConfigError, KernelUnavailableError, TensorError
from gear_lab.kernels import compress_fused, decompress_fused, fused_unavailable_reason

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    fused_unavailable_reason(DEVICE) is not None,
    reason=f"fused kernel unavailable: {fused_unavailable_reason(DEVICE)}",
)


def tie_free(shape: tuple[int, ...], dtype: torch.dtype, axis: str, seed: int) -> torch.Tensor:
    """Entries ``+-k / 16`` with ``k`` a permutation of ``1..n`` along every ``axis`` vector
    (exact in bfloat16), so the outlier choice has no ties and both implementations must
    pick the same entries."""
    gen = torch.Generator().manual_seed(seed)
    dim = -1 if axis == "token" else -2
    ranks = torch.rand(shape, generator=gen).argsort(dim).argsort(dim) + 1
    signs = torch.randint(0, 2, shape, generator=gen) * 2 - 1
    return (ranks * signs / 16).to(DEVICE, dtype)


def assert_same(fused, ref, x: torch.Tensor) -> None:
    """Same kept tensors (names, shapes, dtypes, bytes); identical codes, scales, zero points
    and outliers; low-rank product and factor norms equal up to float rounding."""
    ft, rt = fused.tensors(), ref.tensors()
    assert {n: (t.shape, t.dtype) for n, t in ft.items()} == {
        n: (t.shape, t.dtype) for n, t in rt.items()
    }
    assert fused.nbytes == ref.nbytes and fused.body_shape == ref.body_shape
    for name in ("codes", "scale", "zero", "full_precision"):
        if name in rt:
            assert torch.equal(ft[name], rt[name]), name
    assert torch.equal(fused.outlier_mask(), ref.outlier_mask())
    if ref.outliers is not None:  # same (index, value) pairs per vector; order is free
        dim = -2 if ref.outliers.axis == "channel" else -1
        for o in (fused.outliers, ref.outliers):
            assert torch.equal(o.values, x[..., : ref.body_shape[-3] * ref.body_shape[-2], :]
                               .reshape(ref.body_shape).gather(dim, o.indices.long()))  # fmt: skip
    if ref.lowrank is not None:
        residual = (x[..., : fused.body_shape[-3] * fused.body_shape[-2], :].float()
                    .reshape(fused.body_shape) - ref.base.dequantize())  # fmt: skip
        scale = residual.norm() + 1e-12
        diff = (fused.lowrank.product() - ref.lowrank.product()).norm() / scale
        assert diff < 3e-3
        left = fused.lowrank.left.float()  # orthonormal columns (zero where R has no more rank)
        gram = left.mT @ left
        eye = torch.diag_embed((gram.diagonal(dim1=-2, dim2=-1) > 0.5).float())
        torch.testing.assert_close(gram, eye, rtol=0, atol=5e-3)
    y_f, y_r = fused.decompress().float(), ref.decompress().float()
    assert ((y_f - y_r).norm() / x.float().norm()) < 3e-3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    axis=st.sampled_from(["channel", "token"]),
    group=st.sampled_from([8, 16, None, 1024]),
    outliers=st.sampled_from([0.0, 0.05, 0.2]),
    mode=st.sampled_from(["signed", "magnitude"]),
    outlier_axis=st.sampled_from(["token", "channel"]),
    rank=st.sampled_from([0, 1, 2, 3]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    extra=st.integers(0, 20),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_torch_reference(
    bits, axis, group, outliers, mode, outlier_axis, rank, dtype, extra, seed
):
    tc = TensorCompression(
        bits=bits, axis=axis, group_size=group, outliers=outliers, outlier_mode=mode,
        outlier_axis=outlier_axis, rank=rank, seed=seed,
    )  # fmt: skip
    config = CompressionConfig(keys=tc, values=tc, block_size=16)
    x = tie_free((2, 1, 32 + extra, 16), dtype, outlier_axis, seed)
    assert_same(compress_fused(x, config), compress(x, config), x)


@pytest.mark.parametrize("kind", ["keys", "values"])
def test_gear_2bit_on_real_keys_and_values(smol_dump, kind):
    """The benchmark's setting (2-bit, G = 64, s = 2 %, r = 2, n_b = 64) on real SmolLM2
    K/V (float32, 128 tokens, 3 KV heads, head_dim 64): same packed result as torch, and the
    fused decompression rebuilds torch's X_hat."""
    from gear_lab import open_dump

    with open_dump(smol_dump) as dump:
        x = dump.load(kind, 10)[None].to(DEVICE)
    config = get_preset("gear", bits=2, group_size=64, outliers=0.02, rank=2, block_size=64)
    ref = compress(x, config, kind=kind)
    assert_same(compress_fused(x, config, kind=kind), ref, x)
    torch.testing.assert_close(decompress_fused(ref), ref.decompress(), rtol=1e-5, atol=1e-5)


def test_partial_and_missing_blocks_stay_full_precision():
    config = get_preset("kivi", block_size=16)
    x = tie_free((1, 2, 40, 32), torch.float16, "token", 1)
    fused = compress_fused(x, config)
    assert torch.equal(fused.full_precision, x[..., 32:, :])
    assert torch.equal(decompress_fused(fused)[..., 32:, :], x[..., 32:, :])
    short = compress_fused(x[..., :10, :], config)
    assert short.body_shape is None and torch.equal(short.decompress(), x[..., :10, :])


def test_decompress_fused_equals_decompress():
    config = get_preset("gear", bits=4, rank=2, outliers=0.1, group_size=16, block_size=32)
    x = tie_free((1, 2, 70, 32), torch.bfloat16, "token", 2)
    c = compress(x, config, kind="values")
    torch.testing.assert_close(decompress_fused(c), c.decompress(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"block_size": None}, "block_size"),
        ({"block_size": 48}, "block_size a power of two"),
        ({"bits": 3}, "bits in 1, 2, 4, 8"),
        ({"rotate": True}, "rotation"),
        ({"codebook": "gaussian"}, "codebooks"),
        ({"qjl": True}, "qjl"),
        ({"lowrank": "svd", "rank": 2}, "power iteration"),
        ({"rank": 33, "block_size": 64}, "rank <="),
        ({"group_size": 12}, "group size"),
        ({"factor_dtype": "float8_e4m3"}, "float16 factors"),
    ],
)
def test_unsupported_settings_raise_config_error(overrides, message):
    config = get_preset("gear", **{"block_size": 16, **overrides})
    x = torch.randn(1, 1, 32, 16, device=DEVICE)
    with pytest.raises(ConfigError, match=message):
        compress_fused(x, config)


def test_bad_input_raises_tensor_error():
    config = get_preset("gear", bits=2, rank=1, block_size=16)
    x = torch.randn(1, 1, 32, 16, device=DEVICE)
    x[0, 0, 20, 3] = float("nan")
    with pytest.raises(TensorError, match="NaN"):
        compress_fused(x, config)
    with pytest.raises(TensorError):
        compress_fused(x.double(), config)


def test_unavailable_backend_is_reported(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "Triton is not installed" in fused_unavailable_reason(DEVICE)
    with pytest.raises(KernelUnavailableError, match="Triton"):
        compress_fused(torch.zeros(1, 1, 16, 16, device=DEVICE), get_preset("kivi", block_size=16))


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = fused_unavailable_reason("cpu")
    assert reason is not None and "CUDA" in reason
    with pytest.raises(KernelUnavailableError, match="CUDA"):
        compress_fused(torch.zeros(1, 1, 16, 16), get_preset("kivi", block_size=16))
