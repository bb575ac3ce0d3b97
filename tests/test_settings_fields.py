"""Every config field a user sets has a row in the settings table, a CLI flag and a studio widget."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from streamlit.testing.v1 import AppTest

from gear_lab.cli._method_args import add_method_args, config_from_args
from gear_lab.compression import CompressionConfig, TensorCompression, get_preset
from gear_lab.compression.config import CONFIG_SETTINGS, TENSOR_SETTINGS
from gear_lab.studio import DUMP_ENV, STUDIO_SCRIPT

TENSOR_FIELDS = [f.name for f in dataclasses.fields(TensorCompression)]
# keys / values hold the per-tensor settings, preset is chosen by name, name is a label
CONFIG_FIELDS = [
    f.name
    for f in dataclasses.fields(CompressionConfig)
    if f.name not in ("keys", "values", "preset", "name")
]
WIDGETS = ("checkbox", "selectbox", "select_slider", "slider", "number_input")


def test_the_settings_table_covers_every_field():
    assert sorted(s.name for s in TENSOR_SETTINGS) == sorted(TENSOR_FIELDS)
    assert sorted(s.name for s in CONFIG_SETTINGS) == sorted(CONFIG_FIELDS)


def test_every_field_has_cli_flags():
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    dests = {action.dest for action in parser._actions}
    for field in TENSOR_FIELDS:
        assert {field, f"key_{field}", f"value_{field}"} <= dests, field
    assert set(CONFIG_FIELDS) <= dests
    args = parser.parse_args(["--factor-dtype", "bfloat16", "--prefill-rank", "2"])
    assert config_from_args(args) == get_preset("gear", factor_dtype="bfloat16", prefill_rank=2)


def test_every_field_has_a_studio_widget(smol_dump: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(DUMP_ENV, str(smol_dump))
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(STUDIO_SCRIPT), default_timeout=300).run()
    at.switch_page("app_pages/explorer.py").run()
    assert not at.exception
    keys = {w.key for kind in WIDGETS for w in at.get(kind)}
    prefix = "explorer-A-gear-"
    for field in TENSOR_FIELDS:  # one widget, or one per tensor where the preset splits them
        split = {f"{prefix}key_{field}", f"{prefix}value_{field}"}
        assert prefix + field in keys or split <= keys, field
    assert {prefix + f for f in CONFIG_FIELDS} <= keys
    assert {prefix + "key_axis", prefix + "value_axis"} <= keys  # channel / token in every preset
    # the widgets reach the config: a factor dtype the studio never offered before
    at.selectbox(key=prefix + "factor_dtype").set_value("float8_e4m3")
    at.run()
    assert not at.exception
    expected = get_preset("gear", bits=2, factor_dtype="float8_e4m3").name
    assert any(expected in c.value for c in at.caption)
