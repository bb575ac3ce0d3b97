"""The studio under ``streamlit.testing.v1.AppTest``: every page runs on the real dump, widgets
change what is computed, the shown numbers equal the library's for the same settings, and errors
a user can cause show as one line (never an exception). Also ``gear-lab app``'s command line."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from gear_lab import metrics
from gear_lab.cli import main
from gear_lab.cli.app import streamlit_command
from gear_lab.compression import compress, get_preset
from gear_lab.dump import open_dump
from gear_lab.errors import DumpError
from gear_lab.studio import DUMP_ENV, STUDIO_SCRIPT, state

TIMEOUT = 300


@pytest.fixture
def app(smol_dump: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh studio session on the session dump, run from an empty folder."""
    monkeypatch.setenv(DUMP_ENV, str(smol_dump))
    monkeypatch.chdir(tmp_path)

    def open_page(page: str) -> AppTest:
        at = AppTest.from_file(str(STUDIO_SCRIPT), default_timeout=TIMEOUT).run()
        if page != "dumps":
            at.switch_page(f"app_pages/{page}.py").run()
        return ok(at)

    return open_page


def ok(at: AppTest) -> AppTest:
    """``at`` after checking that the run raised nothing."""
    assert not at.exception, [e.message for e in at.exception]
    return at


def shown(at: AppTest, label: str) -> list[str]:
    """Values of every metric with this label, in page order."""
    return [m.value for m in at.metric if m.label == label]


def layer(dump: Path, kind: str, layer: int, sample: int = 0) -> torch.Tensor:
    with open_dump(dump) as d:
        return d.load(kind, layer, sample=sample)[None]


def test_dumps_page_shows_the_dump_given_to_gear_lab_app(app, smol_dump: Path) -> None:
    at = app("dumps")
    with open_dump(smol_dump) as d:
        assert shown(at, "samples") == [str(d.num_samples)]
        assert shown(at, "layers") == [str(len(d.layers))]
        assert shown(at, "head_dim") == [str(d.head_dim)]
        assert shown(at, "model") == [d.model_id]


def test_dumps_page_captures_a_dump_and_switches_to_it(app, tmp_path: Path) -> None:
    at = app("dumps")
    at.text_input(key="capture-name").set_value("tiny.h5")
    at.number_input(key="capture-samples").set_value(1)
    at.number_input(key="capture-max-tokens").set_value(16)
    at.button(key="capture-submit").click()
    ok(at.run())
    out = tmp_path / "dumps" / "tiny.h5"
    with open_dump(out) as d:
        assert (d.num_samples, d.seq_len(0)) == (1, 16)
    assert shown(at, "samples") == ["1"]
    # the same name again, without overwrite: one line, the dump untouched
    at.button(key="capture-submit").click()
    ok(at.run())
    assert len(at.error) == 1 and "exists" in at.error[0].value
    # in the form's words (the checkbox), not the CLI's --overwrite; no status left "capturing"
    assert "**overwrite**" in at.error[0].value and "--overwrite" not in at.error[0].value
    assert not [s for s in at.get("expandable") if "capturing" in str(s.label)]


def test_pages_without_a_dump_say_how_to_get_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(DUMP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    at = ok(AppTest.from_file(str(STUDIO_SCRIPT), default_timeout=TIMEOUT).run())
    assert any("No dump found" in i.value for i in at.info)
    ok(at.switch_page("app_pages/explorer.py").run())
    assert any("No dump yet" in i.value for i in at.info)
    assert not at.metric


def test_explorer_defaults_to_2bit_gear_on_layer_10_keys_and_matches_the_library(
    app, smol_dump: Path
) -> None:
    at = app("explorer")
    x = layer(smol_dump, "keys", 10)
    for i, config in enumerate([get_preset("gear", bits=2), get_preset("quant", bits=2)]):
        c = compress(x, config, kind="keys")
        ref = metrics.reconstruction(x, c.decompress())
        assert shown(at, "relative error")[i] == state.fmt(ref["rel_fro"])
        assert shown(at, "bits per entry")[i] == state.fmt(c.bits_per_entry)
        assert shown(at, "SNR (dB)")[i] == state.fmt(ref["snr_db"])
    assert len(at.get("plotly_chart")) == 3

    # widgets change what is computed: values of layer 5, head 2, configuration A at 4 bits
    at.selectbox(key="explorer-layer").set_value(5)
    at.selectbox(key="explorer-head").set_value(2)
    at.radio(key="explorer-kind").set_value("values")
    at.select_slider(key="explorer-A-gear-bits").set_value(4)
    ok(at.run())
    x = layer(smol_dump, "values", 5)
    c = compress(x, get_preset("gear", bits=4), kind="values")
    x_hat = c.decompress()
    assert shown(at, "relative error")[0] == state.fmt(metrics.reconstruction(x, x_hat)["rel_fro"])
    assert shown(at, "bits per entry")[0] == state.fmt(c.bits_per_entry)
    head = metrics.reconstruction(x[:, 2:3], x_hat[:, 2:3])["rel_fro"]
    assert shown(at, "head 2 rel. error")[0] == state.fmt(head)
    q, k = layer(smol_dump, "queries", 5), layer(smol_dump, "keys", 5)
    group = q.shape[1] // k.shape[1]
    with open_dump(smol_dump) as d:
        scaling = d.layer_info(5)["scaling"]
    kv = (k[:, 2:3], x[:, 2:3])
    attn = metrics.attention_error(
        q[:, 2 * group : 3 * group], *kv, kv[0], x_hat[:, 2:3], scaling=scaling
    )
    assert shown(at, "attention KL")[0] == state.fmt(attn["kl"])


def test_explorer_bad_settings_show_one_line_not_a_traceback(app) -> None:
    at = app("explorer")
    at.select_slider(key="explorer-A-gear-block_size").set_value(16)
    at.slider(key="explorer-A-gear-rank").set_value(32)  # above min(16, head_dim)
    ok(at.run())
    assert len(at.error) == 1 and "ConfigError" in at.error[0].value
    assert "\n" not in at.error[0].value.strip()


def test_spectra_reports_the_rank_for_an_energy_share(app, smol_dump: Path) -> None:
    at = app("spectra")
    x = layer(smol_dump, "keys", 10)
    residual = metrics.quantization_residual(x, get_preset("gear", bits=2), kind="keys")
    sv = metrics.singular_values(residual)[0, 0]
    assert shown(at, "rank for 90% of residual energy") == [str(metrics.rank_for_energy(sv, 0.9))]
    at.slider(key="spectra-share").set_value(0.5)
    ok(at.run())
    assert shown(at, "rank for 50% of residual energy") == [str(metrics.rank_for_energy(sv, 0.5))]
    assert len(at.get("plotly_chart")) == 3


def test_outliers_name_the_largest_channels(app, smol_dump: Path) -> None:
    at = app("outliers")
    x = layer(smol_dump, "keys", 10)
    max_abs = metrics.outlier_stats(x, by="channel")["max_abs"][0].numpy().ravel()  # [kv_heads * d]
    top = at.dataframe[0].value
    d = x.shape[-1]
    best = int(np.argmax(max_abs))
    assert top["channel"].iloc[0] == f"head {best // d} ch {best % d}"
    assert top["max |x|"].iloc[0] == pytest.approx(max_abs[best])
    assert len(at.get("plotly_chart")) == 4  # histogram, keys map, values map, kept outliers
    at.radio(key="outliers-stat").set_value("kurtosis")
    ok(at.run())


def test_sweeps_table_matches_the_library(app, smol_dump: Path) -> None:
    from gear_lab.sweeps import sweep

    at = app("sweeps")
    at.multiselect(key="sweeps-values-rank").set_value([0, 4])
    at.multiselect(key="sweeps-kinds").set_value(["keys"])
    at.button(key="sweeps-run").click()
    ok(at.run())
    table = at.dataframe[0].value
    configs = [get_preset("gear", bits=2, rank=r) for r in (0, 4)]
    ref = sweep(smol_dump, configs, layers=[10], kinds=["keys"], per_head=False, progress=False)
    assert table["rank"].tolist() == [0, 4]
    np.testing.assert_allclose(table["rel_fro"], ref["rel_fro"], rtol=1e-12)
    np.testing.assert_allclose(table["bits_per_entry"], ref["bits_per_entry"], rtol=1e-12)
    assert len(at.get("plotly_chart")) == 2

    at.radio(key="sweeps-study").set_value("pareto")
    ok(at.run())
    at.multiselect(key="sweeps-values-pareto").set_value(["gear", "quant", "fp8"])
    at.multiselect(key="sweeps-pareto-bits").set_value([2, 4])
    at.button(key="sweeps-run").click()
    ok(at.run())
    assert set(at.dataframe[0].value["config"]) == {
        "gear (bits=2)",
        "gear",
        "quant (bits=2)",
        "quant",
        "fp8",
    }


def test_live_generation_matches_check_generation(app, smol) -> None:
    from gear_lab import check_generation

    prompt = topics["if"][:400]  # about 100 tokens: more than one 64-token block gets compressed
    at = app("live")
    at.text_area(key="live-prompt").set_value(prompt)
    at.slider(key="live-max-new-tokens").set_value(8)
    at.button(key="live-run").click()
    ok(at.run())
    ref = check_generation(*smol, prompt, get_preset("gear", bits=2), max_new_tokens=8)
    assert shown(at, "same tokens") == [f"{ref.token_agreement:.0%}"]
    # the app loads its model with device="auto": on a CUDA machine KL agrees to rounding only
    assert float(shown(at, "mean KL per step")[0]) == pytest.approx(ref.mean_kl, rel=1e-3, abs=1e-6)
    expected = "none" if ref.first_divergence is None else f"token {ref.first_divergence}"
    assert shown(at, "first divergence") == [expected]
    assert len(at.get("plotly_chart")) == 2  # per-step agreement and the KL distribution
    stats = ref.kl_statistics()
    assert float(shown(at, "KL p99")[0]) == pytest.approx(stats["kl_p99"], rel=1e-3, abs=1e-6)
    assert shown(at, "scored steps") == [str(len(ref.kl))]
    from gear_lab.units import format_bytes

    # one byte format: "10.2 MiB", never "10440.0 KiB"
    assert shown(at, "compressed cache") == [format_bytes(ref.compressed_cache_bytes)]


def test_live_peak_memory_is_the_serving_probe_of_both_caches(app, monkeypatch) -> None:
    """The button runs gear_lab.serving.probe for DynamicCache and the chosen config (its JSON)
    at the page's small shape, in fresh processes, and shows what they measured."""
    from gear_lab import serving
    from gear_lab.compression import CompressionConfig

    calls, results = [], []
    real = serving.probe

    def spy(spec, batch, workload, **kwargs):
        calls.append((spec, batch, workload))
        results.append(real(spec, batch, workload, **kwargs))
        return results[-1]

    monkeypatch.setattr(serving, "probe", spy)
    at = app("live")
    assert not at.get("plotly_chart") and not calls
    at.button(key="live-memory-run").click()
    ok(at.run())
    assert [spec for spec, _, _ in calls][:1] == ["dynamic"] and len(calls) == 2
    assert CompressionConfig.from_json(calls[1][0]) == get_preset("gear", bits=2)
    assert calls[0][1:] == calls[1][1:] and calls[0][1] == 2
    assert (calls[0][2].prompt_tokens, calls[0][2].new_tokens) == (256, 8)
    full, comp = results
    assert shown(at, "full precision peak") == [f"{full.peak_mib:.1f} MiB"]
    assert shown(at, "compressed peak") == [f"{comp.peak_mib:.1f} MiB"]
    assert shown(at, "peak lower by") == [f"{full.peak_mib / comp.peak_mib:.2f}x"]
    assert full.peak_mib > comp.peak_mib  # the full-precision K/V of 2 x 264 tokens: 24 MiB
    (chart,) = at.get("plotly_chart")
    peak, held = json.loads(chart.proto.spec)["data"]
    assert peak["y"] == [full.peak_mib, comp.peak_mib]
    assert held["y"] == [full.held_mib, comp.held_mib]


def test_live_generation_runs_pre_rope_keys(app, smol) -> None:
    from gear_lab import check_generation

    prompt = topics["if"][:400]
    at = app("live")
    at.text_area(key="live-prompt").set_value(prompt)
    at.slider(key="live-max-new-tokens").set_value(4)
    at.checkbox(key="live-pre-rope").check()
    at.button(key="live-run").click()
    ok(at.run())
    ref = check_generation(*smol, prompt, get_preset("gear", bits=2), 4, pre_rope=True)
    assert ref.method.endswith("+ pre-RoPE keys")
    assert shown(at, "same tokens") == [f"{ref.token_agreement:.0%}"]
    assert float(shown(at, "mean KL per step")[0]) == pytest.approx(ref.mean_kl, rel=1e-3, abs=1e-6)


def test_live_generation_refuses_a_prompt_past_the_context_length(app) -> None:
    at = app("live")
    at.text_area(key="live-prompt").set_value("word " * 9000)  # ~9000 tokens, SmolLM2 holds 8192
    at.button(key="live-run").click()
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "past the context length" in at.error[0].value
    assert not shown(at, "same tokens")


def test_uploads_are_validated_as_hdf5_dumps(smol_dump: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(state, "_upload_dir", None)
    with pytest.raises(DumpError):
        state.save_upload("evil.h5", b"\x80\x04not a dump", limit_mb=1)
    with pytest.raises(DumpError, match="upload limit"):
        state.save_upload("big.h5", b"\0" * (2**20 + 1), limit_mb=1)
    assert list(state.upload_dir().iterdir()) == []  # nothing invalid is left behind
    path = state.save_upload("ok.h5", smol_dump.read_bytes(), limit_mb=1024)
    with open_dump(path) as d:
        assert d.num_samples == 2


def test_gear_lab_app_command_line(tmp_path: Path, capsys) -> None:
    assert main(["app", str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gear-lab: error:") and "\n" not in err
    cmd = streamlit_command(STUDIO_SCRIPT, host="127.0.0.1", port=8765, max_upload_mb=50)
    assert cmd[:5] == [sys.executable, "-m", "streamlit", "run", str(STUDIO_SCRIPT)]
    assert {"--server.address=127.0.0.1", "--server.headless=true", "--server.port=8765"} <= set(
        cmd
    )
