"""gear_lab.plots: pooling and figure contents against brute-force references."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gear_lab import plots
from gear_lab.errors import TensorError

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    a=arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=finite),
    max_rows=st.integers(1, 8),
    max_cols=st.integers(1, 8),
)
def test_downsample_keeps_the_largest_magnitude_of_each_block(a, max_rows, max_cols) -> None:
    pooled, rs, cs = plots.downsample(a, max_rows, max_cols)
    assert pooled.shape[0] <= max_rows and pooled.shape[1] <= max_cols
    assert pooled.shape == (-(-a.shape[0] // rs), -(-a.shape[1] // cs))
    for i in range(pooled.shape[0]):
        for j in range(pooled.shape[1]):
            block = a[i * rs : (i + 1) * rs, j * cs : (j + 1) * cs]
            assert abs(pooled[i, j]) == np.abs(block).max()
            assert pooled[i, j] in block


def test_downsample_leaves_small_arrays_alone() -> None:
    a = np.arange(12.0).reshape(3, 4)
    pooled, rs, cs = plots.downsample(a, 3, 4)
    assert (rs, cs) == (1, 1) and np.array_equal(pooled, a)


def test_downsample_refuses_a_non_matrix_with_a_tensor_error() -> None:
    with pytest.raises(TensorError, match="2-D array"):
        plots.downsample(np.zeros((2, 3, 4)))


def test_heatmaps_share_one_scale_for_values_and_one_for_errors() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 64))
    x_hat = x + rng.normal(scale=0.1, size=x.shape)
    fig = plots.fig_heatmaps(
        {"original": x, "reconstruction": x_hat, "error": x_hat - x}, max_rows=100
    )
    assert fig.layout.coloraxis.cmax == max(np.abs(x).max(), np.abs(x_hat).max())
    assert fig.layout.coloraxis2.cmax == np.abs(x_hat - x).max()
    assert [t.coloraxis for t in fig.data] == ["coloraxis", "coloraxis", "coloraxis2"]
    assert all(t.z.shape == (100, 64) for t in fig.data)  # 300 tokens pooled by 3


def test_error_lines_plot_the_mean_per_setting() -> None:
    df = pd.DataFrame(
        {
            "rank": [0, 0, 4, 4, 0, 4],
            "kind": ["keys"] * 4 + ["values"] * 2,
            "rel_fro": [0.2, 0.4, 0.1, 0.3, 0.5, 0.25],
        }
    )
    fig = plots.fig_error_lines(df, x="rank", color="kind")
    lines = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert lines["keys"][0] == [0, 4] and np.allclose(lines["keys"][1], [0.3, 0.2])
    assert lines["values"][0] == [0, 4] and np.allclose(lines["values"][1], [0.5, 0.25])


def test_readable_axes_and_distinct_lines() -> None:
    """Log axes read 1-2-5 (not "5, 2, 100, 5, 2, 10"), head maps tick integers, and two lines
    get two far-apart colours and dashes (Streamlit's theme would draw two blues)."""
    ticks = plots.log_ticks([0.03, 0.5, 4.0])
    assert ticks["ticktext"][:6] == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5"]
    assert plots.log_ticks(np.logspace(-6, 2, 9))["ticktext"][:3] == ["1e-06", "1e-05", "0.0001"]
    assert "0.3" in plots.log_ticks([0.15, 0.35])["ticktext"]  # within a decade: 0.2, 0.3
    fig = plots.fig_spectrum({"tensor": np.logspace(2, 0, 20), "residual": np.logspace(1, -1, 20)})
    assert list(fig.layout.yaxis.ticktext)[:3] == ["0.1", "0.2", "0.5"]
    a, b = fig.data
    assert a.line.color != b.line.color and a.line.dash != b.line.dash
    heads = plots.fig_layer_map(np.ones((4, 3)), rows=range(4), title="t", x_title="kv head")
    assert heads.layout.xaxis.dtick == 1 and heads.layout.xaxis.tick0 == 0
    channels = plots.fig_layer_map(np.ones((4, 64)), rows=range(4), title="t", x_title="channel")
    assert channels.layout.xaxis.dtick == 4


@settings(max_examples=40, deadline=None)
@given(kl=arrays(np.float64, st.integers(1, 300), elements=st.floats(0, 5, allow_nan=False)))
def test_kl_distribution_counts_every_step_and_marks_the_tail(kl) -> None:
    import torch

    from gear_lab.metrics import kl_quantiles

    stats = kl_quantiles(torch.from_numpy(kl))
    fig = plots.fig_kl_distribution(kl, stats)
    assert sum(fig.data[0].y) == kl.size  # zeros and the maximum land in the end bins
    marked = {trace.x[0] for trace in fig.data[1:]}
    assert marked == {v for v in stats.values() if v > 0}


def test_kl_distribution_refuses_no_steps() -> None:
    with pytest.raises(TensorError):
        plots.fig_kl_distribution(np.array([]), {})


def test_peak_memory_bars_show_each_probe_and_refuse_none() -> None:
    from gear_lab.errors import ConfigError

    probes = [
        {"cache": "dynamic", "peak_mib": 50.5, "held_mib": 45.0},
        {"cache": "gear", "peak_mib": 12.25, "held_mib": 9.5},
    ]
    fig = plots.fig_peak_memory(probes)
    assert [t.name for t in fig.data] == ["peak above the model", "held by the cache"]
    assert list(fig.data[0].x) == ["dynamic", "gear"]
    assert list(fig.data[0].y) == [50.5, 12.25] and list(fig.data[1].y) == [45.0, 9.5]
    assert fig.data[0].marker.color != fig.data[1].marker.color
    with pytest.raises(ConfigError):
        plots.fig_peak_memory([])
