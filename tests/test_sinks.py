"""Attention sinks (``CompressionConfig.sinks``): the first tokens kept as they are, in
``compress`` and in ``GearCache`` (StreamingLLM, Xiao et al. 2024; KVQuant, Hooper et al. 2024)."""

from __future__ import annotations

import pytest
import torch
from compress_helpers import PROPERTY, left_padded, make_tensor, tensors
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Gemma3TextConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from gear_lab.cache import GearCache
from gear_lab.compression import (
    Compressed,
    CompressionConfig,
    compress,
    config_label,
    get_preset,
    with_overrides,
)
from gear_lab.errors import ConfigError

HEADS, DIM = 2, 8


# ----------------------------------------------------------------------------- compress


@PROPERTY
@given(
    x=tensors(dtypes=(torch.float32, torch.float16)),
    sinks=st.integers(0, 24),
    block_size=st.sampled_from((None, 1, 16, 64)),
    preset=st.sampled_from(("quant", "kivi", "gear", "outlier-quant", "fp8", "none")),
    kind=st.sampled_from(("keys", "values")),
)
def test_compress_keeps_the_sinks_and_compresses_the_rest_as_before(
    x, sinks, block_size, preset, kind
):
    """The first ``sinks`` tokens come back exactly; the rest is exactly ``compress`` of the
    rest without sinks (blocks start after the sinks); bytes are the kept tensors'."""
    overrides = {"block_size": block_size, "sinks": sinks}
    if preset == "gear":
        overrides["rank"] = 1
    config = get_preset(preset, **overrides)
    c = compress(x, config, kind)
    out = c.decompress()
    assert out.shape == x.shape and out.dtype == x.dtype
    kept = min(sinks, x.shape[-2])
    assert torch.equal(out[..., :kept, :], x[..., :kept, :])
    assert c.nbytes == sum(t.nbytes for t in c.tensors().values())
    if sinks >= x.shape[-2]:  # nothing left to compress
        assert c.nbytes == x.nbytes
        return
    rest = compress(x[..., sinks:, :], with_overrides(config, sinks=0), kind)
    assert torch.equal(out[..., sinks:, :], rest.decompress())
    assert c.nbytes == rest.nbytes + x[..., :sinks, :].nbytes
    if sinks and rest.body_shape is not None:
        assert torch.equal(c.tensors()["sink"], x[..., :sinks, :])
        parts = c.bytes_by_part()
        assert parts["full_precision"] == rest.bytes_by_part()["full_precision"] + c.sink.nbytes
        assert not c.outlier_mask()[..., :sinks, :].any()


def test_sinks_zero_is_the_default_and_changes_nothing():
    x = make_tensor(1, (1, 2, 70, 16), style="channels")
    config = get_preset("gear", block_size=16)
    assert config.sinks == 0
    a, b = compress(x, config), compress(x, with_overrides(config, sinks=0))
    assert a.sink is None and "sink" not in a.tensors()
    assert torch.equal(a.decompress(), b.decompress()) and a.nbytes == b.nbytes


def test_sinks_stack_with_cat_and_select():
    """Blocks with sinks stack on their leading dim and select back (the cache's chunks)."""
    config = get_preset("kivi", bits=2, group_size=8, block_size=8, sinks=3)
    xs = [make_tensor(s, (n, HEADS, 27, DIM)) for s, n in ((1, 2), (2, 1))]
    parts = [compress(x, config, "values") for x in xs]
    stacked = Compressed.cat(parts)
    assert torch.equal(stacked.decompress(), torch.cat([p.decompress() for p in parts]))
    assert stacked.nbytes == sum(p.nbytes for p in parts)
    picked = stacked.select(torch.tensor([2, 0]))
    want = torch.cat([parts[1].decompress(), parts[0].decompress()[:1]])
    assert torch.equal(picked.decompress(), want)


def test_sinks_setting_is_validated_and_labelled():
    for bad in (-1, 1.5, True, "4"):
        with pytest.raises(ConfigError, match="sinks"):
            CompressionConfig(sinks=bad)
    config = get_preset("kivi", sinks=4)
    assert config.sinks == 4 and config_label(config) == "kivi (sinks=4)"
    assert CompressionConfig.from_json(config.to_json()) == config


# ----------------------------------------------------------------------------- GearCache


def _states(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, seq, DIM, generator=g),
        torch.randn(batch, HEADS, seq, DIM, generator=g),
    )


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.integers(1, 20),
    steps=st.integers(0, 12),
    block=st.integers(1, 6),
    sinks=st.integers(0, 8),
    preset=st.sampled_from(["kivi", "quant"]),
    workspace=st.booleans(),
)
def test_cache_keeps_the_sinks_exact(prompt, steps, block, sinks, preset, workspace):
    """Every step returns the sinks exactly; blocks of n_b start after them; bytes held are the
    blocks, the buffer and the sinks; the past is exactly ``compress`` of the same tokens."""
    config = get_preset(preset, bits=2, group_size=4, block_size=block, sinks=sinks)
    cache = GearCache(config, workspace=workspace)
    k, v = _states(1, prompt + steps + 1, seed=prompt * 100 + steps)
    per_token = 2 * HEADS * DIM * 4
    for lo, hi in [(0, prompt), *((t, t + 1) for t in range(prompt, prompt + steps))]:
        out_k, out_v = cache.update(k[..., lo:hi, :], v[..., lo:hi, :], 0)
        n = min(sinks, hi)
        assert torch.equal(out_k[..., :n, :], k[..., :n, :])
        assert torch.equal(out_v[..., :n, :], v[..., :n, :])
        layer = cache.layers[0]
        done = sinks + max(hi - sinks, 0) // block * block
        assert layer.rows[0].done == done
        assert layer.blocks() == [(0, s, block) for s in range(sinks, done, block)]
        compressed = sum(c.nbytes for c in layer.chunks.values())
        assert cache.nbytes() == compressed + (max(hi - done, 0) + n) * per_token
        if not workspace:
            store = 2 * HEADS * sinks * DIM * 4 if sinks else 0
            tail = layer.keys.nbytes + layer.values.nbytes
            assert cache.memory_breakdown()["buffers"] == tail + store
    seq = prompt + steps
    next_k, next_v = k[..., seq:, :], v[..., seq:, :]
    seen_k, seen_v = cache.layers[0].update(next_k, next_v)
    if not 0 < done <= seq:  # nothing compressed yet: everything comes back exact
        want_k, want_v = k, v
    else:
        past_k = compress(k[..., :done, :], config, "keys").decompress()
        past_v = compress(v[..., :done, :], config, "values").decompress()
        want_k = torch.cat([past_k, k[..., done:, :]], dim=-2)
        want_v = torch.cat([past_v, v[..., done:, :]], dim=-2)
    assert torch.equal(seen_k, want_k) and torch.equal(seen_v, want_v)


@pytest.mark.parametrize("workspace", [False, True])
def test_sinks_sit_at_each_rows_first_real_token(workspace):
    """A left-padded row keeps its own first tokens as sinks and gets the blocks it gets alone."""
    n_b, pad, real, steps, sinks = 4, 3, 9, 6, 2
    config = get_preset("kivi", bits=2, group_size=4, block_size=n_b, sinks=sinks)
    k, v = _states(1, real + steps, seed=1)
    alone = GearCache(config, workspace=workspace)
    out_alone = alone.update(k[..., :real, :], v[..., :real, :], 0)
    other_k, other_v = _states(1, pad + real + steps, seed=2)
    bk, bv, mask = left_padded(k, v, other_k, other_v, pad)
    batch = GearCache(config, workspace=workspace)
    batch.set_padding(mask(real))
    batch.update(bk[..., : pad + real, :], bv[..., : pad + real, :], 0)
    for t in range(real, real + steps):
        out_alone = alone.update(k[..., t : t + 1, :], v[..., t : t + 1, :], 0)
        s = t + pad
        out_batch = batch.update(bk[..., s : s + 1, :], bv[..., s : s + 1, :], 0)
        assert torch.equal(out_batch[0][:1, :, pad:], out_alone[0])
        assert torch.equal(out_batch[1][:1, :, pad:], out_alone[1])
        assert torch.equal(out_batch[0][1:, :, :sinks], other_k[..., :sinks, :])
    rows = batch.layers[0].rows
    assert [r.first for r in rows] == [pad, 0]
    assert [r.done for r in rows] == [
        pad + sinks + (real + steps - sinks) // n_b * n_b,
        sinks + (pad + real + steps - sinks) // n_b * n_b,
    ]


def test_sinks_leave_a_sliding_window_like_any_token():
    """On a sliding layer sinks are dropped with the rest of the window ('none' equals
    transformers' DynamicSlidingWindowLayer), and their store is freed."""
    window, n_b, sinks = 7, 3, 2
    config = Gemma3TextConfig(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=window,
    )
    cache = GearCache(get_preset("none", block_size=n_b, sinks=sinks), model_config=config)
    ref = DynamicSlidingWindowLayer(sliding_window=window)
    k, v = _states(1, 20, seed=3)
    for lo, hi in [(0, 4), *((t, t + 1) for t in range(4, 20))]:
        got = cache.update(k[..., lo:hi, :], v[..., lo:hi, :], 0)
        want = ref.update(k[..., lo:hi, :], v[..., lo:hi, :])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        full = cache.update(k[..., lo:hi, :], v[..., lo:hi, :], 1)
        assert torch.equal(full[0], k[..., :hi, :])
        in_window = hi - (window - 1) < sinks
        assert (cache.layers[0].sink_keys is not None) == in_window
        assert cache.layers[1].sink_keys is not None


def test_the_smol_caches_sinks_reach_attention_exactly_at_every_step(smol):
    """SmolLM2 with 2-bit blocks and 4 sinks: every layer, at every decoding step, attends to
    the sink keys and values exactly as the model first gave them."""
    model, tokenizer = smol
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 3, return_tensors="pt")
    config = get_preset("kivi", bits=2, group_size=8, block_size=8, sinks=4)
    cache = GearCache(config, model_config=model.config)
    first: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    checked = 0
    update = cache.update

    def spy(key_states, value_states, layer_idx, *args, **kwargs):
        nonlocal checked
        out_k, out_v = update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx not in first:
            first[layer_idx] = (key_states[..., :4, :].clone(), value_states[..., :4, :].clone())
        else:
            assert torch.equal(out_k[..., :4, :], first[layer_idx][0])
            assert torch.equal(out_v[..., :4, :], first[layer_idx][1])
            checked += 1
        return out_k, out_v

    cache.update = spy
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=6, do_sample=False, cache=cache)
    assert checked == 5 * model.config.num_hidden_layers
    assert cache.compressions > 0 and cache.nbytes() < cache.full_precision_nbytes()


def test_a_sweep_grid_over_sinks(smol_dump):
    """``sinks`` is a grid axis and a column of the sweep table; kept sinks cost their bytes."""
    from gear_lab import sweep

    df = sweep(
        smol_dump, {"bits": [2], "sinks": [0, 16]}, layers="0", attention=False, progress=False
    )
    assert set(df["sinks"]) == {0, 16}
    sizes = df.groupby(["kind", "sinks"])["nbytes"].sum()
    for kind in ("keys", "values"):  # 16 float32 tokens replace 16 2-bit ones
        assert sizes[kind, 16] > sizes[kind, 0]
