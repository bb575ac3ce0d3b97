"""Error explorer: what a compression method does to one layer's keys or values.

Defaults answer the newcomer's first question: the error of 2-bit GEAR on layer 10's keys,
next to plain 2-bit quantization.
"""

from __future__ import annotations

import numpy as np
import streamlit as st
import torch

from gear_lab import metrics, plots
from gear_lab.studio import state

st.title("Error explorer")
key, info = state.require_dump()
sel = state.data_selectors(info, "explorer")
layer, sample, head, kind = sel["layer"], sel["sample"], sel["head"], sel["kind"]
compare = st.sidebar.toggle("compare two configurations", value=True, key="explorer-compare")
with_attention = "queries" in info["kinds"] and st.sidebar.toggle(
    "attention error",
    value=True,
    key="explorer-attention",
    help="KL of this head's attention with the dump's queries (costs ~0.2 s per new setting)",
)

DEFAULTS = {"A": ("gear", {"bits": 2}), "B": ("quant", {"bits": 2})}
names = ["A", "B"] if compare else ["A"]
columns = st.columns(len(names))
results: dict[str, dict] = {}
for name, col in zip(names, columns, strict=True):
    preset, initial = DEFAULTS[name]
    with col:
        st.subheader(f"configuration {name}")
        with st.expander("settings", expanded=True):
            config = state.method_settings(
                f"explorer-{name}", preset=preset, initial=initial, label="preset"
            )
        if config is None:
            continue
        with state.user_errors():
            res = state.compress_slice(*key, kind, layer, sample, state.config_key(config))
            attn = (
                state.attention_slice(*key, kind, layer, sample, head, state.config_key(config))
                if with_attention
                else None
            )
        results[name] = res
        m = res["metrics"]
        x = state.tensor(key, kind, layer, sample)[:, head : head + 1]
        head_m = metrics.reconstruction(x, torch.from_numpy(res["x_hat"][head : head + 1])[None])
        st.caption(f"`{config.name}`: layer {layer} {kind}, all {info['num_kv_heads']} heads")
        shown = [
            ("relative error", state.fmt(m["rel_fro"]), "||X̂ - X||_F / ||X||_F"),
            ("bits per entry", state.fmt(res["bits_per_entry"]), "measured"),
            ("smaller than fp16", f"{16 / res['bits_per_entry']:.2f}x", None),
            ("SNR (dB)", state.fmt(m["snr_db"]), None),
            (f"head {head} rel. error", state.fmt(head_m["rel_fro"]), None),
            ("cosine", state.fmt(m["cosine"]), None),
            ("max |error|", state.fmt(m["max_abs"]), None),
        ]
        if attn is not None:
            shown.append(
                (
                    "attention KL",
                    state.fmt(attn["kl"]),
                    f"mean KL(p || p̂) over the query rows of KV head {head}'s query heads",
                )
            )
        # half-width columns (compare mode) fit 2 metrics a row without cutting values ("0.083…")
        per_row = 2 if compare else 4
        for start in range(0, len(shown), per_row):
            c = st.columns(per_row)
            for col, (label, value, help_text) in zip(
                c, shown[start : start + per_row], strict=False
            ):
                col.metric(label, value, help=help_text)
        total = max(res["nbytes"], 1)
        st.caption(
            f"measured {res['nbytes']:,} bytes for {res['numel']:,} entries: "
            + ", ".join(
                f"{p} {b:,} B ({b / total:.0%})" for p, b in res["bytes_by_part"].items() if b
            )
        )
        if attn is not None:
            st.caption(
                "attention: "
                + ", ".join(f"{k} {state.fmt(v)}" for k, v in attn.items())
                + f" (head {head}, only {kind} compressed)"
            )

if not results:
    st.stop()

x_head = state.load_slice(*key, kind, layer, sample)[head]
panels: dict[str, np.ndarray] = {"original": x_head}
for name, res in results.items():
    panels[f"reconstruction {name}"] = res["x_hat"][head]
    panels[f"error {name}"] = res["x_hat"][head] - x_head
st.plotly_chart(
    plots.fig_heatmaps(
        panels,
        error_panels=[p for p in panels if p.startswith("error")],
        title=f"layer {layer} {kind}, head {head}: tokens x channels",
    ),
    key="explorer-heatmaps",
)

x = torch.from_numpy(x_head)[None, None]
left, right = st.columns(2)
for by, col in (("channel", left), ("token", right)):
    series = {
        name: metrics.reconstruction_profile(
            x, torch.from_numpy(res["x_hat"][head])[None, None], by
        )["rel_fro"]
        for name, res in results.items()
    }
    col.plotly_chart(
        plots.fig_profile(series, by=by, metric="rel_fro"), key=f"explorer-profile-{by}"
    )
