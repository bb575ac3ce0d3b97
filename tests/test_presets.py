"""Configs, presets and the shared CLI flags (gear_lab.compression.config / .presets,
gear_lab.cli._method_args)."""

from __future__ import annotations

import argparse
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gear_lab.cli._method_args import add_method_args, config_from_args
from gear_lab.compression import (
    CompressionConfig,
    TensorCompression,
    config_label,
    get_preset,
    list_presets,
    preset_descriptions,
    with_overrides,
)
from gear_lab.errors import ConfigError
from gear_lab.sweeps import parse_grid

PRESETS = [
    "gear",
    "gear-l",
    "gear-kcvt",
    "kcvt",
    "kivi",
    "outlier-quant",
    "quant",
    "turboquant",
    "nuq",
    "fp8",
    "none",
]

tensor_configs = st.builds(
    TensorCompression,
    bits=st.one_of(st.none(), st.integers(1, 8)),
    axis=st.sampled_from(("channel", "token")),
    group_size=st.one_of(st.none(), st.integers(1, 512)),
    outliers=st.floats(0.0, 0.99),
    outlier_mode=st.sampled_from(("signed", "magnitude")),
    outlier_axis=st.sampled_from(("channel", "token")),
    rank=st.integers(0, 64),
    lowrank=st.sampled_from(("power", "svd")),
    loops=st.integers(1, 9),
    seed=st.integers(0, 2**40),
    factor_dtype=st.sampled_from(("float16", "bfloat16", "float8_e4m3")),
)


@given(
    keys=tensor_configs,
    values=tensor_configs,
    block_size=st.one_of(st.none(), st.integers(1, 256)),
    prefill_rank=st.one_of(st.none(), st.integers(0, 8)),
    name=st.text(max_size=10),
    preset=st.one_of(st.none(), st.sampled_from(PRESETS)),
)
def test_configs_round_trip_through_dict_and_json(
    keys, values, block_size, prefill_rank, name, preset
):
    config = CompressionConfig(keys, values, block_size, prefill_rank, name, preset)
    assert CompressionConfig.from_dict(config.to_dict()) == config
    assert CompressionConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json()) == config.to_dict()
    assert TensorCompression.from_dict(keys.to_dict()) == keys


def test_every_preset_is_listed_valid_and_round_trips():
    assert list_presets() == PRESETS
    for name in PRESETS:
        config = get_preset(name)
        assert config.name == config.preset == name
        assert CompressionConfig.from_json(config.to_json()) == config
    gear = get_preset("gear")
    assert (gear.keys.bits, gear.keys.group_size, gear.keys.outliers, gear.keys.rank) == (
        4,
        64,
        0.02,
        4,
    )
    assert (gear.keys.axis, gear.values.axis) == ("channel", "token")  # KIVI convention
    assert get_preset("gear-l").keys.outliers == 0
    assert get_preset("outlier-quant").keys.rank == 0
    assert get_preset("gear-kcvt").keys.group_size is None and get_preset("kcvt").keys.rank == 0
    kivi = get_preset("kivi")
    assert (kivi.keys.group_size, kivi.block_size) == (32, 64)
    assert get_preset("fp8").keys.fp8 == "e4m3" and get_preset("fp8").keys.bits is None
    assert get_preset("none").keys.is_identity and get_preset("none").values.is_identity


@pytest.mark.parametrize(
    "fields",
    [
        {"bits": 0},
        {"bits": 9},
        {"bits": 2.0},
        {"bits": True},
        {"group_size": 0},
        {"outliers": -0.1},
        {"outliers": 1.0},
        {"outliers": "0.1"},
        {"rank": -1},
        {"loops": 0},
        {"seed": -1},
        {"axis": "head"},
        {"outlier_mode": "abs"},
        {"outlier_axis": "head"},
        {"lowrank": "eig"},
        {"fp8": "e3m4", "bits": None},
        {"fp8": "e4m3"},  # fp8 together with bits
        {"rotate": 1},
        {"rotate": True, "bits": None},  # nothing to rotate for
        {"fp8_scale": "tensor"},  # not an fp8 method
        {"fp8_scale": "row", "fp8": "e4m3", "bits": None},
        {"factor_dtype": "float8"},
        {"factor_dtype": "float32"},
    ],
)
def test_bad_tensor_configs_raise(fields):
    with pytest.raises(ConfigError):
        TensorCompression(**fields)


@pytest.mark.parametrize(
    "fields",
    [{"block_size": 0}, {"prefill_rank": -1}, {"keys": {"bits": 2}}, {"name": 3}],
)
def test_bad_compression_configs_raise(fields):
    with pytest.raises(ConfigError):
        CompressionConfig(**fields)


def test_bad_serialised_configs_raise():
    with pytest.raises(ConfigError, match="JSON"):
        CompressionConfig.from_json("{not json")
    with pytest.raises(ConfigError, match="unknown"):
        CompressionConfig.from_dict({"keys": {"bitz": 2}})
    with pytest.raises(ConfigError, match="unknown"):
        CompressionConfig.from_dict({"block": 2})
    with pytest.raises(ConfigError, match="mapping"):
        CompressionConfig.from_json("[1, 2]")


def test_preset_overrides():
    config = get_preset("gear", bits=2, key_rank=1, value_group_size=None, block_size=64)
    assert (config.keys.bits, config.values.bits) == (2, 2)
    assert (config.keys.rank, config.values.rank) == (1, 4)
    assert (config.keys.group_size, config.values.group_size) == (64, None)
    assert config.block_size == 64
    assert config.name == "gear (bits=2, value_group_size=none, key_rank=1, block_size=64)"
    assert config.preset == "gear"
    assert get_preset("gear", name="mine").name == "mine"
    with pytest.raises(ConfigError, match="known: gear, gear-l"):
        get_preset("gaer")
    with pytest.raises(ConfigError, match="override 'bitz'"):
        get_preset("gear", bitz=2)
    with pytest.raises(ConfigError, match="bits must be"):
        get_preset("gear", value_bits=12)


def test_old_dicts_without_a_preset_still_load():
    data = get_preset("gear", bits=2).to_dict()
    del data["preset"]
    data["name"] = "gear[bits=2]"  # the old label format, never parsed
    config = CompressionConfig.from_dict(data)
    assert config.preset is None and config.name == "gear[bits=2]"
    assert config_label(config) == "gear[bits=2]"  # a hand-built config keeps its name
    assert with_overrides(config, rank=2).name == "gear[bits=2]"


def test_labels_name_what_differs_from_the_preset():
    gear = get_preset("gear", bits=2)
    assert gear.name == config_label(gear) == "gear (bits=2)"
    assert get_preset("gear", bits=4).name == "gear"  # the preset's own value: nothing differs
    varied = with_overrides(gear, bits=8)  # the studio's sweeps vary one setting like this
    assert varied == get_preset("gear", bits=8) and varied.name == "gear (bits=8)"
    mixed = get_preset("kivi", value_bits=4, rotate=True, outliers=0.05, group_size=None)
    assert mixed.name == "kivi (value_bits=4, group_size=none, outliers=0.05, rotate=true)"
    assert with_overrides(get_preset("gear", name="mine"), bits=2).name == "mine"
    # a label's settings are overrides that rebuild the config from its preset
    preset, _, rest = mixed.name.partition(" (")
    text = ";".join(part.strip() for part in rest.rstrip(")").split(","))
    overrides = {k: v[0] for k, v in parse_grid(text).items()}
    assert get_preset(preset, **overrides) == mixed


def test_preset_descriptions_list_every_preset_with_its_settings():
    lines = preset_descriptions()
    assert list(lines) == PRESETS
    assert lines["kivi"].endswith("(bits=2, group_size=32, block_size=64)")
    assert lines["none"] == "no compression (full precision)"


def test_for_kind_and_prefill_rank():
    config = get_preset("gear", prefill_rank=8)
    assert config.for_kind("keys").rank == 4
    assert config.for_kind("keys", prefill=True).rank == 8
    assert config.for_kind("values", prefill=True).axis == "token"
    assert get_preset("quant", prefill_rank=8).for_kind("keys", prefill=True).rank == 0
    with pytest.raises(ConfigError):
        config.for_kind("queries")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    return parser.parse_args(argv)


def test_cli_flags_become_preset_overrides():
    args = parse(
        [
            "--method",
            "gear",
            "--bits",
            "2",
            "--group-size",
            "none",
            "--rank",
            "2",
            "--outliers",
            "0.05",
            "--loops",
            "2",
            "--block-size",
            "64",
            "--rotate",
            "--lowrank",
            "svd",
            "--seed",
            "3",
            "--prefill-rank",
            "6",
            "--key-bits",
            "4",
            "--value-group-size",
            "32",
        ]
    )
    config = config_from_args(args)
    assert config == get_preset(
        "gear",
        bits=2,
        group_size=None,
        rank=2,
        outliers=0.05,
        loops=2,
        block_size=64,
        rotate=True,
        lowrank="svd",
        seed=3,
        prefill_rank=6,
        key_bits=4,
        value_group_size=32,
        name=config.name,
    )
    assert (config.keys.bits, config.values.bits) == (4, 2)
    assert (config.keys.group_size, config.values.group_size) == (None, 32)
    assert config_from_args(parse([])) == get_preset("gear")
    assert config_from_args(parse(["--method", "kivi", "--no-rotate"])).keys.rotate is False
    assert config_from_args(parse(["--key-outlier-axis", "channel"])).keys.outlier_axis == "channel"
    factors = config_from_args(
        parse(["--factor-dtype", "bfloat16", "--key-factor-dtype", "float8_e4m3"])
    )
    assert (factors.keys.factor_dtype, factors.values.factor_dtype) == ("float8_e4m3", "bfloat16")
    assert factors == get_preset(
        "gear", factor_dtype="bfloat16", key_factor_dtype="float8_e4m3", name=factors.name
    )
    with pytest.raises(ConfigError, match="factor_dtype"):
        get_preset("gear", value_factor_dtype="int8")
    fp8 = config_from_args(parse(["--method", "fp8", "--value-fp8-scale", "tensor"]))
    assert (fp8.keys.fp8_scale, fp8.values.fp8_scale) == ("group", "tensor")
    e5m2 = config_from_args(parse(["--method", "quant", "--bits", "none", "--key-fp8", "e5m2"]))
    assert (e5m2.keys.fp8, e5m2.keys.bits, e5m2.values.fp8) == ("e5m2", None, None)
    assert config_from_args(parse(["--method", "kivi", "--block-size", "none"])).block_size is None


def test_cli_bad_values():
    with pytest.raises(ConfigError, match="bits"):
        config_from_args(parse(["--bits", "9"]))
    with pytest.raises(SystemExit):
        parse(["--group-size", "sixty"])
    with pytest.raises(SystemExit):
        parse(["--method", "gaer"])
