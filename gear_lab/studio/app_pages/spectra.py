"""Spectra: singular values of a tensor and of its quantization residual, and the rank GEAR needs.

GEAR's low-rank term approximates the residual ``R = X - (D + S)`` (Kang et al. 2024, eq. 4);
the rank that captures a given share of R's energy says how much a rank-r correction can fix.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from gear_lab import metrics, plots
from gear_lab.studio import state

st.title("Spectra")
key, info = state.require_dump()
sel = state.data_selectors(info, "spectra")
layer, sample, head, kind = sel["layer"], sel["sample"], sel["head"], sel["kind"]

with st.expander("quantizer whose residual is analysed (its rank is marked)", expanded=False):
    config = state.method_settings("spectra", initial={"bits": 2})
if config is None:
    st.stop()
share = st.slider("energy share", 0.50, 0.99, 0.90, step=0.01, key="spectra-share")
rank = config.for_kind(kind).rank
cfg = state.config_key(config)

with state.user_errors():
    sv = state.spectra(*key, kind, layer, sample, cfg)
need = {name: metrics.rank_for_energy(torch.from_numpy(s[head]), share) for name, s in sv.items()}
c = st.columns(4)
c[0].metric(f"rank for {share:.0%} of residual energy", need["residual"])
c[1].metric(f"rank for {share:.0%} of tensor energy", need["tensor"])
curve = metrics.energy_curve(torch.from_numpy(sv["residual"][head]))
kept = float(curve[min(rank, curve.numel()) - 1]) if rank else 0.0
c[2].metric(f"residual energy kept at rank {rank}", f"{kept:.1%}")
c[3].metric("max rank", sv["tensor"].shape[-1], help="min(seq, head_dim)")
st.caption(f"layer {layer} {kind}, head {head}, sample {sample}; quantizer `{config.name}`")

labels = {"tensor": f"{kind}", "residual": "quantization residual"}
left, right = st.columns(2)
left.plotly_chart(
    plots.fig_spectrum({labels[n]: s[head] for n, s in sv.items()}, rank=rank),
    key="spectra-sv",
)
right.plotly_chart(
    plots.fig_energy(
        {labels[n]: metrics.energy_curve(torch.from_numpy(s[head])) for n, s in sv.items()},
        rank=rank,
        share=share,
    ),
    key="spectra-energy",
)

st.subheader(f"Rank for {share:.0%} of the energy, across layers")
of = st.radio("of", ["residual", "tensor"], horizontal=True, key="spectra-of")
layers = info["layers"]
bar = st.progress(0.0, text="spectra of every layer")
ranks = np.zeros((len(layers), info["num_kv_heads"]), dtype=int)
with state.user_errors():
    for i, layer_i in enumerate(layers):
        s = state.spectra(*key, kind, layer_i, sample, cfg)[of]
        ranks[i] = metrics.rank_for_energy(torch.from_numpy(s), share).numpy()
        bar.progress((i + 1) / len(layers), text=f"layer {layer_i}")
bar.empty()
st.plotly_chart(
    plots.fig_layer_map(
        ranks,
        rows=layers,
        title=f"rank for {share:.0%} of {of} energy ({kind}, {config.name})",
        x_title="kv head",
        colorbar_title="rank",
        annotate=True,
    ),
    key="spectra-layers",
)
