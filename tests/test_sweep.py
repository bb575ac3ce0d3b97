"""gear_lab.sweeps on the real SmolLM2 dump: row layout, measured sizes, shared work, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gear_lab.sweeps as sweep_module
from gear_lab import metrics, open_dump
from gear_lab.compression import compress, get_preset
from gear_lab.errors import ConfigError
from gear_lab.sweeps import ATTENTION_COLUMNS, expand_grid, pareto_front, parse_grid, sweep

# the batched sweep's attention metrics (AttentionReference.error_stack, float32 on differences)
# against the float64 AttentionReference.error: measured <= 7e-8 relative on the SmolLM2 dump,
# ~1e-6 by design (float32 row sums, the Taylor / expm1 blend of KL's phi)
ATTENTION_RTOL = 1e-5


def _assert_tables_equal(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Equal sweep tables: attention columns to ATTENTION_RTOL, the rest to float64 order."""
    att = list(ATTENTION_COLUMNS)
    close = dict(check_exact=False, atol=1e-12)
    pd.testing.assert_frame_equal(got.drop(columns=att), want.drop(columns=att), rtol=1e-9, **close)
    pd.testing.assert_frame_equal(got[att], want[att], rtol=ATTENTION_RTOL, **close)


def test_rows_columns_and_measured_sizes(smol_dump):
    grid = {"bits": [2, 4], "rank": [0, 2]}
    df = sweep(smol_dump, grid, layers="0,3", samples=(0, 1), progress=False)
    with open_dump(smol_dump) as dump:
        kv_heads = dump.num_kv_heads
        assert len(df) == 2 * 2 * kv_heads * 2 * 4  # samples x layers x heads x kinds x configs
        assert not df.duplicated(["sample", "layer", "head", "kind", "config"]).any()
        assert set(df["config"]) == {c.name for c in expand_grid(grid)}
        assert df[list(ATTENTION_COLUMNS)].notna().all().all()  # the dump holds queries
        assert (df.loc[df["kind"] == "values", ["score_rel", "kl", "tv"]] == 0).all().all()
        assert (df["bits_per_entry"] == 8 * df["nbytes"] / df["numel"]).all()

        # one row recomputed by hand: compress that head alone with that config
        row = df[(df["sample"] == 1) & (df["layer"] == 3) & (df["head"] == 2)]
        row = row[(row["kind"] == "keys") & (row["bits"] == 2) & (row["rank"] == 2)].iloc[0]
        x = dump.load("keys", 3, sample=1)[None, 2:3]
        packed = compress(x, get_preset("gear", bits=2, rank=2), kind="keys")
        assert row["nbytes"] == packed.nbytes and row["numel"] == x.numel()
        assert row["rel_fro"] == pytest.approx(
            metrics.reconstruction(x, packed.decompress())["rel_fro"], rel=1e-12
        )
        ref = metrics.attention_reference(
            dump.load("queries", 3, sample=1)[None, 6:9],
            dump.load("keys", 3, sample=1)[None, 2:3],
            dump.load("values", 3, sample=1)[None, 2:3],
        )
        assert row["output_rel"] == pytest.approx(
            ref.error(k_hat=packed.decompress())["output_rel"], rel=ATTENTION_RTOL
        )
    # more bits, lower error; a rank adds measured bytes
    mean = df.groupby(["kind", "bits", "rank"])[["rel_fro", "bits_per_entry"]].mean()
    for kind in ("keys", "values"):
        assert mean.loc[(kind, 4, 0), "rel_fro"] < mean.loc[(kind, 2, 0), "rel_fro"]
        assert mean.loc[(kind, 2, 2), "bits_per_entry"] > mean.loc[(kind, 2, 0), "bits_per_entry"]


def test_ranks_share_one_svd_and_attention_once_per_layer(smol_dump, monkeypatch):
    svd_calls, ref_calls, group_calls = [], [], []
    real_svd, real_ref = torch.linalg.svd, metrics.attention_reference
    real_ranks = sweep_module.compress_ranks
    svd_shapes = []
    monkeypatch.setattr(
        torch.linalg,
        "svd",
        lambda x, **k: svd_calls.append(1) or svd_shapes.append(x) or real_svd(x, **k),
    )
    monkeypatch.setattr(
        metrics, "attention_reference", lambda *a, **k: ref_calls.append(1) or real_ref(*a, **k)
    )
    monkeypatch.setattr(
        sweep_module,
        "compress_ranks",
        lambda x, c, ranks, kind: group_calls.append(list(ranks)) or real_ranks(x, c, ranks, kind),
    )
    grid = {"bits": [2], "outliers": [0.0], "rank": [1, 2, 4], "lowrank": ["svd"]}
    options = dict(layers=[0, 1], kinds=("keys", "values"), heads=[0, 2], progress=False)
    df = sweep(smol_dump, grid, batch=False, **options)
    matrices = 2 * 2 * 2  # layers x kinds x heads, one [seq, head_dim] matrix each
    assert len(df) == matrices * 3
    assert len(svd_calls) == matrices  # not 3 x: one SVD serves ranks 1, 2 and 4
    assert group_calls == [[1, 2, 4]] * matrices
    assert len(ref_calls) == 2  # one exact attention per (sample, layer)
    # batched: one call (and one batched SVD) per layer and kind serves both heads
    svd_calls.clear(), ref_calls.clear(), group_calls.clear()
    _assert_tables_equal(sweep(smol_dump, grid, **options), df)
    assert len(svd_calls) == len(group_calls) == 2 * 2 and len(ref_calls) == 2
    assert all(call.shape[:2] == (2, 1) for call in svd_shapes[-4:])

    # sharing changes nothing: each config compressed alone gives the same rows
    alone = sweep(
        smol_dump, expand_grid(grid)[2:], layers=[1], kinds=("values",), heads=[2], progress=False
    )
    shared = df[
        (df["layer"] == 1) & (df["kind"] == "values") & (df["head"] == 2) & (df["rank"] == 4)
    ]
    assert alone["rel_fro"].iloc[0] == pytest.approx(shared["rel_fro"].iloc[0], rel=1e-12)
    assert alone["nbytes"].iloc[0] == shared["nbytes"].iloc[0]


# presets, bits and ranks: grouped quantizers, outliers, block-wise (kivi), whole-axis groups,
# power-iteration and SVD low rank
WIDE_GRID = {
    "method": ["gear", "gear-kcvt", "kivi", "quant"],
    "bits": [2, 4],
    "rank": [0, 1, 3],
    "lowrank": ["power", "svd"],
}


@pytest.mark.parametrize(
    "options",
    [
        dict(layers="0,4", samples=(0, 1), kinds=("keys", "values", "keys_pre_rope")),
        dict(layers=[2], heads=[2, 0], dtype=torch.float16),
        dict(layers=[1], per_head=False),
    ],
)
def test_batched_sweep_equals_one_head_and_config_at_a_time(smol_dump, options):
    """The batched path (heads compressed in one call, metrics on stacks) gives the table of
    the one-at-a-time path: sizes exactly, reconstruction metrics to float64 summation order,
    attention metrics to ATTENTION_RTOL; cutting the grid into tasks changes nothing,
    power-iteration ranks included."""
    fast = sweep(smol_dump, WIDE_GRID, progress=False, **options)
    slow = sweep(smol_dump, WIDE_GRID, progress=False, batch=False, **options)
    assert len(fast) == len(slow) > 0 and fast["nbytes"].equals(slow["nbytes"])
    _assert_tables_equal(fast, slow)
    chunked = sweep(smol_dump, WIDE_GRID, progress=False, configs_per_task=5, **options)
    _assert_tables_equal(chunked, fast)
    with pytest.raises(ConfigError, match="batch must be"):
        sweep(smol_dump, WIDE_GRID, batch=1, **options)


def test_identity_whole_layer_and_nan_attention(smol_dump):
    df = sweep(smol_dump, [get_preset("none")], layers=[2], per_head=False, progress=False)
    assert list(df["head"]) == [-1, -1]
    assert (df["rel_fro"] == 0).all() and (df["bits_per_entry"] == 32).all()  # float32 dump
    assert (df[list(ATTENTION_COLUMNS)] == 0).all().all()
    half = sweep(
        smol_dump,
        [get_preset("none"), get_preset("outlier-quant")],
        layers=[2],
        kinds=("values",),
        per_head=False,
        dtype=torch.float16,
        progress=False,
    )
    assert half["bits_per_entry"].iloc[0] == 16 and half["rel_fro"].iloc[0] == 0
    full = sweep(
        smol_dump,
        [get_preset("outlier-quant")],
        layers=[2],
        kinds=("values",),
        per_head=False,
        progress=False,
    )
    # outlier values are kept in the compressed dtype: 16 bits fewer per outlier in float16
    assert full["nbytes"].iloc[0] > half["nbytes"].iloc[1]

    off = sweep(
        smol_dump,
        {"method": ["kivi"]},
        layers=[2],
        kinds=("keys", "keys_pre_rope"),
        heads=[1],
        attention=False,
        progress=False,
    )
    assert off[list(ATTENTION_COLUMNS)].isna().all().all()
    assert (off["block_size"] == 64).all() and (off["rel_fro"] > 0).all()
    pre = sweep(
        smol_dump, {"method": ["kivi"]}, layers=[2], kinds=("keys_pre_rope",), progress=False
    )
    assert pre[list(ATTENTION_COLUMNS)].isna().all().all()


def test_expand_grid():
    configs = expand_grid({"method": ["gear", "kivi"], "bits": [2, 4], "rank": 2})
    assert [c.name for c in configs] == [
        "gear (bits=2, rank=2)",
        "gear (rank=2)",
        "kivi (rank=2)",
        "kivi (bits=4, rank=2)",
    ]
    assert [c.preset for c in configs] == ["gear", "gear", "kivi", "kivi"]
    assert configs[3].values.bits == 4 and configs[3].keys.rank == 2
    assert [c.name for c in expand_grid({"bits": [3]})] == ["gear (bits=3)"]
    with pytest.raises(ConfigError, match="unknown preset override"):
        expand_grid({"bitz": [2]})
    with pytest.raises(ConfigError, match="no values"):
        expand_grid({"bits": []})
    with pytest.raises(ConfigError, match="non-empty"):
        expand_grid({})


names = st.sampled_from(["bits", "rank", "group_size", "outliers", "key_bits", "loops"])
values = st.one_of(st.integers(0, 512), st.floats(0, 1, allow_nan=False), st.none(), st.booleans())


@settings(max_examples=50, deadline=None)
@given(grid=st.dictionaries(names, st.lists(values, min_size=1, max_size=4), min_size=1))
def test_parse_grid_round_trips(grid):
    def fmt(v):
        return "none" if v is None else str(v).lower() if isinstance(v, bool) else repr(v)

    text = "; ".join(f"{k.replace('_', '-')}={','.join(map(fmt, vs))}" for k, vs in grid.items())
    parsed = parse_grid(text)
    assert parsed == grid
    for k, vs in grid.items():
        assert [type(v) for v in parsed[k]] == [type(v) for v in vs]


def test_parse_grid_words_and_errors():
    assert parse_grid("method=none,gear-l;lowrank=svd;") == {
        "method": ["none", "gear-l"],
        "lowrank": ["svd"],
    }
    for bad in ("", "bits", "bits=", "bits=2,;rank=1", "bits=2;bits=4", "=2"):
        with pytest.raises(ConfigError, match="grid"):
            parse_grid(bad)


def test_bad_sweep_input(smol_dump):
    grid = [get_preset("quant")]
    with pytest.raises(ConfigError, match="kind must be"):
        sweep(smol_dump, grid, kinds=("queries",), progress=False)
    with pytest.raises(ConfigError, match="layers"):
        sweep(smol_dump, grid, layers=[99], progress=False)
    with pytest.raises(ConfigError, match="samples"):
        sweep(smol_dump, grid, samples=(5,), progress=False)
    with pytest.raises(ConfigError, match="heads"):
        sweep(smol_dump, grid, heads=[3], progress=False)
    with pytest.raises(ConfigError, match="CompressionConfig"):
        sweep(smol_dump, ["gear"], progress=False)
    with pytest.raises(ConfigError, match="no config"):
        sweep(smol_dump, [], progress=False)


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=25
    ).filter(lambda p: len({x for x, _ in p}) == len(p) and len({y for _, y in p}) == len(p))
)
def test_pareto_front_is_the_set_of_non_dominated_points(points) -> None:
    df = pd.DataFrame(points, columns=["bits", "err"], index=np.arange(len(points)) * 3 + 1)
    front = pareto_front(df, x="bits", y="err")
    expected = [
        not any(x2 < x and y2 < y for x2, y2 in points) for x, y in points
    ]  # distinct coordinates: weak and strict dominance agree
    assert front.tolist() == expected


def test_dumps_share_one_table(smol, smol_dump, tmp_path):
    from gear_lab import capture_dump

    # a second dump of fewer layers and no queries: its attention columns are NaN
    small = capture_dump(
        tmp_path / "small.h5",
        corpus="pydoc",
        max_tokens=64,
        layers=[0, 1],
        progress=False,
        loaded=smol,
    )
    grid = {"bits": [2, 4]}
    options = dict(layers="0-1", heads=[0], progress=False)
    both = sweep([smol_dump, small], grid, **options)
    assert list(both.columns[:3]) == ["model", "dump", "sample"]
    assert (both["model"] == "smollm2-135m").all()
    assert list(both["dump"].unique()) == [str(smol_dump), str(small)]
    for path in (smol_dump, small):
        alone = sweep(path, grid, **options)
        part = both[both["dump"] == str(path)].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, alone)
    assert both.loc[both["dump"] == str(small), "output_rel"].isna().all()
    assert both.loc[both["dump"] == str(smol_dump), "output_rel"].notna().all()
    # a selection is checked against every dump; a dump is given once
    with pytest.raises(ConfigError, match=r"small\.h5: layer 2 out of range"):
        sweep([smol_dump, small], grid, layers=[2], progress=False)
    with pytest.raises(ConfigError, match="holds no 'keys_pre_rope'"):
        sweep([smol_dump, small], grid, kinds=("keys_pre_rope",), progress=False)
    with pytest.raises(ConfigError, match="given twice"):
        sweep([small, str(small)], grid, progress=False)
    with pytest.raises(ConfigError, match="no dump"):
        sweep([], grid, progress=False)
