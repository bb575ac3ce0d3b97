"""benchmarks/serving.py's largest-batch search (pure, with a fake measure) and one real probe of
gear_lab.serving in its own process."""

from __future__ import annotations

import pytest
from benchmark_module import load_benchmark

from gear_lab.errors import CacheError, ConfigError
from gear_lab.serving import Workload, interleaved_speed, probe


@pytest.fixture(scope="module")
def serving():
    return load_benchmark("serving")


@pytest.mark.parametrize(
    ("budget", "max_batch", "want"),
    [(0.5, 64, 0), (1.0, 64, 1), (7.5, 64, 7), (10.0, 64, 10), (100.0, 64, 64), (7.5, 5, 5)],
)
def test_largest_batch_search(serving, budget, max_batch, want):
    """Peak = batch: the search returns the largest fitting batch, measures each
    batch once, and reuses what earlier budgets measured."""
    calls: list[int] = []

    def measure(batch: int) -> float:
        calls.append(batch)
        return float(batch)

    known: dict[int, float] = {}
    assert serving.largest_batch(measure, budget, max_batch, known) == want
    assert len(calls) == len(set(calls)) <= 2 * max_batch.bit_length()
    again = len(calls)
    assert serving.largest_batch(measure, budget, max_batch, known) == want
    assert len(calls) == again  # all known


def test_tiny_probe_runs_in_its_own_process():
    """One real probe: SmolLM2, GEAR 2-bit, batch 2, 64 prompt + 4 new tokens, in a fresh
    process; a spec that cannot be built fails as one CacheError line."""
    workload = Workload(prompt_tokens=64, new_tokens=4, chunk=32)
    got = probe("gear:bits=2", 2, workload, threads=1)
    assert got.batch == 2 and got.cache == "gear:bits=2" and got.device == "cpu"
    assert got.tok_s > 0 and got.held_mib > 0 and got.peak_mib < 400
    with pytest.raises(CacheError, match=r"gear:bits=x at batch 1 failed: .*bad probe spec"):
        probe("gear:bits=x", 1, workload, threads=1)


def test_interleaved_speed_times_every_cache_in_one_process():
    """Every spec decodes the same number of steps and gets a positive speed; a spec that
    cannot be built fails before any timing."""
    workload = Workload(prompt_tokens=64, new_tokens=3, chunk=32)
    speed = interleaved_speed(["dynamic", "gear:bits=2"], 2, workload)
    assert list(speed) == ["dynamic", "gear:bits=2"] and all(v > 0 for v in speed.values())
    with pytest.raises(ConfigError, match="bad probe spec"):
        interleaved_speed(["dynamic", "gear:bits=x"], 1, workload)


@pytest.mark.parametrize("gqa", [True, False])
def test_workload_options_round_trip(gqa):
    """What a probe passes to its process parses back into the same Workload, booleans too."""
    import argparse

    from gear_lab.serving import add_workload_arguments, workload_argv, workload_from

    workload = Workload(prompt_tokens=77, new_tokens=5, chunk=16, gqa=gqa)
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser)
    assert workload_from(parser.parse_args(workload_argv(workload))) == workload
    with pytest.raises(ConfigError, match="chunk must be >= 1"):
        workload_from(parser.parse_args(["--chunk", "0"]))


@pytest.mark.parametrize("gqa", [True, False])
def test_gqa_workload_reads_kv_heads_in_place(monkeypatch, gqa):
    """A masked prefill chunk (after the first) repeats the layer's K/V per query head unless
    the workload asks for GQA attention; the switch is undone on leaving."""
    import os

    import torch
    import transformers.integrations.sdpa_attention as sdpa

    from gear_lab import load_model
    from gear_lab.cache import cache_kwarg
    from gear_lab.serving import _attention, build_cache

    model, _ = load_model("smollm2-135m")
    calls = []
    repeat = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: calls.append(1) or repeat(*a))
    before = os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    ids = torch.arange(100, 116).view(1, -1)
    with torch.inference_mode(), _attention(Workload(gqa=gqa)):
        cache = build_cache("dynamic", model)
        for start in (0, 8):
            model(input_ids=ids[:, start : start + 8], **{cache_kwarg(model): cache})
    assert bool(calls) is not gqa
    assert os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") == before
