"""Sweeps: error vs rank, vs outlier fraction and vs bits, and the Pareto front across presets.

Every row is measured by :func:`gear_lab.sweep` on whole layers (``per_head=False``); each
layer's sweep is cached, so a sweep interrupted by the user's next action resumes where it was.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from gear_lab import plots
from gear_lab.compression import CompressionConfig, get_preset, list_presets, with_overrides
from gear_lab.errors import GearLabError
from gear_lab.studio import state
from gear_lab.sweeps import ATTENTION_COLUMNS, RECONSTRUCTION_COLUMNS

STUDIES = {
    "rank": ("error vs rank", state.offered("rank"), [0, 1, 2, 4, 8, 16]),
    "outliers": (
        "error vs outlier fraction",
        [0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.15, 0.2],
        [0.0, 0.005, 0.01, 0.02, 0.05, 0.1],
    ),
    "bits": ("error vs bits", state.offered("bits"), [2, 3, 4, 8]),
    "pareto": (
        "Pareto front across presets",
        list_presets(),
        ["gear", "gear-l", "kivi", "quant", "outlier-quant", "kcvt"],
    ),
}
PARETO_BITS = [2, 3, 4]


def pareto_grid(presets: list[str], bits: list[int]) -> list[CompressionConfig]:
    """Each preset at each of ``bits`` (presets without a bit width, fp8 and none, once)."""
    return [
        get_preset(p, bits=b) if get_preset(p).keys.bits is not None else get_preset(p)
        for p in presets
        for b in (bits if get_preset(p).keys.bits is not None else [None])
    ]


st.title("Sweeps")
key, info = state.require_dump()
sel = state.data_selectors(info, "sweeps", head=False, layer=False)
sample = sel["sample"]
layers = st.sidebar.multiselect(
    "layers",
    info["layers"],
    default=[10] if 10 in info["layers"] else info["layers"][:1],
    key="sweeps-layers",
)
kinds = st.sidebar.multiselect(
    "kinds",
    [k for k in ("keys", "values") if k in info["kinds"]],
    default=["keys", "values"],
    key="sweeps-kinds",
)
study = st.radio(
    "study", list(STUDIES), format_func=lambda s: STUDIES[s][0], horizontal=True, key="sweeps-study"
)
label, options, default = STUDIES[study]
values = st.multiselect(
    "presets" if study == "pareto" else f"{study} values",
    options,
    default=default,
    key=f"sweeps-values-{study}",
)
if study == "pareto":
    bits = st.multiselect(
        "bits", state.offered("bits"), default=PARETO_BITS, key="sweeps-pareto-bits"
    )
    grid = pareto_grid(values, bits) if values and bits else []
else:
    with st.expander("base method (the swept setting overrides it)", expanded=False):
        base = state.method_settings("sweeps", initial={"bits": 2})
    grid = []
    if base is not None:
        try:
            grid = [with_overrides(base, **{study: v}) for v in sorted(values)]
        except GearLabError as err:
            state.show_error(err)
metric = st.selectbox(
    "error metric", [*RECONSTRUCTION_COLUMNS, *ATTENTION_COLUMNS], key="sweeps-metric"
)
st.caption(f"{len(grid)} configurations x {len(layers)} layer(s) x {len(kinds)} kind(s)")

run = st.button(
    "Run sweep", type="primary", disabled=not (grid and layers and kinds), key="sweeps-run"
)
if run:
    grid_json = tuple(c.to_json() for c in grid)
    bar = st.progress(0.0, text="sweeping")
    parts = []
    try:
        for i, layer in enumerate(layers):
            bar.progress(i / len(layers), text=f"layer {layer} ({i + 1} of {len(layers)})")
            parts.append(state.sweep_layer(*key, grid_json, layer, tuple(kinds), sample))
    except GearLabError as err:
        state.show_error(err)
    else:
        st.session_state["sweeps-result"] = (study, pd.concat(parts, ignore_index=True))
    bar.empty()

result = st.session_state.get("sweeps-result")
if result is None:
    st.info("Choose the values and press **Run sweep**.")
    st.stop()
done_study, df = result
if done_study == "pareto":
    points = (
        df.groupby(["config", "preset"], sort=False)[["bits_per_entry", metric]]
        .mean()
        .reset_index()
    )
    st.plotly_chart(
        plots.fig_pareto(points, y=metric, hover=["config"], log_y=metric != "cosine"),
        key="sweeps-chart",
    )
else:
    st.plotly_chart(
        plots.fig_error_lines(
            df,
            x=done_study,
            y=metric,
            color="kind",
            log_y=metric not in ("cosine", "snr_db"),
            title=f"{metric} vs {done_study} (mean over layers {sorted(df['layer'].unique().tolist())})",
        ),
        key="sweeps-chart",
    )
    st.plotly_chart(
        plots.fig_error_lines(df, x=done_study, y="bits_per_entry", color="kind", log_y=False),
        key="sweeps-bits",
    )
st.dataframe(df, hide_index=True, width="stretch", key="sweeps-table")
st.download_button(
    "Download CSV",
    df.to_csv(index=False),
    file_name="gear-lab-sweep.csv",
    mime="text/csv",
    key="sweeps-csv",
)
