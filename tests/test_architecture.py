"""model_arch: one typed reading of every model family's attention config."""

from __future__ import annotations

import pytest
from transformers import Gemma3Config, Gemma3TextConfig, LlamaConfig, Qwen2Config

from gear_lab.architecture import FULL, SLIDING, model_arch
from gear_lab.capture import attention_modules
from gear_lab.errors import ModelError


def test_smollm2_facts_match_its_modules(smol):
    model, _ = smol
    arch = model_arch(model)
    config = model.config
    assert arch.model_type == "llama"
    assert (arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    assert arch.max_context == config.max_position_embeddings
    assert arch.softcap is None
    assert arch.sliding_windows == [None] * config.num_hidden_layers
    assert all(attn.scaling == arch.scaling for attn in attention_modules(model))
    assert {layer.rope_theta for layer in arch.layers} == {config.rope_parameters["rope_theta"]}
    assert model_arch(config) == arch
    assert arch.summary() == {
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "attention_types": {FULL: config.num_hidden_layers},
    }


def test_qwen2_head_dim_is_derived():
    config = Qwen2Config(
        hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, num_hidden_layers=4
    )
    arch = model_arch(config)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (12, 2, 128)
    assert arch.scaling == 128**-0.5
    assert arch.layers[0].rope_theta == config.rope_parameters["rope_theta"]
    assert arch.layers[0].rope_scaling is None
    assert arch.cached_entries(10) == 4 * 2 * 2 * 128 * 10


def test_gemma3_nested_config_has_sliding_layers_and_per_type_rope():
    config = Gemma3Config(text_config={"num_hidden_layers": 12, "sliding_window": 512})
    arch = model_arch(config)
    text = config.text_config
    assert arch.num_layers == 12 and arch.head_dim == text.head_dim
    assert [layer.attention_type for layer in arch.layers] == text.layer_types
    assert arch.attention_type_counts() == {
        t: text.layer_types.count(t) for t in dict.fromkeys(text.layer_types)
    }
    sliding = next(layer for layer in arch.layers if layer.attention_type == SLIDING)
    full = next(layer for layer in arch.layers if layer.attention_type == FULL)
    assert sliding.sliding_window == 512 and full.sliding_window is None
    assert sliding.rope_theta == text.rope_parameters[SLIDING]["rope_theta"]
    assert full.rope_theta == text.rope_parameters[FULL]["rope_theta"]
    assert full.rope_theta != sliding.rope_theta
    assert arch.scaling == text.query_pre_attn_scalar**-0.5
    windows = arch.sliding_windows
    per_token = 2 * arch.num_kv_heads * arch.head_dim
    assert arch.cached_entries(1000) == per_token * sum(1000 if w is None else 511 for w in windows)
    assert model_arch(Gemma3TextConfig(**text.to_dict())) == arch


def test_rope_scaling_and_softcap_are_read():
    config = LlamaConfig(
        num_hidden_layers=2,
        rope_theta=500_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    (layer, _) = model_arch(config).layers
    assert layer.rope_theta == 500_000.0
    assert layer.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    gemma = Gemma3TextConfig(num_hidden_layers=2, attn_logit_softcapping=50.0)
    assert model_arch(gemma).softcap == 50.0


def test_a_config_without_heads_is_rejected():
    with pytest.raises(ModelError):
        model_arch(object())
