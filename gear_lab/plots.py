"""Plotly figure builders shared by the studio (``gear_lab.studio``) and the notebooks.

Every function takes plain arrays (numpy, or torch tensors on any device) or a tidy
``pandas.DataFrame`` and returns a ``plotly.graph_objects.Figure``; nothing here computes a
compression, a metric or a Pareto front (that is ``gear_lab.compression``, ``gear_lab.metrics``,
``gear_lab.sweeps``), so the app and the notebooks draw the same pictures of the same numbers. Tensors shown as heatmaps are one head's
``[seq, head_dim]`` slice (tokens x channels) of a ``[batch, kv_heads, seq, head_dim]`` cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import textwrap
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from gear_lab.errors import ConfigError, TensorError
from gear_lab.sweeps import pareto_front

__all__ = [
    "COLORS",
    "downsample",
    "fig_energy",
    "fig_error_lines",
    "fig_generation_steps",
    "fig_heatmaps",
    "fig_kl_distribution",
    "fig_layer_map",
    "fig_magnitude_histogram",
    "fig_outlier_positions",
    "fig_pareto",
    "fig_peak_memory",
    "fig_profile",
    "fig_retrieval_heatmaps",
    "fig_spectrum",
    "log_ticks",
    "static_images",
]

_MARGIN = {"l": 50, "r": 20, "t": 50, "b": 40}
_LEGEND_BELOW = {"orientation": "h", "y": -0.25}
#: line / marker colours, far apart in hue and lightness (Streamlit's own theme starts with two
#: blues), and dashes, so that two lines stay apart even when one is drawn over the other
COLORS = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
)
DASHES = ("solid", "dash", "dot", "dashdot")


def _style_traces(fig: go.Figure) -> None:
    """Give every scatter / bar trace without its own colour the next of :data:`COLORS` (and lines
    the next of :data:`DASHES`), in trace order."""
    for i, trace in enumerate(t for t in fig.data if t.type in ("scatter", "scattergl", "bar")):
        color = COLORS[i % len(COLORS)]
        if trace.type == "bar":
            if trace.marker.color is None:
                trace.marker.color = color
            continue
        mode = trace.mode or "lines"
        if "lines" in mode and trace.line.color is None:
            trace.line.color = color
            if trace.line.dash is None:
                trace.line.dash = DASHES[i % len(DASHES)]
        if "markers" in mode and trace.marker.color is None:
            trace.marker.color = trace.line.color or color


def log_ticks(values: Any) -> dict[str, list]:
    """Tick positions and labels for a log axis over ``values``: 1..9 within one decade, 1-2-5
    steps over up to three, powers of ten beyond (plotly's own read "5, 2, 100, 5, 2, 10")."""
    v = _np(values).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return {}
    lo, hi = int(np.floor(np.log10(v.min()))), int(np.ceil(np.log10(v.max())))
    decades = hi - lo
    steps = tuple(range(1, 10)) if decades <= 1 else (1, 2, 5) if decades <= 3 else (1,)
    ticks = [m * 10.0**e for e in range(lo, hi + 1) for m in steps]
    return {"tickvals": ticks, "ticktext": [f"{t:g}" for t in ticks]}


def _int_ticks(count: int, most: int = 16) -> dict[str, Any]:
    """Integer ticks for an axis of ``count`` cells numbered from 0: every one, or a round step."""
    step = next((s for s in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100) if count / s <= most), 128)
    return {"tick0": 0, "dtick": step}


def _axes_layout(
    fig: go.Figure,
    title: str,
    x_title: str,
    y_title: str,
    *,
    height: int,
    log_y: bool = False,
    legend_below: bool = True,
    **extra: Any,
) -> go.Figure:
    """The house style of an x/y chart: titles, linear or log y (1-2-5 tick labels), margins,
    legend below, distinct trace colours and dashes."""
    _style_traces(fig)
    if log_y:
        ys = [np.asarray(t.y, dtype=float).ravel() for t in fig.data if t.y is not None]
        if ys:
            fig.update_yaxes(**log_ticks(np.concatenate(ys)))
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        yaxis_type="log" if log_y else "linear",
        height=height,
        margin=_MARGIN,
        **({"legend": _LEGEND_BELOW} if legend_below else {}),
        **extra,
    )
    return fig


def _np(x: Any) -> np.ndarray:
    """A float64 numpy copy of ``x`` (numpy array, list or torch tensor on any device)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def downsample(a: Any, max_rows: int = 256, max_cols: int = 256) -> tuple[np.ndarray, int, int]:
    """Pool a 2-D array ``[rows, cols]`` to at most ``max_rows x max_cols`` cells.

    Each cell keeps the entry of largest magnitude in its block (signed), so outliers stay
    visible. Returns ``(pooled, row_step, col_step)``; steps of 1 mean no pooling.
    """
    a = _np(a)
    if a.ndim != 2:
        raise TensorError(f"downsample expects a 2-D array, got shape {a.shape}")
    rows, cols = a.shape
    rs, cs = -(-rows // max_rows), -(-cols // max_cols)
    if rs == 1 and cs == 1:
        return a, 1, 1
    pr, pc = -(-rows // rs) * rs, -(-cols // cs) * cs
    padded = np.zeros((pr, pc))
    padded[:rows, :cols] = a
    blocks = (
        padded.reshape(pr // rs, rs, pc // cs, cs)
        .transpose(0, 2, 1, 3)
        .reshape(pr // rs, pc // cs, -1)
    )
    idx = np.abs(blocks).argmax(axis=-1)
    return np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0], rs, cs


def fig_heatmaps(
    panels: Mapping[str, Any],
    *,
    error_panels: Sequence[str] = ("error",),
    max_rows: int = 256,
    max_cols: int = 256,
    title: str | None = None,
) -> go.Figure:
    """Side-by-side heatmaps of ``[tokens, channels]`` slices (e.g. original / reconstruction / error).

    Panels not in ``error_panels`` share one symmetric colour scale, so the original and its
    reconstructions are directly comparable; the error panels share another one, so errors of
    two configurations are comparable too.
    Large slices are pooled with :func:`downsample` (largest-magnitude entry per block).
    """
    names = list(panels)
    pooled = {n: downsample(panels[n], max_rows, max_cols) for n in names}
    errors = [n for n in names if n in error_panels]
    values = [n for n in names if n not in error_panels]
    # axes laid out by hand (make_subplots costs a few hundred ms per redraw)
    gap = 0.035
    width = (1 - gap * (len(names) - 1)) / len(names)
    traces, layout, titles = [], {}, []
    for i, n in enumerate(names):
        z, rs, cs = pooled[n]
        suffix = "" if i == 0 else str(i + 1)
        left = i * (width + gap)
        traces.append(
            go.Heatmap(
                z=z,
                x=np.arange(z.shape[1]) * cs,
                y=np.arange(z.shape[0]) * rs,
                xaxis=f"x{suffix}",
                yaxis=f"y{suffix}",
                coloraxis="coloraxis2" if n in errors else "coloraxis",
                hovertemplate="token %{y}<br>channel %{x}<br>%{z:.4g}<extra>" + n + "</extra>",
            )
        )
        layout[f"xaxis{suffix}"] = {
            "domain": [left, left + width],
            "anchor": f"y{suffix}",
            "title": {"text": "channel"},
        }
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "autorange": "reversed"}
        titles.append(
            {
                "text": n,
                "x": left + width / 2,
                "y": 1.0,
                "xref": "paper",
                "yref": "paper",
                "xanchor": "center",
                "yanchor": "bottom",
                "showarrow": False,
            }
        )
    layout["yaxis"]["title"] = {"text": "token"}

    def coloraxis(group: list[str], x: float, label: str) -> dict[str, Any]:
        top = float(max((np.abs(pooled[n][0]).max() for n in group), default=1.0)) or 1.0
        bar = {"x": x, "len": 0.9, "thickness": 10, "title": {"text": label}}
        return {
            "colorscale": "RdBu_r",
            "cmin": -top,
            "cmax": top,
            "showscale": bool(group),
            "colorbar": bar,
        }

    return go.Figure(
        data=traces,
        layout={
            **layout,
            "annotations": titles,
            "title": {"text": title},
            "height": 460,
            "margin": {**_MARGIN, "r": 90},
            "coloraxis": coloraxis(values, 1.02, "value"),
            "coloraxis2": coloraxis(errors, 1.09, "error"),
        },
    )


def fig_profile(
    series: Mapping[str, Any], *, by: str = "channel", metric: str = "rel_fro", log_y: bool = False
) -> go.Figure:
    """Lines of one error metric per ``by`` index (channel, token or head), one line per label."""
    fig = go.Figure()
    for label, values in series.items():
        v = _np(values).ravel()
        fig.add_trace(go.Scatter(x=np.arange(v.size), y=v, mode="lines", name=label))
    return _axes_layout(fig, f"{metric} per {by}", by, metric, height=320, log_y=log_y)


def fig_spectrum(spectra: Mapping[str, Any], *, rank: int | None = None) -> go.Figure:
    """Singular values (log scale) per index, one line per label; ``rank`` marked by a vertical line.

    Index ``i`` on the x axis is the ``(i+1)``-th singular value, so a rank-``r`` correction keeps
    everything left of the marker at ``x = r``.
    """
    fig = go.Figure()
    for label, sv in spectra.items():
        s = _np(sv).ravel()
        fig.add_trace(go.Scatter(x=np.arange(1, s.size + 1), y=s, mode="lines+markers", name=label))
    if rank:
        fig.add_vline(x=rank + 0.5, line_dash="dash", annotation_text=f"rank {rank}")
    return _axes_layout(fig, "singular values", "index", "singular value", height=360, log_y=True)


def fig_energy(
    curves: Mapping[str, Any], *, rank: int | None = None, share: float | None = None
) -> go.Figure:
    """Cumulative energy share per rank (``curves[label][r-1]`` = share kept by rank ``r``).

    ``rank`` is marked by a vertical line and ``share`` by a horizontal one.
    """
    fig = go.Figure()
    for label, c in curves.items():
        v = _np(c).ravel()
        fig.add_trace(go.Scatter(x=np.arange(1, v.size + 1), y=v, mode="lines+markers", name=label))
    if rank:
        fig.add_vline(x=rank, line_dash="dash", annotation_text=f"rank {rank}")
    if share is not None:
        fig.add_hline(y=share, line_dash="dot", annotation_text=f"{share:.0%}")
    return _axes_layout(
        fig, "cumulative energy", "rank", "energy share", height=360, yaxis_range=[0, 1.02]
    )


def fig_layer_map(
    z: Any,
    *,
    rows: Sequence[Any],
    cols: Sequence[Any] | None = None,
    title: str,
    x_title: str,
    y_title: str = "layer",
    colorbar_title: str = "",
    annotate: bool = False,
    colorscale: str = "Viridis",
) -> go.Figure:
    """A ``[rows, cols]`` heatmap (e.g. layers x heads rank-for-energy, layers x channels maxima)."""
    z = _np(z)
    cols = list(range(z.shape[1])) if cols is None else list(cols)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=[str(r) for r in rows],
            colorscale=colorscale,
            colorbar={"title": {"text": colorbar_title}},
            text=np.vectorize(lambda v: f"{v:.3g}")(z) if annotate else None,
            texttemplate="%{text}" if annotate else None,
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        xaxis_title=x_title,
        yaxis_title=y_title,
        yaxis_autorange="reversed",
        yaxis_type="category",
        height=max(320, 16 * len(rows) + 120),
        margin=_MARGIN,
    )
    if all(isinstance(c, int | np.integer) for c in cols):  # heads, channels: no -0.5, 0.5 ticks
        fig.update_xaxes(**_int_ticks(len(cols)))
    return fig


def fig_magnitude_histogram(values: Mapping[str, Any], *, bins: int = 80) -> go.Figure:
    """Histograms of ``|x|`` with log-scaled counts, one per label, on shared bins."""
    arrays = {k: np.abs(_np(v)).ravel() for k, v in values.items()}
    top = max((float(a.max()) for a in arrays.values() if a.size), default=1.0) or 1.0
    edges = np.linspace(0.0, top, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure()
    for label, a in arrays.items():
        counts, _ = np.histogram(a, bins=edges)
        fig.add_trace(
            go.Bar(x=centers, y=counts, name=label, opacity=0.6, width=edges[1] - edges[0])
        )
    _axes_layout(
        fig, "magnitude histogram", "|x|", "count", height=340, log_y=True, barmode="overlay"
    )
    return fig


def fig_outlier_positions(mask: Any, *, title: str = "kept outliers") -> go.Figure:
    """Where kept outliers sit in a ``[tokens, channels]`` slice: positions, and counts per channel."""
    m = _np(mask) > 0
    tok, ch = np.nonzero(m)
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=["positions", "count per channel"]
    )
    fig.add_trace(
        go.Scattergl(
            x=ch,
            y=tok,
            mode="markers",
            marker={"size": 3},
            name="outlier",
            hovertemplate="token %{y}<br>channel %{x}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(go.Bar(x=np.arange(m.shape[1]), y=m.sum(axis=0), name="count"), row=1, col=2)
    fig.update_xaxes(title_text="channel", range=[-0.5, m.shape[1] - 0.5], row=1, col=1)
    fig.update_yaxes(title_text="token", range=[m.shape[0], -1], row=1, col=1)
    fig.update_xaxes(title_text="channel", row=1, col=2)
    fig.update_layout(
        title=f"{title}: {int(m.sum())} of {m.size} entries ({m.mean():.2%})",
        height=380,
        showlegend=False,
        margin=_MARGIN,
    )
    return fig


def fig_error_lines(
    df: pd.DataFrame,
    *,
    x: str,
    y: str = "rel_fro",
    color: str | None = None,
    log_y: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Error vs a swept setting (rank, outliers, bits, ...): mean of ``y`` per ``x`` and ``color``."""
    keys = [c for c in (color, x) if c]
    agg = df.groupby(keys, sort=True, dropna=False)[y].mean().reset_index()
    fig = go.Figure()
    groups = agg.groupby(color, sort=True, dropna=False) if color else [(y, agg)]
    for label, part in groups:
        fig.add_trace(go.Scatter(x=part[x], y=part[y], mode="lines+markers", name=str(label)))
    return _axes_layout(fig, title or f"{y} vs {x}", x, y, height=360, log_y=log_y)


def fig_pareto(
    df: pd.DataFrame,
    *,
    x: str = "bits_per_entry",
    y: str = "rel_fro",
    color: str = "preset",
    hover: Sequence[str] = (),
    log_y: bool = True,
) -> go.Figure:
    """Every configuration as a point of (``x``, ``y``), coloured by ``color``; the Pareto front
    (:func:`gear_lab.sweeps.pareto_front`) joined."""
    fig = go.Figure()
    hover = [h for h in hover if h in df.columns]
    for label, part in df.groupby(color, sort=True):
        fig.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                mode="markers",
                name=str(label),
                marker={"size": 9},
                customdata=part[hover].to_numpy() if hover else None,
                hovertemplate=f"{x} %{{x:.3f}}<br>{y} %{{y:.4g}}"
                + "".join(f"<br>{h} %{{customdata[{i}]}}" for i, h in enumerate(hover))
                + "<extra>%{fullData.name}</extra>",
            )
        )
    front = df[pareto_front(df, x=x, y=y)].sort_values(x)
    fig.add_trace(
        go.Scatter(
            x=front[x],
            y=front[y],
            mode="lines",
            name="Pareto front",
            line={"dash": "dash", "color": "black"},
        )
    )
    return _axes_layout(
        fig, f"{y} vs {x}: Pareto front", x, y, height=420, log_y=log_y, legend_below=False
    )


def fig_generation_steps(
    kl: Any, top1: Any, *, divergence: int | None = None, title: str = "per-step agreement"
) -> go.Figure:
    """Per decoding step: KL(full || compressed) and top-1 agreement (1 = same argmax token).

    ``divergence`` (step index of the first differing generated token) is marked on both rows.
    """
    kl, top1 = _np(kl).ravel(), _np(top1).ravel()
    steps = np.arange(kl.size)
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, subplot_titles=["KL per step", "top-1 agreement"]
    )
    fig.add_trace(go.Scatter(x=steps, y=kl, mode="lines+markers", name="KL"), row=1, col=1)
    fig.add_trace(
        go.Scatter(x=steps, y=top1, mode="markers", name="top-1", marker={"size": 7}), row=2, col=1
    )
    running = np.cumsum(top1) / (steps + 1) if top1.size else top1
    fig.add_trace(
        go.Scatter(x=np.arange(top1.size), y=running, mode="lines", name="running mean"),
        row=2,
        col=1,
    )
    if divergence is not None:
        fig.add_vline(x=divergence, line_dash="dash", line_color="red")
    fig.update_yaxes(title_text="KL", row=1, col=1)
    fig.update_yaxes(title_text="agreement", range=[-0.05, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="step", row=2, col=1)
    if kl.size <= 20:
        fig.update_xaxes(dtick=1)
    _style_traces(fig)
    fig.update_layout(title=title, height=440, margin=_MARGIN)
    return fig


def fig_kl_distribution(
    kl: Any, stats: Mapping[str, float], *, title: str = "KL distribution over steps"
) -> go.Figure:
    """Histogram of per-token KL(full || compressed) ``[n]`` on log-spaced bins, with the
    statistics of :func:`gear_lab.metrics.kl_quantiles` (``stats``: mean, median, p99, p99.9)
    marked, the tail llama.cpp's perplexity tool reports. KL of exactly 0 (same distribution to
    float precision) is counted in the first bin."""
    kl = _np(kl).ravel().astype(np.float64)
    if kl.size == 0:
        raise TensorError("fig_kl_distribution needs at least one KL value")
    positive = kl[kl > 0]
    low = positive.min() if positive.size else 1e-12
    high = max(kl.max(), low * 10)
    edges = np.logspace(np.log10(low), np.log10(high), min(40, max(kl.size // 2, 5)) + 1)
    edges[0], edges[-1] = low, high  # exact ends: 10 ** log10(x) may round past x
    counts, _ = np.histogram(np.clip(kl, low, high), bins=edges)
    fig = go.Figure(
        go.Bar(
            x=(edges[:-1] + edges[1:]) / 2,  # spans [edge, next edge] on the log axis too
            y=counts,
            width=np.diff(edges),
            name="steps",
            hovertemplate="KL %{x:.2g}: %{y} steps<extra></extra>",
        )
    )
    names = {"kl_mean": "mean", "kl_median": "median", "kl_p99": "p99", "kl_p999": "p99.9"}
    top = max(int(counts.max()), 1)
    for i, (key, name) in enumerate(names.items()):
        if key in stats and stats[key] > 0:  # a vertical line per statistic, named in the legend
            fig.add_scatter(
                x=[stats[key]] * 2,
                y=[0, top],
                mode="lines",
                name=f"{name} {stats[key]:.2g}",
                line={"dash": DASHES[i % len(DASHES)], "color": COLORS[(i + 1) % len(COLORS)]},
            )
    fig.update_xaxes(type="log", title_text="KL (nats)", **log_ticks(edges))
    fig.update_yaxes(title_text="steps", rangemode="tozero")
    fig.update_layout(title=title, height=380, margin=_MARGIN, legend=_LEGEND_BELOW)
    return fig


def fig_peak_memory(
    probes: Sequence[Mapping[str, Any]], *, title: str = "peak memory at equal batch"
) -> go.Figure:
    """Grouped bars per cache: ``peak_mib`` (the process's peak memory above the loaded model)
    and ``held_mib`` (the bytes the cache keeps allocated at the end), one mapping per cache
    with its ``cache`` label, as :class:`gear_lab.serving.Probe` reports them."""
    if not probes:
        raise ConfigError("fig_peak_memory needs at least one probe")
    labels = [str(p["cache"]) for p in probes]
    fig = go.Figure()
    for key, name in (("peak_mib", "peak above the model"), ("held_mib", "held by the cache")):
        values = [float(p[key]) for p in probes]
        fig.add_bar(
            x=labels,
            y=values,
            name=name,
            text=[f"{v:.1f}" for v in values],
            hovertemplate="%{x}: %{y:.1f} MiB<extra>" + name + "</extra>",
        )
    return _axes_layout(fig, title, "cache", "MiB", height=360, barmode="group")


def _length_label(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def fig_retrieval_heatmaps(
    df: pd.DataFrame, *, task: str | None = None, columns: int = 4, title: str | None = None
) -> go.Figure:
    """Retrieval accuracy, depth x length, one heatmap per cache setting (full precision first,
    then by decreasing measured bits), from a :func:`gear_lab.retrieval.run_retrieval` table.

    Cells show ``correct/trials``; all panels share one red-to-green scale from 0 to 1.
    ``task`` keeps that task's rows (default: every row).
    """
    from gear_lab.retrieval import setting_labels

    if task is not None:
        df = df[df["task"] == task]
    if df.empty:
        raise ConfigError(f"no retrieval rows{f' for task {task!r}' if task else ''}")
    df = df.assign(setting=setting_labels(df))
    bits = df.groupby("setting", sort=False)["bits_per_entry"].mean()
    full = set(df.loc[df["prompt_compression"] == "none", "setting"])
    order = sorted(bits.index, key=lambda s: (s not in full, -bits[s]))
    lengths = sorted(df["length"].unique())
    depths = sorted(df["depth"].unique())
    cols = min(columns, len(order))
    rows = -(-len(order) // cols)
    fig = make_subplots(
        rows=rows,
        cols=cols,
        shared_yaxes=True,
        # long labels wrap (panels are narrow): no title runs into its neighbour's
        subplot_titles=[
            "<br>".join([*textwrap.wrap(s, 30, break_on_hyphens=False), f"{bits[s]:.2f} bits"])
            for s in order
        ],
        horizontal_spacing=0.03,
        vertical_spacing=0.6 / rows,
    )
    for i, setting in enumerate(order):
        cell = (
            df[df["setting"] == setting]
            .groupby(["depth", "length"])["correct"]
            .agg(["mean", "sum", "size"])
        )
        z = np.full((len(depths), len(lengths)), np.nan)
        text = np.full(z.shape, "", dtype=object)
        for (depth, length), (mean, hits, size) in cell.iterrows():
            r, c = depths.index(depth), lengths.index(length)
            z[r, c], text[r, c] = mean, f"{int(hits)}/{int(size)}"
        fig.add_trace(
            go.Heatmap(
                x=[_length_label(int(n)) for n in lengths],
                y=[f"{d:g}" for d in depths],
                z=z,
                text=text,
                texttemplate="%{text}",
                zmin=0,
                zmax=1,
                colorscale="RdYlGn",
                showscale=i == 0,
                colorbar={"title": "accuracy"},
                hovertemplate="length %{x}, depth %{y}: %{text}<extra></extra>",
            ),
            row=i // cols + 1,
            col=i % cols + 1,
        )
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="length (tokens)", row=rows)
    fig.update_yaxes(type="category")
    fig.update_yaxes(title_text="depth", col=1)
    fig.update_layout(
        title={"text": title or f"retrieval accuracy{f': {task}' if task else ''}", "y": 0.98},
        height=170 + 280 * rows,
        margin={**_MARGIN, "t": 120},
    )
    return fig


_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def static_images(fmt: str = "png", *, width: int = 900, height: int = 500) -> str | None:
    """Make ``fig.show()`` keep a static image next to the interactive figure (notebooks).

    Sets plotly's default renderer to ``plotly_mimetype+<fmt>``: a saved notebook then holds the
    plotly JSON (interactive in Jupyter) and a PNG or SVG that renders anywhere (GitHub, nbviewer,
    a plain diff). The image comes from kaleido (the ``dev`` extra), which drives a Chrome: Debian's
    ``chromium`` (``make test`` installs it) or ``$BROWSER_PATH``. Returns the renderer set, or
    ``None`` (with a warning; figures stay interactive only) when kaleido or a browser is missing.
    """
    import plotly.io as pio

    browser = os.environ.get("BROWSER_PATH") or next(
        filter(None, map(shutil.which, _BROWSERS)), None
    )
    if importlib.util.find_spec("kaleido") is None or browser is None:
        missing = (
            "kaleido (pip install kaleido)" if browser else "a chromium (apt-get install chromium)"
        )
        warnings.warn(f"no static images for the figures: {missing} is missing", stacklevel=2)
        return None
    import kaleido
    from plotly.io import base_renderers

    os.environ.setdefault("BROWSER_PATH", browser)
    kaleido.start_sync_server(silence_warnings=True)  # one browser for every figure
    warnings.filterwarnings("ignore", message="The kopts argument is ignored", category=UserWarning)
    base = {"png": base_renderers.PngRenderer, "svg": base_renderers.SvgRenderer}[fmt]

    class Static(base):  # type: ignore[misc, valid-type]
        """The image renderer, retried on a fresh browser: on a busy machine kaleido's page can
        be queried before its script loaded ("kaleido_scopes is not defined")."""

        def to_mimebundle(self, fig_dict: dict) -> dict:
            for attempt in range(3):
                try:
                    return super().to_mimebundle(fig_dict)
                except Exception as err:  # kaleido raises many kinds
                    last = err
                    kaleido.stop_sync_server(silence_warnings=True)
                    time.sleep(1 + attempt)
                    kaleido.start_sync_server(silence_warnings=True)
            message = str(last).strip().splitlines()[0] if str(last).strip() else type(last)
            warnings.warn(f"no static image for this figure: {message}", stacklevel=2)
            return {}

    name = f"gear_lab_{fmt}"
    pio.renderers[name] = Static(width=width, height=height)
    pio.renderers.default = f"plotly_mimetype+{name}"
    return pio.renderers.default
