"""The HDF5 dump: schema, lazy validated reads, atomic writes, and every kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gear_lab import capture_dump, open_dump
from gear_lab.capture import capture_samples
from gear_lab.dump import SCHEMA_VERSION, write_dump
from gear_lab.errors import DumpError, DumpExistsError, OutputError

PROMPTS = ["Keys and values of every layer.", "A second, somewhat longer prompt for the dump test."]


@pytest.fixture(scope="module")
def tiny_dump(smol, tmp_path_factory) -> Path:
    """Two short prompts, layers 0 and 3, all four kinds."""
    out = tmp_path_factory.mktemp("tiny") / "tiny.h5"
    return capture_dump(
        out,
        prompts=PROMPTS,
        layers="0,3",
        with_queries=True,
        pre_rope_keys=True,
        progress=False,
        loaded=smol,
    )


@pytest.fixture
def copy(tiny_dump, tmp_path):
    """A writable copy of the tiny dump."""
    target = tmp_path / "copy.h5"
    shutil.copyfile(tiny_dump, target)
    return target


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(DumpError, match=match) as info, open_dump(path) as dump:
        for sample in range(dump.num_samples):
            for layer in dump.layers:
                for kind in dump.kinds:
                    dump.load(kind, layer, sample)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_round_trip_metadata_and_shapes(smol, tiny_dump):
    model, tokenizer = smol
    with open_dump(tiny_dump) as dump:
        assert dump.model_id == "smollm2-135m"
        assert dump.num_samples == 2
        assert dump.layers == [0, 3]
        assert dump.kinds == ("keys", "values", "queries", "keys_pre_rope")
        assert dump.config["num_hidden_layers"] == model.config.num_hidden_layers
        assert (dump.num_heads, dump.num_kv_heads, dump.head_dim) == (
            model.config.num_attention_heads,
            model.config.num_key_value_heads,
            model.config.head_dim,
        )
        meta = dump.metadata
        assert meta["schema_version"] == SCHEMA_VERSION
        assert meta["versions"]["torch"] == torch.__version__
        assert meta["dtype"] == "float32" and meta["device"] == "cpu"
        assert meta["source"] == "prompts"
        json.dumps(meta)  # plain Python
        for sample, prompt in enumerate(PROMPTS):
            assert dump.text(sample) == prompt
            ids = dump.token_ids(sample)
            assert ids.dtype == torch.long
            assert ids.tolist() == tokenizer(prompt).input_ids
            assert dump.seq_len(sample) == len(ids)
            q = dump.load("queries", 3, sample, dtype=torch.float64)
            assert q.shape == (dump.num_heads, len(ids), dump.head_dim)
            assert q.dtype == torch.float64
            assert dump.load("values", 0, sample).shape == (dump.num_kv_heads, len(ids), 64)
        assert dump.layer_info(3)["attention_type"] == "full_attention"
        summary = dump.summary()
        assert "smollm2-135m" in summary and "0,3" in summary


def test_plain_h5py_reads_the_documented_layout(tiny_dump):
    with h5py.File(tiny_dump, "r") as f:
        assert f.attrs["format"] == "gear-lab-dump"
        assert f.attrs["schema_version"] == SCHEMA_VERSION
        assert json.loads(f.attrs["config"])["model_type"] == "llama"
        keys = f["sample_0001/layer_03/keys"]
        assert keys.shape == (3, len(f["sample_0001/token_ids"]), 64)
        assert keys.compression == "gzip" and keys.chunks is not None
        assert f["sample_0001/text"].asstr()[()] == PROMPTS[1]
        assert f["sample_0000/layer_00"].attrs["attention_type"] == "full_attention"
        assert f["sample_0000/layer_00"].attrs["sliding_window"] == 0


def test_missing_file(tmp_path):
    _one_line_error(tmp_path / "nope.h5", "no such dump file")


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("definitely not HDF5\n" * 100)
    _one_line_error(path, "not an HDF5 file")


def test_truncated(copy):
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    _one_line_error(copy, "truncated file")


def test_foreign_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    _one_line_error(path, "not a gear-lab dump")


def test_future_schema(copy):
    with h5py.File(copy, "r+") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    _one_line_error(copy, "newer than this gear-lab")


def test_wrong_schema(copy):
    with h5py.File(copy, "r+") as f:
        f.attrs["schema_version"] = "one"
    _one_line_error(copy, "invalid schema_version")


def test_missing_dataset(copy):
    with h5py.File(copy, "r+") as f:
        del f["sample_0001/layer_03/values"]
    _one_line_error(copy, "missing dataset /sample_0001/layer_03/values")


def test_missing_root_attribute(copy):
    with h5py.File(copy, "r+") as f:
        del f.attrs["head_dim"]
    _one_line_error(copy, "missing root attributes")


def test_shape_mismatch(copy):
    with h5py.File(copy, "r+") as f:
        del f["sample_0000/layer_00/keys"]
        f["sample_0000/layer_00/keys"] = np.zeros((3, 2, 64), dtype=np.float32)
    _one_line_error(copy, "has shape")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(copy, bad):
    with h5py.File(copy, "r+") as f:
        f["sample_0001/layer_03/queries"][2, 1, 5] = bad
    with open_dump(copy) as dump:  # open stays cheap: the data is checked when loaded
        dump.load("keys", 3, 1)
    _one_line_error(copy, "NaN or Inf")


def test_unknown_selections(tiny_dump):
    with open_dump(tiny_dump) as dump:
        for bad in (lambda: dump.load("keys", 1), lambda: dump.load("keys", 0, sample=2)):
            with pytest.raises(DumpError):
                bad()
        with pytest.raises(DumpError, match="no 'scores'"):
            dump.load("scores", 0)


def test_existing_file_needs_overwrite(smol, copy):
    before = copy.read_bytes()
    with pytest.raises(DumpExistsError):
        capture_dump(copy, prompts=["x y z"], layers="0", progress=False, loaded=smol)
    assert copy.read_bytes() == before
    capture_dump(copy, prompts=["x y z"], layers="0", overwrite=True, progress=False, loaded=smol)
    with open_dump(copy) as dump:
        assert dump.num_samples == 1 and dump.layers == [0]


def test_unwritable_output_folder(smol, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OutputError, match="output folder"):
        capture_dump(blocker / "d.h5", prompts=["x"], progress=False, loaded=smol)
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_capture_leaves_nothing(smol, tmp_path, error):
    model, tokenizer = smol
    real = capture_samples(model, tokenizer, PROMPTS, 16, layers=[0], progress=False)

    def interrupted():
        yield next(real)
        raise error("stop")

    with pytest.raises(error):
        write_dump(tmp_path / "d.h5", interrupted(), model, [0], ["keys", "values"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("dtype", "stored"), [("bfloat16", "float32"), ("float16", "float16")])
def test_half_precision_capture(tmp_path, dtype, stored):
    from transformers import DynamicCache

    from gear_lab import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype=dtype)
    path = capture_dump(
        tmp_path / "h.h5",
        prompts=PROMPTS[:1],
        layers="2",
        progress=False,
        loaded=(model, tokenizer),
    )
    with open_dump(path) as dump:
        assert dump.metadata["dtype"] == dtype and dump.metadata["storage_dtype"] == stored
        keys = dump.load("keys", 2)
        assert keys.dtype == getattr(torch, stored)
        reference = DynamicCache()
        with torch.inference_mode():
            model(input_ids=dump.token_ids(0)[None], cache=reference, use_cache=True)
        assert torch.equal(keys.to(model.dtype), reference.layers[2].keys[0])
