"""Pre-RoPE key quantization, live (KVQuant, Hooper et al. 2024): ``GearCache(pre_rope=...)``
un-rotates post-RoPE keys, compresses them, and rotates them back for attention."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
from compress_helpers import left_padded
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from gear_lab.architecture import model_arch
from gear_lab.cache import GearCache
from gear_lab.cache_specs import make_cache, method_label
from gear_lab.cli.check import add_model_args, cache_spec_from_args
from gear_lab.compression import compress, get_preset
from gear_lab.compression.quantize import unpack_codes
from gear_lab.corpus import corpus_ids
from gear_lab.dump import open_dump
from gear_lab.errors import ConfigError
from gear_lab.fidelity import perplexity_check
from gear_lab.rope import ModelRope, rope_positions


def _rope_by_formula(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE of ``x`` ``[n, h, seq, d]`` by its definition (channels ``i`` and ``i + d/2`` rotated
    by ``position * theta^(-2i/d)``; angles in float32, as the model computes them), float64."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)
    angle = (positions[..., None].float() * inv_freq).double()[:, None]  # [n, 1, seq, d/2]
    x1, x2 = x[..., : d // 2].double(), x[..., d // 2 :].double()
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 3),
    seq=st.integers(1, 40),
    start=st.integers(0, 2000),
    layer=st.integers(0, 29),
    seed=st.integers(0, 2**31 - 1),
)
def test_model_rope_is_rope_and_its_inverse_undoes_it(smol, n, seq, start, layer, seed):
    model, _ = smol
    rope = ModelRope(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, seq, 64, generator=g)
    positions = rope_positions(torch.randint(0, start + 1, (n,), generator=g), seq)
    rotated = rope.rotate(x, positions, layer)
    theta = model_arch(model).layers[layer].rope_theta
    torch.testing.assert_close(
        rotated.double(), _rope_by_formula(x, positions, theta), atol=2e-5, rtol=1e-5
    )
    torch.testing.assert_close(rope.rotate(rotated, positions, layer, inverse=True), x)


def test_the_inverse_holds_for_scaled_rope():
    """YaRN scales cos and sin (attention_scaling != 1): the inverse still undoes the rotation."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    rope = ModelRope(LlamaForCausalLM(config))
    scale = rope.embedding.attention_scaling
    assert not math.isclose(scale, 1.0)
    x = torch.randn(2, 1, 9, 16, generator=torch.Generator().manual_seed(0))
    positions = rope_positions(torch.tensor([0, 100]), 9)
    rotated = rope.rotate(x, positions, 0)
    torch.testing.assert_close(rotated.norm(dim=-1), scale * x.norm(dim=-1))
    torch.testing.assert_close(rope.rotate(rotated, positions, 0, inverse=True), x)


def _teacher_forced(model, ids: torch.Tensor, prompt: int, cache) -> torch.Tensor:
    """Next-token logits after the prompt, then after each later token fed one at a time."""
    with torch.inference_mode():
        out = [model(input_ids=ids[:, :prompt], cache=cache, use_cache=True).logits[0, -1]]
        for t in range(prompt, ids.shape[1]):
            step = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            out.append(step.logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("workspace", [False, True])
def test_pre_rope_keys_without_quantization_give_the_same_logits(smol, workspace):
    """Quantization off: pre-RoPE live keys give post-RoPE's logits (40-token prompt, 8 steps)."""
    model, tokenizer = smol
    ids = corpus_ids(tokenizer)[:48][None]
    config = get_preset("none", block_size=8)
    want = _teacher_forced(model, ids, 40, GearCache(config, model_config=model.config))
    cache = GearCache(
        config, model_config=model.config, workspace=workspace, pre_rope=ModelRope(model)
    )
    got = _teacher_forced(model, ids, 40, cache)
    assert cache.compressions == model.config.num_hidden_layers * (48 // 8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_live_pre_rope_codes_match_compress_of_the_dumps_pre_rope_keys(smol, smol_dump):
    """4-bit: the cache's key codes are compress() of the dump's pre-RoPE keys of the same tokens
    (up to entries that the un-rotation's rounding moves across a level), not of post-RoPE keys."""
    model, _ = smol
    config = get_preset("quant", bits=4, block_size=64)
    cache = GearCache(config, model_config=model.config, pre_rope=ModelRope(model))
    with open_dump(smol_dump) as dump:
        ids = dump.token_ids(0)[None]
        with torch.inference_mode():
            model(input_ids=ids, cache=cache, use_cache=True)
        for layer in (0, 11, 29):
            (chunk,) = cache.layers[layer].chunks.values()
            got = chunk.keys.base
            blocks = {
                kind: dump.load(kind, layer, 0).unflatten(1, (-1, 64)).transpose(0, 1)
                for kind in ("keys_pre_rope", "keys")
            }
            assert chunk.keys.shape == blocks["keys"].shape
            codes = {}
            for kind, x in blocks.items():
                want = compress(x, config.keys, "keys").base
                codes[kind] = unpack_codes(want.codes, 4, x.numel(), torch.float32)
                if kind == "keys_pre_rope":
                    torch.testing.assert_close(got.scale, want.scale, atol=1e-3, rtol=1e-3)
            mine = unpack_codes(got.codes, 4, math.prod(got.shape), torch.float32)
            moved = (mine - codes["keys_pre_rope"]).abs()
            assert moved.max() <= 1 and moved.mean() < 1e-3
            assert (mine != codes["keys"]).float().mean() > 0.3  # really before RoPE


def test_pre_rope_positions_count_from_each_rows_first_real_token(smol):
    """A left-padded row un-rotates its keys at its own positions (first real token = 0, as
    generate numbers it): its 4-bit blocks equal the same row's alone (un-rotated at positions
    shifted by the padding they would quantize differently)."""
    model, _ = smol
    rope = ModelRope(model)
    n_b, pad, real, steps = 4, 3, 9, 5
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 1, 3, real + steps, 64, generator=g)
    config = get_preset("kivi", bits=4, block_size=n_b)
    alone = GearCache(config, pre_rope=rope)
    alone.update(k[..., :real, :], v[..., :real, :], 0)
    other = torch.randn(1, 3, pad + real + steps, 64, generator=g)
    bk, bv, mask = left_padded(k, v, other, other, pad)
    batch = GearCache(config, pre_rope=rope)
    batch.set_padding(mask(real))
    batch.update(bk[..., : pad + real, :], bv[..., : pad + real, :], 0)
    for t in range(real, real + steps):
        out_alone = alone.update(k[..., t : t + 1, :], v[..., t : t + 1, :], 0)
        s = t + pad
        out_batch = batch.update(bk[..., s : s + 1, :], bv[..., s : s + 1, :], 0)
        assert torch.equal(out_batch[0][:1, :, pad:], out_alone[0])
    assert batch.compressions > alone.compressions > 0


def test_pre_rope_is_offered_for_gear_caches_only(smol):
    model, tokenizer = smol
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    with pytest.raises(ConfigError, match="pre-rope"):
        cache_spec_from_args(parser.parse_args(["--baseline", "quanto:4", "--pre-rope"]))
    assert parser.parse_args(["--pre-rope"]).pre_rope
    with pytest.raises(ConfigError, match="pre_rope"):
        make_cache("dynamic", model, pre_rope=True)
    with pytest.raises(ConfigError, match="pre_rope"):
        GearCache("kivi", pre_rope=True)
    assert make_cache("kivi", model, pre_rope=True).pre_rope is not None
    assert method_label("kivi", pre_rope=True) == "kivi + pre-RoPE keys"
    result = perplexity_check(
        model, tokenizer, "none", windows=1, prefill=64, continuation=8, progress=False,
        pre_rope=True,
    )  # fmt: skip
    assert result.method == "none + pre-RoPE keys" and result.kl < 1e-8
