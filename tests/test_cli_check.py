"""``gear-lab check`` and ``gear-lab ppl``: output against the library, bad input exits 2."""

from __future__ import annotations

import json

import pytest

import gear_lab.models
from gear_lab.cli import main
from gear_lab.compression import get_preset
from gear_lab.fidelity import check_generation


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def loaded(smol, monkeypatch):
    """Make the CLI reuse the session's model instead of loading it again."""
    monkeypatch.setattr(gear_lab.models, "load_model", lambda *args, **kwargs: smol)
    return smol


def test_check_json_and_table_match_the_library(loaded, capsys):
    model, tokenizer = loaded
    argv = ["check", "--prompt", "The capital of France is", "--max-new-tokens", "3"]
    argv += ["--method", "kivi", "--bits", "2", "--block-size", "4"]
    code, out, _ = _run(capsys, *argv, "--json")
    assert code == 0
    got = json.loads(out)
    want = check_generation(
        model, tokenizer, "The capital of France is", get_preset("kivi", block_size=4, bits=2), 3
    )
    for key in ("method", "full_ids", "compressed_ids", "first_divergence", "kl", "top1"):
        assert got[key] == want.to_dict()[key]
    assert got["compressed_cache_bytes"] == want.compressed_cache_bytes

    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert "--- full precision ---" in out and "--- compressed ---" in out
    assert want.full_text.strip() in out and "teacher-forced mean KL" in out
    assert "nothing was compressed" not in out

    code, out, _ = _run(capsys, "check", "--prompt", "Hi", "--max-new-tokens", "2")
    assert code == 0 and "note: nothing was compressed" in out  # 64-token blocks by default


def test_ppl_json(loaded, capsys):
    argv = ["ppl", "--method", "none", "--windows", "1", "--prefill", "8", "--continuation", "4"]
    code, out, _ = _run(capsys, *argv, "--json")
    assert code == 0
    got = json.loads(out)
    assert got["method"] == "none" and got["windows"] == 1 and got["kl"] < 1e-9


@pytest.mark.parametrize(
    "argv",
    [
        ["check", "--prompt", "x", "--bits", "99"],
        ["check", "--prompt", "x", "--max-new-tokens", "0"],
        ["check", "--prompt", "x", "--baseline", "nope:4"],
        ["check", "--prompt", "x", "--baseline", "quanto:four"],
        ["ppl", "--windows", "0"],
        ["ppl", "--method", "gear", "--outliers", "1.5"],
    ],
)
def test_bad_input_exits_2_with_one_line(argv, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("bad input must be refused before the model loads")

    monkeypatch.setattr(gear_lab.models, "load_model", never)
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gear-lab: error: ")
