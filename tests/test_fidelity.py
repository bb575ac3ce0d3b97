"""Fidelity metrics on constructed cases, cache specs, and the two checks on the real model."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gear_lab.cache import GearCache
from gear_lab.cache_specs import make_cache, method_label, parse_quantized_spec
from gear_lab.compression import get_preset
from gear_lab.errors import ConfigError
from gear_lab.fidelity import check_generation, perplexity_check, window_starts
from gear_lab.metrics import next_token_kl, token_agreement, top1_agreement

logit_rows = arrays(
    "float64",
    (3, 5),
    elements=st.floats(-20, 20, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=50, deadline=None)
@given(p=logit_rows, q=logit_rows)
def test_kl_matches_the_definition(p, q):
    p, q = torch.from_numpy(p), torch.from_numpy(q)
    probs_p, probs_q = torch.softmax(p, -1), torch.softmax(q, -1)
    want = (probs_p * (probs_p.log() - probs_q.log())).sum(-1)
    got = next_token_kl(p, q)
    assert torch.allclose(got, want.clamp_min(0), atol=1e-9)
    assert (got >= 0).all()
    assert torch.equal(next_token_kl(p, p), torch.zeros(3, dtype=torch.float64))
    # adding a constant to every logit changes nothing
    assert torch.allclose(next_token_kl(p, p + 3.0), torch.zeros(3, dtype=torch.float64))


def test_metrics_on_constructed_cases():
    a = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)  # p = (1/4, 3/4)
    b = torch.tensor([[0.0, 0.0]])  # q = (1/2, 1/2)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert next_token_kl(a, b).item() == pytest.approx(want, rel=1e-12)
    assert top1_agreement(a, a).all()
    assert top1_agreement(a, b).tolist() == [False]  # b's argmax is the first of two ties
    assert token_agreement([1, 2, 3], [1, 2, 3]) == (1.0, None)
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert token_agreement([1, 2, 3, 4], [1, 2]) == (0.5, 2)
    assert token_agreement([], []) == (1.0, None)


def test_windows_are_consecutive_and_in_range():
    assert window_starts(10_000, 8, 640) == [640 * i for i in range(8)]
    assert window_starts(641, 1, 640) == [0]
    with pytest.raises(ConfigError):
        window_starts(1280, 2, 640)  # the last target would be token 1280
    with pytest.raises(ConfigError):
        window_starts(1000, 0, 10)


def test_cache_specs(smol):
    model, _ = smol
    assert isinstance(make_cache("kivi", model), GearCache)
    assert make_cache(get_preset("gear", bits=2), model).config.keys.bits == 2
    assert parse_quantized_spec("quantized:hqq:2:32") == ("hqq", 2, 32)
    assert parse_quantized_spec("quantized:quanto:4") == ("quanto", 4, 64)

    def half_gear(model):
        return GearCache("kivi", model_config=model.config, storage_dtype=torch.float16)

    assert make_cache(half_gear, model).storage_dtype == torch.float16
    assert method_label(half_gear) == "half_gear"
    with pytest.raises(ConfigError):
        make_cache(lambda model: None, model)
    for bad in ("nope", "quantized:foo:4", "quantized:quanto:x", "quantized:quanto:9"):
        with pytest.raises(ConfigError):
            make_cache(bad, model)


def test_check_generation_identity_is_exact(smol):
    """With nothing compressed the two runs are the same computation: KL 0, agreement 1."""
    model, tokenizer = smol
    check = check_generation(model, tokenizer, "The capital of France is", "none", 4)
    assert check.full_ids == check.compressed_ids and len(check.full_ids) == 4
    assert check.token_agreement == 1.0 and check.first_divergence is None
    assert check.kl == [0.0] * 4 and check.top1 == [True] * 4
    assert check.full_cache_bytes == check.compressed_cache_bytes > 0
    assert check.full_text == check.compressed_text
    assert set(check.to_dict()) >= {"mean_kl", "top1_agreement", "full_text"}
    with pytest.raises(ConfigError):
        check_generation(model, tokenizer, "", "none", 4)
    with pytest.raises(ConfigError):
        check_generation(model, tokenizer, "x", "none", 0)


def test_check_generation_with_a_lossy_cache(smol):
    model, tokenizer = smol
    config = get_preset("kivi", bits=2, block_size=4)
    check = check_generation(model, tokenizer, "The capital of France is", config, 4)
    assert check.method == config.name
    assert check.kl[0] == 0.0  # the prompt's own prediction precedes any compression
    assert all(k >= 0 for k in check.kl) and max(check.kl) > 0
    assert check.compressed_cache_bytes < check.full_cache_bytes


def test_perplexity_check_identity_and_lossy(smol):
    model, tokenizer = smol
    kwargs = {"windows": 2, "prefill": 16, "continuation": 8, "progress": False}
    same = perplexity_check(model, tokenizer, "none", **kwargs)
    assert same.kl < 1e-9 and same.top1_agreement == 1.0
    assert same.perplexity_compressed == pytest.approx(same.perplexity_full, rel=1e-6)
    assert same.bits_per_entry == 32.0  # float32, nothing compressed
    assert len(same.window_starts) == 2
    lossy = perplexity_check(model, tokenizer, get_preset("kivi", bits=2, block_size=8), **kwargs)
    assert lossy.perplexity_full == same.perplexity_full
    assert lossy.kl > 1e-4 and lossy.bits_per_entry < 8
    assert lossy.scored_tokens == 2 * 8
    assert lossy.kl_median <= lossy.kl_p99 <= lossy.kl_p999
    assert lossy.delta_perplexity == pytest.approx(
        lossy.perplexity_compressed - lossy.perplexity_full
    )
    assert lossy.delta_perplexity_ci >= 0
    assert same.delta_perplexity == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ConfigError):
        perplexity_check(model, tokenizer, "none", windows=0)


@pytest.mark.skipif(
    importlib.util.find_spec("optimum") is None, reason="optimum-quanto (baselines extra) missing"
)
def test_quantized_cache_baseline_runs_in_the_same_harness(smol):
    model, tokenizer = smol
    kwargs = {"windows": 1, "prefill": 16, "continuation": 8, "progress": False}
    result = perplexity_check(model, tokenizer, "quantized:quanto:4:16", **kwargs)
    assert result.method == "quantized:quanto:4:16"
    assert 4 < result.bits_per_entry < 16 and result.kl > 0


def test_checks_warn_when_nothing_is_compressed_and_report_progress(smol):
    """A prompt shorter than one block compresses nothing: the API says so, as the CLI does."""
    import warnings

    from gear_lab.errors import NothingCompressedWarning

    model, tokenizer = smol
    seen: list[tuple[int, int, str]] = []
    with pytest.warns(NothingCompressedWarning, match="nothing was compressed.*block_size = 64"):
        check = check_generation(
            model, tokenizer, "Hi", "kivi", 3, progress=lambda *step: seen.append(step)
        )
    assert check.compressed_cache_bytes == check.full_cache_bytes
    done = [d for d, _, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] > 0  # ends at its total
    assert {"full precision", "compressed"} <= {phase for _, _, phase in seen}
    with pytest.warns(NothingCompressedWarning, match="perplexity_check"):
        perplexity_check(
            model, tokenizer, "kivi", windows=1, prefill=16, continuation=4, progress=False
        )
    with warnings.catch_warnings():  # nothing meant to compress: no warning
        warnings.simplefilter("error", NothingCompressedWarning)
        check_generation(model, tokenizer, "Hi", "none", 2, progress=False)
        prompt = "The capital of France is"
        check_generation(model, tokenizer, prompt, get_preset("kivi", block_size=4), 2)
