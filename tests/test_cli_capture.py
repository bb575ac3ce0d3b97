"""``gear-capture``, ``gear-lab info`` and ``gear-lab models`` end to end (in-process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gear_lab import open_dump
from gear_lab.cli import capture_main, main


def _error_line(capsys) -> str:
    """The error line (the last of stderr; model loading may draw progress bars before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith(("gear-capture: error: ", "gear-lab: error: "))
    return line


def test_prompts_to_dump_and_info(tmp_path, capsys):
    out = tmp_path / "p.h5"
    argv = ["--prompt", "first prompt", "--prompt", "second one", "--layers", "1,3-4"]
    rc = capture_main([*argv, "--with-queries", "--max-tokens", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    with open_dump(out) as dump:
        assert dump.num_samples == 2
        assert dump.layers == [1, 3, 4]
        assert dump.kinds == ("keys", "values", "queries")
        assert [dump.text(i) for i in range(2)] == ["first prompt", "second one"]
        assert dump.seq_len(0) <= 3
    capsys.readouterr()
    assert main(["info", str(out), "--layers"]) == 0
    printed = capsys.readouterr().out
    assert "1,3-4" in printed and "layer   4" in printed and "queries [9, seq, 64]" in printed
    assert main(["info", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["layers"] == [1, 3, 4] and meta["layer_info"]["3"]["attention_type"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.txt", "one\nstill one\n\n\n  two  \n\nthree\n", ["one\nstill one", "two", "three"]),
        ("p.jsonl", '{"text": "alpha"}\n\n{"text": "beta", "id": 2}\n', ["alpha", "beta"]),
    ],
)
def test_prompts_files(tmp_path, name, content, expected):
    prompts = tmp_path / name
    prompts.write_text(content)
    out = tmp_path / "f.h5"
    argv = ["--prompts-file", str(prompts), "--layers", "0", "--out", str(out), "--quiet"]
    assert capture_main(argv) == 0
    with open_dump(out) as dump:
        assert [dump.text(i) for i in range(dump.num_samples)] == expected


def test_corpus_default_output_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--corpus", "pydoc", "--samples", "2", "--max-tokens", "16", "--layers", "29"]
    assert capture_main([*argv, "--pre-rope-keys", "--quiet"]) == 0
    out = tmp_path / "dumps" / "smollm2-135m-pydoc.h5"
    with open_dump(out) as dump:
        assert dump.num_samples == 2
        assert [dump.seq_len(i) for i in range(2)] == [16, 16]
        assert dump.text(0) != dump.text(1)
        assert dump.kinds == ("keys", "values", "keys_pre_rope")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--prompts-file", "missing.txt"], "prompts file missing.txt does not exist"),
        (["--layers", "30"], "out of range"),
        (["--device", "tpu"], "unknown device"),
        (["--max-tokens", "0"], "must be >= 1"),
        (["--out", "blocker/d.h5"], "output folder"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    text = [] if "--prompts-file" in argv else ["--prompt", "hi"]
    rc = capture_main([*text, *argv, "--quiet"])
    assert rc == 2
    assert message in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blocker"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "d.h5"
    base = ["--prompt", "hi", "--layers", "0", "--out", str(out), "--quiet"]
    assert capture_main(base) == 0
    before = out.read_bytes()
    assert capture_main(base) == 2
    assert "--overwrite" in _error_line(capsys)
    assert out.read_bytes() == before
    assert capture_main([*base, "--overwrite"]) == 0


def test_info_bad_dump_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_text("not hdf5")
    assert main(["info", str(bad)]) == 2
    line = _error_line(capsys)
    assert str(bad) in line and "not an HDF5 file" in line


def test_models_lists_registry(smol, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m  (installed, converted)" in out
    assert "30 layers, 9 heads, 3 KV heads, head_dim 64" in out
    assert "gemma3-270m" in out
    assert "MiB (converted safetensors)" in out
    # known before its first conversion: head_dim derived from 1536 / 12
    assert "qwen2.5-coder-1.5b" in out and "28 layers, 12 heads, 2 KV heads, head_dim 128" in out


def test_capture_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        capture_main(["--help"])
    text = capsys.readouterr().out
    flags = "--model --prompt --prompts-file --corpus --max-tokens --samples --device --dtype"
    for flag in [*flags.split(), "--layers", "--with-queries", "--pre-rope-keys", "--out"]:
        assert flag in text
    assert Path("dumps").name in text
