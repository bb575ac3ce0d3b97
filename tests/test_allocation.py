"""Per-layer bit allocation (gear_lab.allocation): the knapsack solver against brute force, the
budget, the uniform baseline, JSON, a live per-layer GearCache, and the ``allocate`` CLI."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import gear_lab.fidelity
import gear_lab.models
from gear_lab.allocation import (
    LayerAllocation,
    allocate,
    load_allocation,
    save_allocation,
    solve_allocation,
)
from gear_lab.cache import GearCache, cache_kwarg
from gear_lab.cache_specs import cache_nbytes, make_cache, method_label
from gear_lab.cli import main
from gear_lab.compression import compress, get_preset
from gear_lab.corpus import corpus_ids
from gear_lab.errors import CacheError, ConfigError, OutputExistsError
from gear_lab.fidelity import layer_sensitivity, perplexity_check
from gear_lab.sweeps import expand_grid

GRID = "method=quant;key_bits=2,4;value_bits=2,4;group_size=64;rotate=true;block_size=64"
CANDIDATES = expand_grid(
    {"method": ["quant"], "key_bits": [2, 4], "value_bits": [2, 4], "group_size": [64],
     "rotate": [True], "block_size": [64]}
)  # fmt: skip


@st.composite
def instances(draw):
    """A small knapsack: errors and integer costs per layer x option, and a budget between
    just below the cheapest total and just above the dearest."""
    layers = draw(st.integers(1, 4))
    options = draw(st.integers(1, 4))
    costs = [[draw(st.integers(0, 12)) for _ in range(options)] for _ in range(layers)]
    errors = [
        [draw(st.floats(0, 1, allow_nan=False, allow_subnormal=False)) for _ in range(options)]
        for _ in range(layers)
    ]
    low = sum(map(min, costs))
    budget = draw(st.integers(low - 2, sum(map(max, costs)) + 2))
    return errors, costs, budget


def _total(table, pick) -> float:
    """The sum over layers of ``table[layer][pick[layer]]``."""
    return sum(row[c] for row, c in zip(table, pick, strict=True))


@settings(max_examples=300, deadline=None)
@given(instances())
def test_solver_is_exact_against_brute_force(instance):
    errors, costs, budget = instance
    feasible = [
        _total(errors, pick)
        for pick in itertools.product(*(range(len(row)) for row in costs))
        if _total(costs, pick) <= budget
    ]
    if not feasible:
        with pytest.raises(ConfigError, match="over the budget"):
            solve_allocation(errors, costs, budget)
        return
    choices = solve_allocation(errors, costs, budget)
    assert len(choices) == len(costs)
    assert _total(costs, choices) <= budget  # the budget holds
    got = _total(errors, choices)
    assert got == pytest.approx(min(feasible), rel=1e-12, abs=1e-15)
    # every uniform choice that fits is a feasible point: never better than the allocation
    for option in range(len(costs[0])):
        uniform = (option,) * len(costs)
        if _total(costs, uniform) <= budget:
            assert got <= _total(errors, uniform) + 1e-12


@pytest.mark.parametrize(
    ("errors", "costs", "budget", "match"),
    [
        ([], [], 5, "non-empty"),
        ([[0.1]], [[1, 2]], 5, "same, non-empty"),
        ([[0.1]], [[1.5]], 5, "integers"),
        ([[math.nan]], [[1]], 5, "finite"),
        ([[0.1], [0.2]], [[3], [3]], 5, "over the budget"),
    ],
)
def test_solver_refuses_bad_input(errors, costs, budget, match):
    with pytest.raises(ConfigError, match=match):
        solve_allocation(errors, costs, budget)


@pytest.fixture(scope="module")
def allocation(smol_dump) -> LayerAllocation:
    return allocate(smol_dump, CANDIDATES, 4.0)


def test_allocate_meets_the_budget_and_beats_uniform(allocation, smol_dump):
    assert len(allocation.choices) == 30 and allocation.samples == (0, 1)
    assert allocation.bits_per_entry <= 4.0 and allocation.uniform_bits <= 4.0
    assert allocation.error <= allocation.uniform_error
    assert allocation.error == pytest.approx(sum(allocation.layer_errors))
    # equal layer shapes: the mean of the layers' bits is the mean bits
    assert sum(allocation.layer_bits) / 30 == pytest.approx(allocation.bits_per_entry)
    # keys and values at 2 or 4 bits, G 64 with float16 scale and zero: 2.5 or 4.5 bits each
    assert set(allocation.layer_bits) <= {2.5, 3.5, 4.5}
    assert allocation.uniform_bits == 3.5  # (4.5 + 2.5) / 2: the dearest that fits
    assert {c.block_size for c in allocation.configs} == {64}
    # a larger budget never predicts a larger error; all 4-bit fits 4.5
    roomy = allocate(smol_dump, CANDIDATES, 4.5)
    assert roomy.error <= allocation.error
    assert roomy.choices == (roomy.uniform,) * 30 and roomy.uniform_bits == 4.5


def test_allocate_refuses_bad_input(smol_dump, allocation):
    with pytest.raises(ConfigError, match="below the cheapest candidate"):
        allocate(smol_dump, CANDIDATES, 2.0)
    with pytest.raises(ConfigError, match="target_bits must be > 0"):
        allocate(smol_dump, CANDIDATES, 0)
    with pytest.raises(ConfigError, match="prefill_rank"):
        allocate(smol_dump, [get_preset("gear", prefill_rank=1)], 8)
    with pytest.raises(ConfigError, match="sample 5"):
        allocate(smol_dump, CANDIDATES, 4, samples=[5])
    with pytest.raises(ConfigError, match="out of range"):
        LayerAllocation(**{**vars(allocation), "choices": (9,) * 30})
    with pytest.raises(ConfigError, match="one choice, bits and error per layer"):
        LayerAllocation(**{**vars(allocation), "layer_bits": (1.0,)})


def test_calibration_steers_the_allocation(smol_dump):
    """With live KLs large on layers 0-14 and tiny on 15-29, the budget that lets half the layers
    go from 2.5 to 4.5 bits goes to the first half; at the reference the predicted KL of a layer
    is its measured one."""
    two = [get_preset("quant", bits=b, group_size=64, rotate=True, block_size=64) for b in (2, 4)]
    kl = [1.0] * 15 + [1e-6] * 15
    seen = []

    def calibrate(config):
        seen.append(config)
        return kl

    calibrated = allocate(smol_dump, two, 3.5, calibrate=calibrate)
    assert seen == [two[0]] and calibrated.reference == 0 and calibrated.layer_kl == tuple(kl)
    assert calibrated.choices == (1,) * 15 + (0,) * 15
    assert calibrated.bits_per_entry == 3.5 and calibrated.uniform == 0
    assert calibrated.layer_errors[15:] == pytest.approx(kl[15:], rel=1e-12)
    assert calibrated.uniform_error == pytest.approx(sum(kl), rel=1e-12)
    assert LayerAllocation.from_dict(calibrated.to_dict()) == calibrated
    with pytest.raises(ConfigError, match="calibrate gave 2 KLs for 30 layers"):
        allocate(smol_dump, two, 3.5, calibrate=lambda config: [0.1, 0.2])
    with pytest.raises(ConfigError, match="needs both reference and layer_kl"):
        replace(calibrated, layer_kl=())


def test_layer_sensitivity_matches_a_one_layer_cache(smol):
    model, tokenizer = smol
    protocol = {"windows": 1, "prefill": 64, "continuation": 4, "progress": False}
    config = get_preset("quant", bits=2, block_size=64)
    kls = layer_sensitivity(model, tokenizer, config, **protocol)
    assert len(kls) == 30 and all(k > 0 for k in kls)
    configs = [config] + [get_preset("none")] * 29
    direct = perplexity_check(
        model, tokenizer, lambda m: GearCache(configs, model_config=m.config), **protocol
    )
    assert kls[0] == direct.kl


def test_json_round_trip(allocation, tmp_path):
    again = LayerAllocation.from_dict(json.loads(json.dumps(allocation.to_dict())))
    assert again == allocation
    path = save_allocation(allocation, tmp_path / "alloc.json")
    assert load_allocation(path) == allocation
    with pytest.raises(OutputExistsError):
        save_allocation(allocation, path)
    save_allocation(allocation, path, overwrite=True)
    path.write_text("{")
    with pytest.raises(ConfigError, match="not JSON"):
        load_allocation(path)
    path.write_text(json.dumps({**allocation.to_dict(), "version": 7}))
    with pytest.raises(ConfigError, match="version 7"):
        load_allocation(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_allocation(tmp_path / "missing.json")


def test_live_per_layer_configs_hold_their_own_bytes(smol):
    """Each layer of a per-layer GearCache holds what its own config makes of its K/V."""
    model, tokenizer = smol
    ids = corpus_ids(tokenizer)[None, :64]  # two blocks of 32 per layer, no buffer
    configs = [
        get_preset("quant", key_bits=2 + layer % 3, value_bits=2 + layer % 2, block_size=32,
                   rotate=layer % 2 == 0)
        for layer in range(30)
    ]  # fmt: skip
    cache = GearCache(configs, model_config=model.config)
    full = DynamicCache(config=model.config)
    key = cache_kwarg(model)
    with torch.inference_mode():
        model(input_ids=ids, **{key: cache})
        model(input_ids=ids, **{key: full})
    total = 0
    for layer, config in enumerate(configs):
        assert cache.layers[layer].config is config and cache.config_for(layer) is config
        k, v = full.layers[layer].keys, full.layers[layer].values
        want = compress(k, config, "keys").nbytes + compress(v, config, "values").nbytes
        assert cache.layers[layer].nbytes() == want
        total += want
    assert cache.nbytes() == total == cache_nbytes(cache)
    assert cache.config is None and cache.configs == tuple(configs)
    with pytest.raises(ConfigError, match="got 2 for a model of 30 layers"):
        GearCache(configs[:2], model_config=model.config)
    with pytest.raises(ConfigError, match="empty"):
        GearCache([])
    with pytest.raises(ConfigError, match="overrides"):
        GearCache(configs, bits=2)
    lazy = GearCache(configs[:1])
    k = torch.zeros(1, 3, 4, 64)
    lazy.update(k, k, 0)
    with pytest.raises(CacheError, match="layer 1 has no config"):
        lazy.update(k, k, 1)


def test_allocation_is_a_cache_spec(smol, allocation):
    model, _ = smol
    cache = make_cache(allocation, model)
    assert isinstance(cache, GearCache) and cache.configs == allocation.configs
    assert cache.storage_dtype is None and method_label(allocation) == allocation.label


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_allocate_then_ppl(smol, smol_dump, tmp_path, capsys, monkeypatch, allocation):
    out = tmp_path / "alloc.json"
    argv = ["allocate", smol_dump, "--target-bits", "4", "--candidates", GRID, "--out", out]
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0 and f"wrote {out}" in stdout and "uniform:" in stdout
    written = load_allocation(out)
    assert written.choices == allocation.choices and written.dump == allocation.dump
    assert written.error == pytest.approx(allocation.error)

    monkeypatch.setattr(gear_lab.models, "load_model", lambda *args, **kwargs: smol)
    protocol = ["--windows", "1", "--prefill", "64", "--continuation", "4"]
    code, stdout, _ = _run(capsys, "ppl", "--allocation", out, *protocol, "--json")
    assert code == 0
    got = json.loads(stdout)
    want = perplexity_check(*smol, written, windows=1, prefill=64, continuation=4, progress=False)
    assert got["method"] == written.label and got["kl"] == want.kl
    assert got["bits_per_entry"] == pytest.approx(written.bits_per_entry)  # 64 = one block


def test_cli_calibrate(smol, smol_dump, tmp_path, capsys, monkeypatch):
    seen = []

    def fake(model, tokenizer, config, windows):
        seen.append((model, config, windows))
        return [1e-3] * 30

    monkeypatch.setattr(gear_lab.models, "load_model", lambda *args, **kwargs: smol)
    monkeypatch.setattr(gear_lab.fidelity, "layer_sensitivity", fake)
    out = tmp_path / "alloc.json"
    argv = ["allocate", smol_dump, "--target-bits", "4", "--candidates", GRID, "--out", out]
    code, stdout, _ = _run(capsys, *argv, "--calibrate", "--calibrate-windows", "2")
    written = load_allocation(out)
    assert code == 0 and "predicted next-token KL, calibrated at" in stdout
    assert seen == [(smol[0], written.candidates[written.reference], 2)]
    assert written.layer_kl == (1e-3,) * 30


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-bits", "1"], "below the cheapest candidate"),
        (["--target-bits", "4", "--candidates", "bits"], "bad grid entry"),
        (["--target-bits", "4", "--samples", "7"], "sample 7"),
    ],
)
def test_cli_allocate_bad_input(smol_dump, tmp_path, capsys, extra, message):
    out = tmp_path / "alloc.json"
    code, _, err = _run(capsys, "allocate", smol_dump, "--out", out, *extra)
    last = err.splitlines()[-1]  # after the sweep's progress bar, when it ran
    assert code == 2 and last.startswith("gear-lab: error: ") and message in last
    assert err.count("gear-lab: error") == 1
    assert not out.exists()


def test_cli_refuses_an_existing_output_and_mixed_flags(
    smol_dump, tmp_path, capsys, monkeypatch, allocation
):
    out = tmp_path / "alloc.json"
    out.write_text("keep")
    code, _, err = _run(capsys, "allocate", smol_dump, "--target-bits", "4", "--out", out)
    assert code == 2 and "--overwrite" in err and out.read_text() == "keep"

    def never(*args, **kwargs):
        raise AssertionError("bad input must be refused before the model loads")

    monkeypatch.setattr(gear_lab.models, "load_model", never)
    for argv in (
        ["ppl", "--allocation", out, "--bits", "2"],
        ["ppl", "--allocation", out, "--baseline", "quanto:4"],
        ["check", "--prompt", "x", "--allocation", out, "--method", "kivi"],
    ):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "--allocation sets every layer's method" in err
    code, _, err = _run(capsys, "ppl", "--allocation", out)
    assert code == 2 and err.count("\n") == 1 and "not JSON" in err
    other = replace(allocation, model="other-model")
    save_allocation(other, out, overwrite=True)
    code, _, err = _run(capsys, "ppl", "--allocation", out)
    assert code == 2 and "measured on other-model, not smollm2-135m" in err
