"""AttentionReference.error_stack (float32 on differences) against the exact float64 error,
with its per-row sums compiled (``csrc/attention.cpp``) and in torch (forced by
``native.reference()``)."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gear_lab import metrics, native
from gear_lab.errors import TensorError

COLUMNS = ("score_rel", "kl", "tv", "output_rel")
# The float32 score errors d carry ~1e-7 |q| |k_hat - k| absolute error: ~1e-6 relative on the
# metrics as a rule (the Taylor / expm1 blend of KL's phi adds <= 2e-6), more where a row's d
# nearly coincide across its keys, which tiny random rows allow (worst seen ~1e-4 in 10^4
# cases); atol covers metrics ~1e-14 and below (a p_hat - p of a few ulps of float64).
RTOL, ATOL = 1e-3, 1e-13


COMPILED_MISSING = native.unavailable_reason()
IMPLS = [
    pytest.param(
        "compiled", marks=pytest.mark.skipif(COMPILED_MISSING is not None, reason="no library")
    ),
    "torch",
]


def _impl(name: str) -> contextlib.AbstractContextManager:
    """Within the block, error_stack's row sums run compiled or (forced) in torch."""
    return native.reference() if name == "torch" else contextlib.nullcontext()


def _tensor(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _exact(ref, k_hat, v_hat, kv_heads, configs):
    return [
        ref.error(
            None if k_hat is None else k_hat[c], None if v_hat is None else v_hat[c], kv_heads
        )
        for c in range(configs)
    ]


def _assert_close(fast, exact, rtol=RTOL, atol=ATOL):
    for c, want in enumerate(exact):
        got = {name: float(fast[name][c]) for name in COLUMNS}
        assert got == pytest.approx(want, rel=rtol, abs=atol), (c, got, want)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 3]),
    seq=st.integers(1, 40),
    d=st.integers(1, 8),
    window=st.one_of(st.none(), st.integers(1, 12)),
    sharpness=st.sampled_from([1.0, 4.0]),  # 4: peaked attention, like a trained model's
    magnitude=st.sampled_from([1e-4, 1e-2, 0.3]),
    replaced=st.sampled_from(["keys", "values", "both"]),
    head=st.one_of(st.none(), st.integers(0, 2)),
    configs=st.integers(1, 3),
    block_rows=st.integers(1, 16),
    tile=st.sampled_from([1, 50, 2**18]),
    seed=st.integers(0, 2**16),
)
def test_error_stack_matches_exact_error(
    impl,
    b,
    kv_heads,
    group,
    seq,
    d,
    window,
    sharpness,
    magnitude,
    replaced,
    head,
    configs,
    block_rows,
    tile,
    seed,
):
    """Small errors included (1e-4 relative: KL ~1e-9, which float32 p_hat would lose), GQA,
    sliding windows, a head subset, several causal blocks and config tiles."""
    gen = torch.Generator().manual_seed(seed)
    q = sharpness * _tensor(gen, b, kv_heads * group, seq, d)
    k, v = _tensor(gen, b, kv_heads, seq, d), _tensor(gen, b, kv_heads, seq, d)
    sel = None if head is None or head >= kv_heads else slice(head, head + 1)
    part = slice(None) if sel is None else sel
    k_hat = k[:, part] + magnitude * _tensor(gen, configs, *k[:, part].shape)
    v_hat = v[:, part] + magnitude * _tensor(gen, configs, *v[:, part].shape)
    k_hat = None if replaced == "values" else k_hat
    v_hat = None if replaced == "keys" else v_hat
    with (
        mock.patch.object(metrics, "_BLOCK_ROWS", block_rows),
        mock.patch.object(metrics, "_TILE_SCORES", tile),
        _impl(impl),
    ):
        ref = metrics.attention_reference(q, k, v, sliding_window=window)
        fast = ref.error_stack(k_hat, v_hat, kv_heads=sel)
    assert all(fast[name].shape == (configs,) for name in COLUMNS)
    _assert_close(fast, _exact(ref, k_hat, v_hat, sel, configs))


@pytest.mark.parametrize("impl", IMPLS)
def test_error_stack_on_a_real_shape_and_tiny_errors(impl):
    """512 positions, 3 query heads per KV head, peaked scores, and key errors down to 1e-6
    relative: KL ~1e-12, which phi = expm1(x) - x alone (no Taylor blend) is off by ~2e-4;
    here the tolerance is the design's 1e-5. Score shifts of 1.0 relative reach |x| ~ 10 (the
    compiled expm1's 2^n branch)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        3 * _tensor(gen, 1, 6, 512, 64),
        _tensor(gen, 1, 2, 512, 64),
        _tensor(gen, 1, 2, 512, 64),
    )
    ref = metrics.attention_reference(q, k, v)
    scales = torch.tensor([1e-6, 1e-4, 1e-2, 1.0]).view(4, 1, 1, 1, 1)
    k_hat = k + scales * _tensor(gen, 4, *k.shape)
    with _impl(impl):
        fast = ref.error_stack(k_hat=k_hat)
    exact = _exact(ref, k_hat, None, None, 4)
    assert exact[0]["kl"] < 1e-11
    _assert_close(fast, exact, rtol=1e-5)


def test_zero_error_gives_exact_zeros():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _tensor(gen, 2, 6, 50, 8), _tensor(gen, 2, 2, 50, 8), _tensor(gen, 2, 2, 50, 8)
    ref = metrics.attention_reference(q, k, v, sliding_window=7)
    for replaced in ({"k_hat": k[None]}, {"v_hat": v[None]}, {"k_hat": k[None], "v_hat": v[None]}):
        fast = ref.error_stack(**{name: x.expand(3, *x.shape[1:]) for name, x in replaced.items()})
        for name in COLUMNS:
            assert torch.equal(fast[name], torch.zeros(3, dtype=torch.float64)), name


def test_softcap_and_large_shifts_go_through_the_exact_error():
    gen = torch.Generator().manual_seed(2)
    q, k, v = _tensor(gen, 1, 4, 20, 8), _tensor(gen, 1, 2, 20, 8), _tensor(gen, 1, 2, 20, 8)
    k_hat = torch.stack([k + 0.1 * _tensor(gen, *k.shape), k + 0.1 * _tensor(gen, *k.shape)])
    capped = metrics.attention_reference(q, k, v, softcap=3.0)
    fast = capped.error_stack(k_hat=k_hat)
    for c, want in enumerate(_exact(capped, k_hat, None, None, 2)):
        assert {name: float(fast[name][c]) for name in COLUMNS} == want
    # config 1 shifts scores by ~1e3, beyond float32 exp: exact, and config 0 stays fast
    k_hat[1] = k + 1e3 * _tensor(gen, *k.shape)
    ref = metrics.attention_reference(q, k, v)
    fast = ref.error_stack(k_hat=k_hat)
    exact = _exact(ref, k_hat, None, None, 2)
    assert {name: float(fast[name][1]) for name in COLUMNS} == exact[1]
    assert all(torch.isfinite(fast[name]).all() for name in COLUMNS)
    _assert_close(fast, exact)


def test_error_stack_bad_inputs():
    q, k = torch.zeros(1, 4, 5, 2), torch.zeros(1, 2, 5, 2)
    ref = metrics.attention_reference(q, k, k)
    with pytest.raises(TensorError, match="needs k_hat or v_hat"):
        ref.error_stack()
    with pytest.raises(TensorError, match="5 dims"):
        ref.error_stack(k_hat=k)
    with pytest.raises(TensorError, match=r"is not \[configs\] \+ the reference"):
        ref.error_stack(v_hat=k[None], kv_heads=slice(0, 1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_error_stack_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _tensor(gen, 1, 6, 70, 16), _tensor(gen, 1, 2, 70, 16), _tensor(gen, 1, 2, 70, 16)
    k_hat = k + 0.05 * _tensor(gen, 3, *k.shape)
    cpu = metrics.attention_reference(q, k, v).error_stack(k_hat=k_hat)
    gpu = metrics.attention_reference(q.cuda(), k.cuda(), v.cuda()).error_stack(k_hat=k_hat.cuda())
    for name in COLUMNS:
        assert gpu[name].device.type == "cuda"
        torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-4, atol=1e-12)


@pytest.mark.skipif(COMPILED_MISSING is not None, reason=f"no library: {COMPILED_MISSING}")
@pytest.mark.parametrize("replaced", ["keys", "values", "both"])
@pytest.mark.parametrize("shift", [1e-3, 0.3, 3.0, 40.0, 80.0])
@pytest.mark.parametrize("dim", [20, 128])
def test_compiled_block_matches_the_torch_block(shift, replaced, dim):
    """Block by block, across the compiled expm1's ranges (|x| < ln2 / 2, its 2^n branch up to
    the limit of 60, and beyond: flagged), a head_dim that is no multiple of the vector width
    and one of the paper's (128), and blocks whose rows fill no whole tile: the same four sums
    and flags as torch's."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (_tensor(gen, 1, n, 93, dim) for n in (6, 2, 2))
    ref = metrics.attention_reference(q, k, v, sliding_window=50)
    lib = native.library()
    for block in ref._stacked[0][0][1]:
        keys = block.values.shape[0]
        dk = shift * _tensor(gen, 3, keys, dim) / 4 if replaced != "values" else None
        dv = 0.1 * _tensor(gen, 3, keys, dim) if replaced != "keys" else None
        sums, shifted = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.bool)
        metrics._compiled_block(lib, block, dk, dv, sums, shifted)
        expected, big = metrics._block_error(block, dk, dv)
        assert torch.equal(shifted, big)
        assert bool(shifted.any()) == (shift > 60 and dk is not None)
        if not shifted.any():
            torch.testing.assert_close(sums, expected, rtol=1e-4, atol=1e-12)


@pytest.mark.skipif(COMPILED_MISSING is not None, reason=f"no library: {COMPILED_MISSING}")
@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_error_stack_with_a_portable_build(monkeypatch, tmp_path, march):
    """Built for a baseline x86-64 CPU (the scalar path) or for AVX2 without AVX-512, the
    compiled block gives the exact error's results."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    flags = [f"-march={march}" if f == "-march=native" else f for f in native.FLAGS]
    monkeypatch.setattr(native, "FLAGS", flags)
    monkeypatch.setattr(native, "_build_dir", lambda: tmp_path)
    built = native._load()
    monkeypatch.setattr(native, "library", lambda: built)
    gen = torch.Generator().manual_seed(5)
    q, k, v = _tensor(gen, 1, 6, 70, 40), _tensor(gen, 1, 2, 70, 40), _tensor(gen, 1, 2, 70, 40)
    ref = metrics.attention_reference(q, k, v)
    k_hat = k + 0.05 * _tensor(gen, 3, *k.shape)
    v_hat = v + 0.05 * _tensor(gen, 3, *v.shape)
    fast = ref.error_stack(k_hat, v_hat)
    _assert_close(fast, _exact(ref, k_hat, v_hat, None, 3))
