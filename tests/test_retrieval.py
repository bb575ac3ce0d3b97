"""Long-context retrieval: task prompts, scoring, the grid runner on SmolLM2, one-shot prompt
compression in GearCache, ``gear-lab needle`` and the studio's Long context page."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

import gear_lab.models
from gear_lab.cache import GearCache, cache_kwarg
from gear_lab.cli import main
from gear_lab.compression import compress, get_preset
from gear_lab.errors import ConfigError
from gear_lab.retrieval import (
    COLUMNS,
    LENGTH_TOLERANCE,
    TASKS,
    RetrievalGrid,
    build_prompt,
    encode,
    parse_length,
    read_results,
    run_retrieval,
    score_answer,
)
from gear_lab.studio import DUMP_ENV, STUDIO_SCRIPT


def _tokens(tokenizer, text: str) -> int:
    return len(encode(tokenizer, text, False))


@pytest.mark.parametrize("task", TASKS)
def test_the_key_appears_once_at_the_requested_depth(smol, task):
    _, tokenizer = smol
    for depth in (0.0, 0.1, 0.5, 0.9, 1.0):
        prompt = build_prompt(task, tokenizer, 1024, depth, seed=3)
        text = prompt.text
        assert text.count(prompt.needle) == 1
        assert prompt.expected in prompt.needle
        # the key occurs only inside its sentence (the pass key sentence names it twice)
        assert text.count(prompt.expected) == prompt.needle.count(prompt.expected)
        assert abs(prompt.needle_depth - depth) <= 0.02
        if task in ("passkey", "needle"):  # one needle: measure its depth in the haystack
            start = _tokens(tokenizer, text[: text.index("\n") + 1])
            end = _tokens(tokenizer, text[: text.rindex("\n")])
            at = _tokens(tokenizer, text[: text.index(prompt.needle)])
            needle = _tokens(tokenizer, prompt.needle)
            assert abs((at - start) / (end - start - needle) - depth) <= 0.02


@pytest.mark.parametrize("task", TASKS)
def test_lengths_land_within_2_percent_of_the_target(smol, task):
    _, tokenizer = smol
    for length, chat in ((512, False), (1000, True), (2048, False), (4096, False)):
        prompt = build_prompt(task, tokenizer, length, 0.5, seed=1, chat_template=chat)
        measured = len(encode(tokenizer, prompt.text, chat))
        assert measured == prompt.tokens
        assert abs(measured - length) <= LENGTH_TOLERANCE * length
        assert prompt.text.startswith("<|im_start|>") == chat


def test_seeds_reproduce_and_differ(smol):
    _, tokenizer = smol
    for task in TASKS:
        a = build_prompt(task, tokenizer, 512, 0.5, seed=7)
        assert build_prompt(task, tokenizer, 512, 0.5, seed=7) == a
        assert build_prompt(task, tokenizer, 512, 0.5, seed=8).expected != a.expected
    multi = build_prompt("multikey", tokenizer, 512, 0.5, seed=7)
    assert len(set(multi.distractors) | {multi.expected}) == 4


def test_the_scorer_counts_a_distractor_as_wrong():
    assert score_answer(" 51573. Remember it.", "51573", ("11111",)) == "correct"
    assert score_answer(" 11111. Remember it. 51573", "51573", ("11111",)) == "distractor"
    assert score_answer(" 515730", "51573") == "wrong"
    assert score_answer(" the pass key", "51573") == "no number"


def test_bad_grids_and_lengths_fail_in_one_line(smol):
    _, tokenizer = smol
    assert parse_length("4k") == 4096 and parse_length("1500") == 1500
    for bad in (
        lambda: parse_length("4kb"),
        lambda: RetrievalGrid(tasks=("haystack",)),
        lambda: RetrievalGrid(depths=(1.5,)),
        lambda: RetrievalGrid(prompt_compression=("streaming",)),
        lambda: build_prompt("passkey", tokenizer, 40),
        lambda: run_retrieval(*smol, ["dynamic"], RetrievalGrid(lengths=(8192,))),
    ):
        with pytest.raises(ConfigError) as err:
            bad()
        assert "\n" not in str(err.value)


def _blocks(layer) -> list[tuple[int, int]]:
    """``(start, size)`` of every compressed block of a GearCache layer."""
    return sorted((s, c.size) for c in layer.chunks.values() for s in c.starts.tolist())


def test_oneshot_prompt_compression_is_one_block_then_streaming():
    torch.manual_seed(0)
    config = get_preset("kivi", bits=2)  # n_b = 64
    prompt_k, prompt_v = torch.randn(2, 1, 3, 100, 64).unbind(0)
    caches = {m: GearCache(config, prompt_compression=m) for m in ("blockwise", "oneshot")}
    for cache in caches.values():
        cache.update(prompt_k, prompt_v, 0)
    block, whole = caches["blockwise"].layers[0], caches["oneshot"].layers[0]
    assert _blocks(block) == [(0, 64)] and block.keys.shape[-2] == 36  # 36 tokens in the buffer
    assert _blocks(whole) == [(0, 100)] and whole.keys.shape[-2] == 0
    (chunk,) = whole.chunks.values()
    expected = compress(prompt_k, config.for_kind("keys", prefill=True), "keys").decompress()
    assert torch.equal(chunk.keys.decompress(), expected)
    assert caches["oneshot"].nbytes() < caches["blockwise"].nbytes()
    for _ in range(64):  # decoding fills one n_b block after the prompt, compressed once
        caches["oneshot"].update(*torch.randn(2, 1, 3, 1, 64).unbind(0), 0)
    assert _blocks(whole) == [(0, 100), (100, 64)]
    with pytest.raises(ConfigError):
        GearCache(config, prompt_compression="streaming")


def test_a_512_token_passkey_is_found_at_full_precision_and_8_bit_gear(smol):
    model, tokenizer = smol
    grid = RetrievalGrid(
        tasks=("passkey",),
        lengths=(512,),
        depths=(0.5,),
        seeds=(0,),
        prompt_compression=("blockwise", "oneshot"),
    )
    gear8 = get_preset("gear", bits=8)
    df = run_retrieval(model, tokenizer, ["dynamic", gear8], grid)
    assert list(df.columns) == list(COLUMNS)
    assert list(zip(df["cache"], df["prompt_compression"], strict=True)) == [
        ("dynamic", "none"),
        (gear8.name, "blockwise"),
        (gear8.name, "oneshot"),
    ]
    assert df["correct"].all(), df[["cache", "answer"]]
    assert df["tokens"].between(502, 522).all()
    bits = df.set_index("prompt_compression")["bits_per_entry"]
    assert bits["none"] == 32.0 and bits["oneshot"] < bits["blockwise"] < 32.0
    # the runner's shared prefill gives the answer model.generate gives through the same cache
    prompt = build_prompt("passkey", tokenizer, 512, 0.5, 0)
    ids = torch.tensor([encode(tokenizer, prompt.text, False)])
    cache = GearCache(gear8, model_config=model.config)
    out = model.generate(ids, max_new_tokens=8, do_sample=False, **{cache_kwarg(model): cache})
    generated = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert generated == df.loc[1, "answer"]


@pytest.fixture
def loaded(smol, monkeypatch):
    """Make the CLI reuse the session's model instead of loading it again."""
    monkeypatch.setattr(gear_lab.models, "load_model", lambda *args, **kwargs: smol)
    return smol


def test_needle_command_writes_rows_and_refuses_lengths_beyond_the_context(
    loaded, tmp_path, capsys
):
    out = tmp_path / "results.csv"
    argv = ["needle", "--lengths", "512", "--depths", "0.5", "--method", "kivi"]
    assert main([*argv, "--no-full-precision", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "kivi" in printed and f"wrote 1 rows to {out}" in printed
    df = read_results(out)
    assert len(df) == 1 and df.loc[0, "task"] == "passkey"

    assert main([*argv, "--out", str(out)]) == 2  # no overwrite without --overwrite
    assert "exists" in capsys.readouterr().err

    assert main(["needle", "--lengths", "1k,16k"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gear-lab: error: length 16384 tokens") and "context of 8192" in err
    assert err.count("\n") == 1


def test_long_context_page_runs_a_grid_and_reads_a_results_file(smol, tmp_path: Path, monkeypatch):
    monkeypatch.delenv(DUMP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(STUDIO_SCRIPT), default_timeout=300).run()
    at.switch_page("app_pages/long_context.py").run()
    assert not at.exception
    at.selectbox(key="long-preset").set_value("kivi")
    at.button(key="long-run").click()
    at.run()
    assert not at.exception, [e.message for e in at.exception]
    assert len(at.get("plotly_chart")) == 1
    values = {m.label: m.value for m in at.metric}
    assert values["accuracy: dynamic"] == "100%"
    if values["accuracy: kivi"] == "100%":  # no miss: no misses table, a success line instead
        assert "Every answer was exact." in [s.value for s in at.success]
        assert len(at.dataframe) == 1

    # a results file with a miss: the page lists it with what the model answered
    df = run_retrieval(*smol, ["dynamic"], RetrievalGrid(lengths=(512,), depths=(0.5,)))
    df.loc[0, ["answer", "correct", "outcome"]] = ["11111.", False, "wrong"]
    results = tmp_path / "results.csv"
    df.to_csv(results, index=False)
    at.radio(key="long-source").set_value("open a results file").run()
    at.text_input(key="long-path").set_value(str(results)).run()
    assert not at.exception, [e.message for e in at.exception]
    assert {m.label: m.value for m in at.metric} == {"accuracy: dynamic": "0%"}
    misses = at.dataframe[-1].value
    assert misses["answer"].tolist() == ["11111."]
    at.text_input(key="long-path").set_value(str(tmp_path / "missing.csv")).run()
    assert not at.exception and "cannot read" in at.error[0].value


def test_heatmaps_put_full_precision_first_and_show_hits_per_cell():
    from gear_lab.plots import fig_retrieval_heatmaps

    rows = [
        {"task": "multikey", "length": n, "depth": d, "seed": s, "cache": c,
         "prompt_compression": m, "correct": ok, "bits_per_entry": b}
        for n in (1024, 4096)
        for d in (0.1, 0.9)
        for s in (0, 1)
        for c, m, b, ok in (("kivi", "blockwise", 3.0, s == 0), ("dynamic", "none", 32.0, True))
    ]  # fmt: skip
    fig = fig_retrieval_heatmaps(pd.DataFrame(rows), task="multikey")
    assert [t.x for t in fig.data] == [("1k", "4k"), ("1k", "4k")]
    full, kivi = fig.data
    assert full.z.tolist() == [[1.0, 1.0], [1.0, 1.0]] and kivi.text[0][0] == "1/2"
    assert "dynamic" in fig.layout.annotations[0].text
