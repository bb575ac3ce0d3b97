"""Outliers: which channels hold the large entries, across layers, and which ones a method keeps.

KIVI (Liu et al. 2024) observed that key outliers sit in fixed channels while value outliers do
not; GEAR's sparse term ``S`` keeps a fraction of extreme entries exactly.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import streamlit as st

from gear_lab import plots
from gear_lab.compression.outliers import outlier_count
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
left, right = st.columns([1, 1])
with left:
    st.subheader(f"Outlier channels: layer {layer} {kind}")
    number = st.column_config.NumberColumn
    st.dataframe(
        top,
        hide_index=True,
        width="stretch",
        key="outliers-top",
        column_config={  # short numbers, so that every column fits the half-width table
            "channel": st.column_config.TextColumn("channel", width="small"),
            "max |x|": number(format="%.2f", width="small"),
            "x median channel": number("x median", format="%.1f", width="small"),
            "kurtosis": number(format="%.1f", width="small"),
            "share beyond 3σ": number(">3σ", format="%.3f", width="small"),
        },
    )
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
    config = state.method_settings("outliers", initial={"bits": 2})
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
    tc = config.for_kind(kind)
    if tc.outliers > 0:
        # the head's largest-|x| channel: does the sparse term keep its extreme entries?
        x_head = (
            slices[kind][head]
            if kind in slices
            else state.load_slice(*key, kind, layer, sample)[head]
        )
        channel = int(np.argmax(np.abs(x_head).max(axis=0)))
        negative = float((x_head[:, channel] < 0).mean())
        field = "keys" if kind.startswith("keys") else "values"
        other = "magnitude" if tc.outlier_mode == "signed" else "signed"
        alt = replace(config, **{field: replace(getattr(config, field), outlier_mode=other)})
        with state.user_errors():
            alt_mask = state.compress_slice(*key, kind, layer, sample, state.config_key(alt))[
                "mask"
            ]
        kept = {tc.outlier_mode: mask, other: alt_mask[head]}
        st.markdown(
            f"**Head {head}'s largest-|x| channel ({channel}, {negative:.0%} of its entries negative)**"
        )
        st.dataframe(
            pd.DataFrame(
                {
                    "outlier_mode": list(kept),
                    f"kept in channel {channel}": [int(m[:, channel].sum()) for m in kept.values()],
                    "kept in the head": [int(m.sum()) for m in kept.values()],
                }
            ),
            hide_index=True,
            key="outliers-modes",
        )
        seq = x_head.shape[0]  # a channel vector spans one block (or the whole sequence)
        length = d if tc.outlier_axis == "token" else min(seq, config.block_size or seq)
        k = outlier_count(tc.outliers, length)
        st.caption(
            "GEAR's filter keeps the s/2 largest and s/2 smallest entries of each vector (its "
            "reference code sorts and keeps both ends): that is `signed`, the default, which keeps "
            f"ceil(k/2) largest and floor(k/2) smallest values of every {tc.outlier_axis} vector; "
            f"`magnitude` keeps the k largest |x|. Here k = {k} per vector (s = {tc.outliers:g}). "
            "With k = 1, `signed` keeps only each vector's largest *positive* entry, so a channel "
            "of large negative values gets none of them; set `outlier_mode` to `magnitude` in the "
            "method settings to keep the largest magnitudes instead."
        )
