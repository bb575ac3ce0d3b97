"""Outliers: which channels hold the large entries, across layers, and which ones a method keeps.

KIVI (Liu et al. 2024) observed that key outliers sit in fixed channels while value outliers do
not; GEAR's sparse term ``S`` keeps a fraction of extreme entries exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from gear_lab import plots
from gear_lab.studio import state

STATS = {
    "max_abs": "channel max |x|",
    "kurtosis": "excess kurtosis",
    "share_beyond": "share beyond 3 sigma",
}

st.title("Outliers")
key, info = state.require_dump()
sel = state.data_selectors(info, "outliers")
layer, sample, head, kind = sel["layer"], sel["sample"], sel["head"], sel["kind"]
kinds = [k for k in ("keys", "values") if k in info["kinds"]]
d = info["head_dim"]


def channel_label(i: int) -> str:
    return f"head {i // d} ch {i % d}"


# --------------------------------------------------------------------------- this layer
with state.user_errors():
    stats = state.channel_stats(*key, kind, layer, sample)
    slices = {k: state.load_slice(*key, k, layer, sample) for k in kinds}
max_abs = stats["max_abs"].ravel()
order = np.argsort(max_abs)[::-1][:8]
top = pd.DataFrame(
    {
        "channel": [channel_label(i) for i in order],
        "max |x|": max_abs[order],
        "x median channel": max_abs[order] / np.median(max_abs),
        "kurtosis": stats["kurtosis"].ravel()[order],
        "share beyond 3σ": stats["share_beyond"].ravel()[order],
    }
)
left, right = st.columns([2, 3])
with left:
    st.subheader(f"Outlier channels: layer {layer} {kind}")
    st.dataframe(top, hide_index=True, width="stretch", key="outliers-top")
with right:
    st.plotly_chart(plots.fig_magnitude_histogram(slices), key="outliers-hist")

# --------------------------------------------------------------------------- across layers
st.subheader("Across layers")
stat = st.radio(
    "statistic", list(STATS), format_func=STATS.get, horizontal=True, key="outliers-stat"
)
layers = info["layers"]
cols = st.columns(len(kinds))
with state.user_errors(), st.spinner("statistics of every layer (cached after the first time)"):
    for k, col in zip(kinds, cols, strict=True):
        grid = np.stack([state.channel_stats(*key, k, li, sample)[stat].ravel() for li in layers])
        col.plotly_chart(
            plots.fig_layer_map(
                grid,
                rows=layers,
                title=f"{k}: {STATS[stat]} (layers x head·channel)",
                x_title=f"head·channel (head_dim {d})",
                colorbar_title=stat,
            ),
            key=f"outliers-map-{k}",
        )

# --------------------------------------------------------------------------- kept outliers
st.subheader("Where the kept outliers fall")
with st.expander("method", expanded=False):
    config = state.method_settings("outliers", kind=kind, initial={"bits": 2})
if config is not None:
    with state.user_errors():
        res = state.compress_slice(*key, kind, layer, sample, state.config_key(config))
    mask = res["mask"][head]
    if mask.any():
        st.plotly_chart(
            plots.fig_outlier_positions(
                mask, title=f"{config.name} on layer {layer} {kind}, head {head}"
            ),
            key="outliers-kept",
        )
    else:
        st.info(f"`{config.name}` keeps no outliers: raise the outlier fraction.")
