"""Long context: does a compressed cache still find what the model read thousands of tokens ago?

Shows a :func:`gear_lab.retrieval.run_retrieval` table (a file written by ``gear-lab needle``,
uploaded or by path, or a small grid run here): accuracy heatmaps of depth x length for every
cache setting beside full precision, the accuracy per length, and every miss with what the model
answered.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from gear_lab import plots
from gear_lab.cache import DEFAULT_BLOCK_SIZE
from gear_lab.errors import GearLabError
from gear_lab.retrieval import (
    PROMPT_COMPRESSIONS,
    TASKS,
    RetrievalGrid,
    read_results,
    run_retrieval,
    setting_labels,
    summarize,
)
from gear_lab.studio import state

RESULT_KEY = "long-results"
LENGTHS = [512, 1024, 2048, 4096]
DEPTHS = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]

st.title("Long context")
st.caption(
    "Synthetic retrieval at long context: a pass key, a magic number in pydoc text, a pass key "
    "among distractor keys, or a chain of variable assignments, at a depth of the prompt. The "
    "model answers greedily through each cache; a cell is the share of exact answers over the "
    "seeds. Run many trials with `gear-lab needle --out results.csv` and open the file here."
)

source = st.radio(
    "results", ["run a small grid", "open a results file"], horizontal=True, key="long-source"
)
if source == "open a results file":
    c1, c2 = st.columns(2)
    upload = c1.file_uploader("upload (.csv or .parquet)", type=["csv", "parquet"], key="long-up")
    path = c2.text_input("or a path", key="long-path", placeholder="results.csv")
    if upload is not None or path:
        try:
            st.session_state[RESULT_KEY] = read_results(upload if upload is not None else path)
        except GearLabError as err:
            state.show_error(err)
else:
    left, right = st.columns([3, 2])
    with left:
        model_name = state.model_picker("long-model")
        tasks = st.multiselect("tasks", TASKS, default=["passkey"], key="long-tasks")
        lengths = st.multiselect("lengths (tokens)", LENGTHS, default=[512], key="long-lengths")
        depths = st.multiselect("depths", DEPTHS, default=[0.5], key="long-depths")
        seeds = st.number_input("seeds", 1, 10, 1, key="long-seeds")
        mode = st.radio("prompt compression", PROMPT_COMPRESSIONS, horizontal=True, key="long-mode")
    with right, st.expander("method", expanded=True):
        config = state.method_settings(
            "long", initial={"bits": 4}, no_block=f"cache default ({DEFAULT_BLOCK_SIZE})"
        )
    go = st.button("Run", type="primary", disabled=config is None, key="long-run")
    if go and config is not None:
        try:
            grid = RetrievalGrid(
                tasks=tuple(tasks),
                lengths=tuple(sorted(lengths)),
                depths=tuple(sorted(depths)),
                seeds=tuple(range(int(seeds))),
                prompt_compression=(mode,),
            )
            model, tokenizer = state.model(model_name)
            bar = st.progress(0.0, text="running ...")
            df = run_retrieval(
                model,
                tokenizer,
                ["dynamic", config],
                grid,
                model_name=model_name,
                progress=False,
                on_trial=lambda done, total: bar.progress(
                    done / total, text=f"{done}/{total} runs"
                ),
            )
        except GearLabError as err:
            state.show_error(err)
        else:
            st.session_state[RESULT_KEY] = df

df: pd.DataFrame | None = st.session_state.get(RESULT_KEY)
if df is None or df.empty:
    st.info("Run a grid, or open a results file of `gear-lab needle`.")
    st.stop()

shown_tasks = list(dict.fromkeys(df["task"]))
task = st.selectbox("task", shown_tasks, key="long-task")
rows = df[df["task"] == task]
table = summarize(rows)
overall = rows.assign(setting=setting_labels(rows)).groupby("setting", sort=False)["correct"]
cols = st.columns(min(len(overall), 6))
for col, (setting, hits) in zip(cols, overall, strict=False):
    col.metric(f"accuracy: {setting}", f"{hits.mean():.0%}", help=f"{hits.sum()}/{hits.size}")
st.plotly_chart(plots.fig_retrieval_heatmaps(rows, task=task), key="long-heatmaps")
st.dataframe(
    table.drop(columns=["model", "task"]),
    hide_index=True,
    column_config={"accuracy": st.column_config.NumberColumn(format="percent")},
)

st.subheader("Misses")
misses = rows.assign(setting=setting_labels(rows))[~rows["correct"]]
if misses.empty:
    st.success("Every answer was exact.")
else:
    st.dataframe(
        misses[["setting", "length", "depth", "seed", "expected", "answer", "outcome"]],
        hide_index=True,
        key="long-misses",
    )
st.download_button(
    "Download all rows (CSV)",
    df.to_csv(index=False),
    file_name="retrieval.csv",
    key="long-download",
)
