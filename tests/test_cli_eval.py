"""``gear-lab eval`` and ``gear-lab sweep`` on the real SmolLM2 dump: output, files, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gear_lab import metrics, open_dump
from gear_lab.cli import main
from gear_lab.compression import compress, get_preset


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_table_and_json_match_the_library(smol_dump, capsys):
    flags = ["--method", "gear", "--bits", "2", "--group-size", "64", "--rank", "4"]
    flags += ["--outliers", "0.02", "--layers", "0,2-3"]
    code, out, _ = _run(capsys, "eval", smol_dump, *flags)
    assert code == 0
    lines = out.splitlines()
    name = lines[0].split(":")[0]
    assert name == "gear (bits=2)"  # the label names what differs from the preset
    assert lines[1].split()[:3] == ["layer", "kind", "bits_per_entry"]
    assert [line.split()[:2] for line in lines[2:]] == [
        [str(layer), kind] for layer in (0, 2, 3) for kind in ("keys", "values")
    ]

    code, out, _ = _run(capsys, "eval", smol_dump, *flags, "--json")
    assert code == 0
    records = json.loads(out)
    assert [(r["layer"], r["kind"]) for r in records] == [
        (layer, kind) for layer in (0, 2, 3) for kind in ("keys", "values")
    ]
    config = get_preset("gear", bits=2, group_size=64, rank=4, outliers=0.02)
    with open_dump(smol_dump) as dump:
        x = dump.load("values", 2)[None]  # every KV head at once
        packed = compress(x, config, kind="values")
        expected = metrics.reconstruction(x, packed.decompress())
    rec = records[3]
    assert rec["bits_per_entry"] == pytest.approx(8 * packed.nbytes / x.numel(), rel=1e-12)
    assert rec["rel_fro"] == pytest.approx(expected["rel_fro"], rel=1e-9)
    assert rec["head"] == -1 and rec["kl"] == 0.0 and rec["output_rel"] > 0


def test_eval_separate_key_and_value_settings(smol_dump, capsys):
    argv = ["eval", smol_dump, "--method", "quant", "--key-bits", "4", "--value-bits", "2"]
    code, out, _ = _run(capsys, *argv, "--layers", "1", "--json", "--dtype", "float16")
    assert code == 0
    by_kind = {r["kind"]: r for r in json.loads(out)}
    assert by_kind["keys"]["bits"] == 4 and by_kind["values"]["bits"] == 2
    assert by_kind["keys"]["bits_per_entry"] == 4 + 32 / 64  # fp16 scale and zero per group
    assert by_kind["values"]["bits_per_entry"] == 2 + 32 / 64


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_sweep_writes_a_table_and_refuses_to_overwrite(smol_dump, capsys, tmp_path, suffix):
    out = tmp_path / f"grid{suffix}"
    argv = ["sweep", smol_dump, "--grid", "bits=2,4;rank=0,2", "--layers", "1", "--out", out]
    code, stdout, _ = _run(capsys, *argv, "--heads", "0,2")
    assert code == 0 and "wrote 16 rows (4 configs)" in stdout
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(df) == 2 * 2 * 4  # heads x kinds x configs
    assert sorted(df["head"].unique()) == [0, 2]
    assert sorted(df["config"].unique()) == [
        "gear (bits=2, rank=0)",
        "gear (bits=2, rank=2)",
        "gear (rank=0)",
        "gear (rank=2)",
    ]
    assert df["output_rel"].notna().all()
    before = out.read_bytes()

    code, _, err = _run(capsys, *argv)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left

    code, stdout, _ = _run(capsys, *argv, "--overwrite", "--method", "kivi", "--no-attention")
    assert code == 0 and "wrote 24 rows (4 configs)" in stdout
    df = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert (df["preset"] == "kivi").all() and df["output_rel"].isna().all()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "{missing}"], "no such dump"),
        (["eval", "{dump}", "--layers", "3-1"], "bad layer spec"),
        (["eval", "{dump}", "--layers", "0,x"], "bad layer spec"),
        (["eval", "{dump}", "--bits", "9"], "bits"),
        (["eval", "{dump}", "--kinds", "queries"], "kind must be"),
        (["sweep", "{dump}", "--grid", "bits=2;rank", "--out", "{out}"], "bad grid entry"),
        (["sweep", "{dump}", "--grid", "bitz=2", "--out", "{out}"], "unknown preset override"),
        (["sweep", "{dump}", "--grid", "bits=2", "--out", "{existing}"], "--overwrite"),
        (["sweep", "{dump}", "--grid", "bits=2", "--out", "{tmp}/t.xlsx"], ".csv or .parquet"),
        (["sweep", "{dump}", "--grid", "bits=2", "--out", "{tmp}/no/t.csv"], "does not exist"),
        (["sweep", "{missing}", "--grid", "bits=2", "--out", "{out}"], "no such dump"),
        (
            ["sweep", "{dump}", "--grid", "method=gear", "--method", "kivi", "--out", "{out}"],
            "either",
        ),
        (["sweep", "{dump}", "--grid", "bits=2", "--samples", "a", "--out", "{out}"], "bad sample"),
    ],
)
def test_bad_input_exits_2_with_one_line(smol_dump, capsys, tmp_path, argv, message):
    existing = tmp_path / "existing.csv"
    existing.write_text("keep\n")
    names = {
        "dump": smol_dump,
        "missing": tmp_path / "missing.h5",
        "out": tmp_path / "out.csv",
        "existing": existing,
        "tmp": tmp_path,
    }
    code, out, err = _run(capsys, *(a.format(**names) for a in argv))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert existing.read_text() == "keep\n" and not (tmp_path / "out.csv").exists()
