"""gear_lab.metrics against exact references: numpy/scipy, explicit loops, hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gear_lab import metrics
from gear_lab.errors import ConfigError, TensorError

SETTINGS = settings(max_examples=25, deadline=None)


def _tensor(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


shapes4 = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 6))


# --- reconstruction ---------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes4, seed=st.integers(0, 2**16), noise=st.floats(1e-3, 2.0))
def test_reconstruction_matches_numpy(shape, seed, noise):
    x = _tensor(seed, *shape)
    x_hat = x + noise * _tensor(seed + 1, *shape)
    got = metrics.reconstruction(x, x_hat)
    a, b = x.double().numpy(), x_hat.double().numpy()
    rel = np.linalg.norm(b - a) / np.linalg.norm(a)
    assert got["rel_fro"] == pytest.approx(rel, rel=1e-12)
    assert got["max_abs"] == pytest.approx(np.abs(b - a).max(), rel=1e-12)
    cos = (a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b))
    assert got["cosine"] == pytest.approx(cos, rel=1e-12)
    assert got["snr_db"] == pytest.approx(-20 * math.log10(rel), rel=1e-9, abs=1e-9)


def test_reconstruction_exact_and_zero_cases():
    x = _tensor(0, 1, 2, 5, 4)
    exact = metrics.reconstruction(x, x.clone())
    assert exact["rel_fro"] == 0.0 and exact["max_abs"] == 0.0
    assert exact["snr_db"] == math.inf
    assert exact["cosine"] == pytest.approx(1.0, abs=1e-12)
    zero = torch.zeros(3, 4)
    assert metrics.reconstruction(zero, zero) == {
        "rel_fro": 0.0,
        "max_abs": 0.0,
        "cosine": 1.0,
        "snr_db": math.inf,
    }
    # a non-zero estimate of a zero tensor has infinite relative error and no NaN anywhere
    off = metrics.reconstruction(zero, torch.ones(3, 4))
    assert off["rel_fro"] == math.inf and off["cosine"] == 0.0 and off["snr_db"] == -math.inf


@SETTINGS
@given(shape=shapes4, seed=st.integers(0, 2**16), by=st.sampled_from(["channel", "token", "head"]))
def test_reconstruction_profile_equals_reconstruction_of_each_slice(shape, seed, by):
    x = _tensor(seed, *shape)
    x_hat = x + 0.1 * _tensor(seed + 1, *shape)
    x_hat[..., 0, :] = x[..., 0, :]  # an exact token: snr inf, rel_fro 0 in the token profile
    prof = metrics.reconstruction_profile(x, x_hat, by=by)
    dim = {"head": 1, "token": 2, "channel": 3}[by]
    for i in range(shape[dim]):
        one = metrics.reconstruction(x.select(dim, i), x_hat.select(dim, i))
        for name, value in one.items():
            assert prof[name].shape == (shape[dim],)
            assert float(prof[name][i]) == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_reconstruction_bad_inputs():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(TensorError, match="differs"):
        metrics.reconstruction(x, torch.zeros(1, 1, 4, 3))
    with pytest.raises(TensorError, match="floating-point"):
        metrics.reconstruction(x.long(), x.long())
    with pytest.raises(ConfigError, match="by must be"):
        metrics.reconstruction_profile(x, x, by="row")
    with pytest.raises(TensorError, match="4 dims"):
        metrics.reconstruction_profile(x[0], x[0])


# --- attention --------------------------------------------------------------------------------


def _attention_loop(q, k, v, scaling, window=None, softcap=None):
    """Explicit per-query-head loop: head h reads kv head h // group. float64 probs and outputs."""
    b, heads, seq, _ = q.shape
    group = heads // k.shape[1]
    probs = torch.zeros(b, heads, seq, seq, dtype=torch.float64)
    out = torch.zeros(b, heads, seq, v.shape[-1], dtype=torch.float64)
    scores = torch.zeros(b, heads, seq, seq, dtype=torch.float64)
    for n in range(b):
        for h in range(heads):
            kv = h // group
            for i in range(seq):
                lo = 0 if window is None else max(0, i - window + 1)
                s = q[n, h, i].double() @ k[n, kv, lo : i + 1].double().T * scaling
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                p = torch.softmax(s, dim=0)
                scores[n, h, i, lo : i + 1] = s
                probs[n, h, i, lo : i + 1] = p
                out[n, h, i] = p @ v[n, kv, lo : i + 1].double()
    return scores, probs, out


@SETTINGS
@given(
    b=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 3),
    seq=st.integers(1, 7),
    d=st.integers(1, 5),
    window=st.one_of(st.none(), st.integers(1, 4)),
    softcap=st.one_of(st.none(), st.floats(0.5, 4.0)),
    seed=st.integers(0, 2**16),
)
def test_attention_error_matches_explicit_gqa_loop(
    b, kv_heads, group, seq, d, window, softcap, seed
):
    q = _tensor(seed, b, kv_heads * group, seq, d)
    k, v = _tensor(seed + 1, b, kv_heads, seq, d), _tensor(seed + 2, b, kv_heads, seq, d)
    k_hat = k + 0.3 * _tensor(seed + 3, b, kv_heads, seq, d)
    v_hat = v + 0.3 * _tensor(seed + 4, b, kv_heads, seq, d)
    scale = 0.7
    s, p, o = _attention_loop(q, k, v, scale, window, softcap)
    s_hat, p_hat, o_hat = _attention_loop(q, k_hat, v_hat, scale, window, softcap)
    visible = p > 0
    kl = torch.where(visible, p * (p.log() - p_hat.log()), 0.0).sum(-1).mean()
    got = metrics.attention_error(
        q, k, v, k_hat, v_hat, scaling=scale, sliding_window=window, softcap=softcap
    )
    assert got["score_rel"] == pytest.approx(float((s_hat - s).norm() / s.norm()), rel=1e-9)
    assert got["kl"] == pytest.approx(float(kl), rel=1e-7, abs=1e-12)
    assert got["tv"] == pytest.approx(float(0.5 * (p - p_hat).abs().sum(-1).mean()), rel=1e-9)
    assert got["output_rel"] == pytest.approx(float((o_hat - o).norm() / o.norm()), rel=1e-9)


def test_attention_error_is_exactly_zero_for_exact_kv():
    q, k, v = _tensor(0, 2, 6, 9, 8), _tensor(1, 2, 2, 9, 8), _tensor(2, 2, 2, 9, 8)
    got = metrics.attention_error(q, k, v, k.clone(), v.clone(), sliding_window=4)
    assert got == {"score_rel": 0.0, "kl": 0.0, "tv": 0.0, "output_rel": 0.0}


def test_attention_error_hand_computed():
    # one head, head_dim 1, scaling 1: query 1 sees keys 0 and 1 with scores [0, ln 3]
    q = torch.tensor([1.0, 1.0]).reshape(1, 1, 2, 1)
    k = torch.tensor([0.0, math.log(3.0)]).reshape(1, 1, 2, 1)
    k_hat = torch.zeros(1, 1, 2, 1)  # scores [0, 0]: p_hat = [1/2, 1/2]
    v = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1)
    got = metrics.attention_error(q, k, v, k_hat, v, scaling=1.0)
    # p = [1/4, 3/4]; row 0 attends only itself (KL 0, TV 0); mean over the two rows
    assert got["kl"] == pytest.approx((0.25 * math.log(0.5) + 0.75 * math.log(1.5)) / 2, rel=1e-6)
    assert got["tv"] == pytest.approx(0.25 / 2, rel=1e-6)
    assert got["score_rel"] == pytest.approx(1.0, rel=1e-6)  # ||[0, ln3] - 0|| / ||[0, ln3]||
    # outputs: exact [1, 1/4], compressed [1, 1/2]
    assert got["output_rel"] == pytest.approx(0.25 / math.sqrt(1 + 0.25**2), rel=1e-6)


def test_sliding_window_of_one_ignores_keys():
    q, k, v = _tensor(0, 1, 4, 6, 3), _tensor(1, 1, 2, 6, 3), _tensor(2, 1, 2, 6, 3)
    got = metrics.attention_error(q, k, v, _tensor(3, 1, 2, 6, 3), v, sliding_window=1)
    assert got["kl"] == 0.0 and got["tv"] == 0.0 and got["output_rel"] == 0.0
    assert got["score_rel"] > 0.1


def test_attention_reference_head_subset_equals_sliced_call():
    q, k, v = _tensor(0, 1, 6, 8, 4), _tensor(1, 1, 3, 8, 4), _tensor(2, 1, 3, 8, 4)
    k_hat = k + 0.2 * _tensor(3, 1, 3, 8, 4)
    ref = metrics.attention_reference(q, k, v)
    for h in range(3):
        part = ref.error(k_hat=k_hat[:, h : h + 1], kv_heads=slice(h, h + 1))
        alone = metrics.attention_error(
            q[:, 2 * h : 2 * h + 2],
            k[:, h : h + 1],
            v[:, h : h + 1],
            k_hat[:, h : h + 1],
            v[:, h : h + 1],
        )
        assert part == pytest.approx(alone, rel=1e-12, abs=1e-15)


def test_attention_bad_inputs():
    q, k = torch.zeros(1, 4, 5, 2), torch.zeros(1, 3, 5, 2)
    with pytest.raises(TensorError, match="multiple of kv heads"):
        metrics.attention_error(q, k, k, k, k)
    k = torch.zeros(1, 2, 5, 2)
    with pytest.raises(TensorError, match="disagree"):
        metrics.attention_error(q, k[:, :, :4], k[:, :, :4], k[:, :, :4], k[:, :, :4])
    with pytest.raises(TensorError, match="k_hat shape"):
        metrics.attention_error(q, k, k, k[:, :1], k)
    with pytest.raises(ConfigError, match="sliding_window"):
        metrics.attention_error(q, k, k, k, k, sliding_window=0)
    with pytest.raises(TensorError, match="4 dims"):
        metrics.attention_error(q[0], k, k, k, k)


# --- spectra ----------------------------------------------------------------------------------


@SETTINGS
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 10),
    d=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_energy_curve_is_best_rank_r_energy(batch, seq, d, seed):
    x = _tensor(seed, batch, seq, d)
    sv = metrics.singular_values(x)
    torch.testing.assert_close(sv, torch.linalg.svdvals(x.double()))
    curve = metrics.energy_curve(sv)
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    total = x.double().square().sum((-2, -1))
    for r in range(1, min(seq, d) + 1):
        x_r = u[..., :r] @ torch.diag_embed(s[..., :r]) @ vh[..., :r, :]
        captured = 1 - (x.double() - x_r).square().sum((-2, -1)) / total
        torch.testing.assert_close(curve[..., r - 1], captured, rtol=1e-9, atol=1e-9)
    for share in (0.0, 0.5, 0.9, 1.0):
        ranks = metrics.rank_for_energy(sv, share)
        for i in range(batch):
            expected = (
                0
                if share == 0
                else 1 + next(r for r in range(curve.shape[-1]) if curve[i, r] >= share - 1e-12)
            )
            assert int(ranks[i]) == expected == metrics.rank_for_energy(sv[i], share)


def test_energy_of_zero_and_rank_one_matrices():
    assert metrics.energy_curve(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    x = torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5]))
    sv = metrics.singular_values(x)
    assert metrics.rank_for_energy(sv, 1.0) == 1
    with pytest.raises(ConfigError, match="share"):
        metrics.rank_for_energy(sv, 1.5)
    with pytest.raises(TensorError, match="non-negative"):
        metrics.energy_curve(torch.tensor([1.0, -1.0]))


# --- outliers ---------------------------------------------------------------------------------


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(2, 12), st.integers(2, 8)),
    seed=st.integers(0, 2**16),
    by=st.sampled_from(["channel", "token"]),
    k_sigma=st.floats(0.5, 3.0),
)
def test_outlier_stats_match_scipy(shape, seed, by, k_sigma):
    x = _tensor(seed, *shape).exp()  # skewed, heavy-ish tails
    got = metrics.outlier_stats(x, by=by, k_sigma=k_sigma)
    axis = -2 if by == "channel" else -1
    a = x.double().numpy()
    np.testing.assert_allclose(got["max_abs"].numpy(), np.abs(a).max(axis), rtol=1e-12)
    np.testing.assert_allclose(
        got["kurtosis"].numpy(),
        scipy.stats.kurtosis(a, axis=axis, fisher=True, bias=True),
        rtol=1e-8,
        atol=1e-8,
    )
    dev = np.abs(a - a.mean(axis, keepdims=True))
    beyond = (dev > k_sigma * a.std(axis, keepdims=True)).mean(axis)
    np.testing.assert_allclose(got["share_beyond"].numpy(), beyond, rtol=1e-12)


def test_outlier_stats_constant_and_spike():
    x = torch.zeros(1, 1, 100, 2)
    x[0, 0, 7, 1] = 50.0  # one spike in channel 1
    got = metrics.outlier_stats(x, by="channel")
    assert math.isnan(float(got["kurtosis"][0, 0, 0]))  # channel 0 is constant
    assert float(got["share_beyond"][0, 0, 0]) == 0.0
    assert float(got["share_beyond"][0, 0, 1]) == pytest.approx(0.01)
    assert float(got["max_abs"][0, 0, 1]) == 50.0
    with pytest.raises(ConfigError, match="k_sigma"):
        metrics.outlier_stats(x, k_sigma=0)


# --- residual spectra -------------------------------------------------------------------------


def test_quantization_residual_is_what_the_svd_low_rank_fits():
    from gear_lab.compression import TensorCompression, compress

    x = _tensor(0, 1, 2, 64, 16)
    x[..., 3] *= 12  # an outlier channel
    tc = TensorCompression(bits=2, group_size=32, outliers=0.05, rank=3, lowrank="svd")
    residual = metrics.quantization_residual(x, tc)
    assert residual.shape == x.shape
    sv = metrics.singular_values(residual)
    tail = sv[..., 3:].square().sum().sqrt()
    err = (compress(x, tc).decompress().double() - x.double()).norm()
    # GEAR's exact-SVD error is the residual's tail energy (fp16 factors: loose tolerance)
    assert float(err) == pytest.approx(float(tail), rel=2e-2)
    identity = TensorCompression(bits=None, group_size=None)
    assert torch.equal(metrics.quantization_residual(x, identity), torch.zeros_like(x))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metrics_on_cuda_match_cpu():
    q, k, v = _tensor(0, 1, 6, 16, 8), _tensor(1, 1, 2, 16, 8), _tensor(2, 1, 2, 16, 8)
    k_hat = k + 0.1 * _tensor(3, 1, 2, 16, 8)
    cpu = metrics.attention_error(q, k, v, k_hat, v)
    gpu = metrics.attention_error(*(t.cuda() for t in (q, k, v, k_hat, v)))
    assert gpu == pytest.approx(cpu, rel=1e-9)
    assert metrics.reconstruction(k.cuda(), k_hat.cuda()) == pytest.approx(
        metrics.reconstruction(k, k_hat), rel=1e-9
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 50.0), min_size=1, max_size=400))
def test_kl_quantiles_match_numpy(values):
    kl = torch.tensor(values, dtype=torch.float64)
    stats = metrics.kl_quantiles(kl)
    ref = np.asarray(values)
    assert stats["kl_mean"] == pytest.approx(ref.mean(), rel=1e-12, abs=1e-12)
    for key, q in (("kl_median", 50), ("kl_p99", 99), ("kl_p999", 99.9)):
        assert stats[key] == pytest.approx(np.percentile(ref, q), rel=1e-9, abs=1e-12)
    assert stats["kl_median"] <= stats["kl_p99"] <= stats["kl_p999"] <= max(values)


def test_kl_quantiles_refuses_empty_and_non_float():
    with pytest.raises(TensorError):
        metrics.kl_quantiles(torch.zeros(0))
    with pytest.raises(TensorError):
        metrics.kl_quantiles(torch.zeros(3, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 8),
    st.integers(1, 40),
    st.integers(0, 2**31 - 1),
)
def test_delta_perplexity_is_the_paired_t_interval(windows, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    full = [torch.rand(tokens, generator=gen, dtype=torch.float64) * 4 for _ in range(windows)]
    comp = [f + torch.rand(tokens, generator=gen, dtype=torch.float64) for f in full]
    delta, half = metrics.delta_perplexity(full, comp)
    pooled_full = np.concatenate([f.numpy() for f in full])
    pooled_comp = np.concatenate([c.numpy() for c in comp])
    assert delta == pytest.approx(np.exp(pooled_comp.mean()) - np.exp(pooled_full.mean()))
    diffs = np.array(
        [
            np.exp(c.numpy().mean()) - np.exp(f.numpy().mean())
            for f, c in zip(full, comp, strict=True)
        ]
    )
    lo, hi = scipy.stats.t.interval(
        0.95, windows - 1, loc=diffs.mean(), scale=scipy.stats.sem(diffs)
    )
    assert half == pytest.approx((hi - lo) / 2, rel=1e-9, abs=1e-12)
    assert delta > 0  # every compressed NLL is higher


def test_delta_perplexity_single_window_and_bad_input():
    delta, half = metrics.delta_perplexity([torch.zeros(4)], [torch.ones(4)])
    assert delta == pytest.approx(math.e - 1) and math.isnan(half)
    with pytest.raises(TensorError):
        metrics.delta_perplexity([torch.zeros(4)], [])
    with pytest.raises(ConfigError):
        metrics.delta_perplexity([torch.zeros(4)], [torch.ones(4)], confidence=1.0)
