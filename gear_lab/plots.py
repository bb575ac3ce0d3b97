"""Plotly figure builders shared by the studio (``app/``) and the notebooks.

Every function takes plain arrays (numpy, or torch tensors on any device) or a tidy
``pandas.DataFrame`` and returns a ``plotly.graph_objects.Figure``; nothing here computes a
compression or a metric (that is ``gear_lab.compression`` / ``gear_lab.metrics``), so the app and the
notebooks draw the same pictures of the same numbers. Tensors shown as heatmaps are one head's
``[seq, head_dim]`` slice (tokens x channels) of a ``[batch, kv_heads, seq, head_dim]`` cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "downsample",
    "fig_energy",
    "fig_error_lines",
    "fig_generation_steps",
    "fig_heatmaps",
    "fig_layer_map",
    "fig_magnitude_histogram",
    "fig_outlier_positions",
    "fig_pareto",
    "fig_profile",
    "fig_spectrum",
    "pareto_front",
]

_MARGIN = {"l": 50, "r": 20, "t": 50, "b": 40}
_LEGEND_BELOW = {"orientation": "h", "y": -0.25}


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
    """The house style of an x/y chart: titles, linear or log y, margins, legend below."""
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
        raise ValueError(f"downsample expects a 2-D array, got shape {a.shape}")
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


def pareto_front(df: pd.DataFrame, *, x: str, y: str) -> pd.Series:
    """Boolean mask of rows not dominated in (lower ``x``, lower ``y``)."""
    order = df.sort_values([x, y]).index
    best = np.inf
    keep = pd.Series(False, index=df.index)
    for i in order:
        if df.at[i, y] < best:
            keep[i] = True
            best = df.at[i, y]
    return keep


def fig_pareto(
    df: pd.DataFrame,
    *,
    x: str = "bits_per_entry",
    y: str = "rel_fro",
    color: str = "preset",
    hover: Sequence[str] = (),
    log_y: bool = True,
) -> go.Figure:
    """Every configuration as a point of (``x``, ``y``), coloured by ``color``; the Pareto front joined."""
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
    fig.update_layout(title=title, height=440, margin=_MARGIN)
    return fig
