"""Sweep executors: a local Ray gives the serial table row for row, resumes from its shards,
names a failed task; without Ray, one line on what to install."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import shutil
import sys

import pandas as pd
import pytest

import gear_lab.sweeps as sweep_module
from gear_lab.cli import main
from gear_lab.errors import ConfigError, SweepError
from gear_lab.executors import RayExecutor, get_executor
from gear_lab.sweeps import sweep

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (gear-lab[ray])"
)
GRID = {"bits": [2, 4], "rank": [0, 2]}
OPTIONS = dict(layers="0,3", samples=(0, 1), heads=[0, 2], progress=False)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for the module (workers start once)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_dumps(smol_dump, tmp_path_factory):
    """The same small dump under two paths."""
    copy = tmp_path_factory.mktemp("copy") / "copy.h5"
    shutil.copyfile(smol_dump, copy)
    return [smol_dump, copy]


@needs_ray
def test_ray_equals_serial_and_resumes(local_ray, two_dumps, tmp_path):
    serial = sweep(two_dumps, GRID, **OPTIONS)
    shards = tmp_path / "shards"
    ray_sweep = functools.partial(
        sweep, two_dumps, GRID, executor=RayExecutor(shards=shards), configs_per_task=3
    )
    pd.testing.assert_frame_equal(ray_sweep(**OPTIONS), serial)
    files = sorted(shards.glob("*.parquet"))
    assert len(files) == 2 * 2 * 2 * 2  # dumps x samples x layers x config chunks (3 + 1)
    stamps = {p: p.stat().st_mtime_ns for p in files}

    files[0].unlink()  # a rerun computes only the missing shard
    pd.testing.assert_frame_equal(ray_sweep(**OPTIONS), serial)
    assert sorted(shards.glob("*.parquet")) == files
    assert [p for p in files if p.stat().st_mtime_ns != stamps[p]] == [files[0]]
    # other settings never reuse these shards; the default executor name works too
    other = dict(OPTIONS, attention=False)
    pd.testing.assert_frame_equal(ray_sweep(**other), sweep(two_dumps, GRID, **other))
    assert len(list(shards.glob("*.parquet"))) == 2 * len(files)
    single = sweep(two_dumps[0], GRID, executor="ray", **OPTIONS)
    pd.testing.assert_frame_equal(single, serial[serial["dump"] == str(two_dumps[0])])


@needs_ray
def test_a_failed_task_is_named_and_done_shards_are_kept(local_ray, smol_dump, tmp_path):
    with sweep_module.open_dump(smol_dump) as dump:
        tasks = sweep_module._tasks(
            dump, 0, kinds=["values"], layers=[0, 1], samples=(0,), heads=[0], per_head=True,
            attention=False, chunks=[(0,)],
        )  # fmt: skip
    tasks.append(dataclasses.replace(tasks[0], path=str(tmp_path / "gone.h5"), layer=7))
    job = sweep_module._Job((sweep_module.get_preset("kivi"),), ("values",), False, "cpu", None)
    fn = functools.partial(sweep_module._run_task, job, sweep_module._OpenDumps())
    shards = tmp_path / "shards"
    with pytest.raises(SweepError) as err:
        RayExecutor(shards=shards).run(fn, tasks, key="k", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "task gone.h5 sample 0 layer 7 config 0 failed: " in message
    assert "no such dump file" in message and f"2 of 3 shards kept in {shards}" in message
    assert len(list(shards.glob("*.parquet"))) == 2


@needs_ray
def test_cli_ray_sweep_of_two_dumps(local_ray, two_dumps, tmp_path, capsys):
    out = tmp_path / "t.parquet"
    argv = ["sweep", *map(str, two_dumps), "--grid", "bits=2,4", "--layers", "1", "--heads", "1"]
    argv += ["--out", str(out), "--executor", "ray", "--shards", str(tmp_path / "s")]
    code = main([*argv, "--configs-per-task", "1"])
    assert code == 0 and "wrote 8 rows (2 configs)" in capsys.readouterr().out
    assert len(list((tmp_path / "s").glob("*.parquet"))) == 2 * 2  # dumps x one-config tasks
    table = pd.read_parquet(out)
    assert list(table["dump"]) == [str(two_dumps[0])] * 4 + [str(two_dumps[1])] * 4
    serial = sweep(two_dumps, {"bits": [2, 4]}, layers=[1], heads=[1], progress=False)
    pd.testing.assert_frame_equal(table, serial)
    assert main([*argv[:-4], "--overwrite", "--configs-per-task", "0"]) == 2
    assert "configs_per_task must be a positive integer" in capsys.readouterr().err


def test_without_ray_one_line_names_the_extra(smol_dump, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'gear-lab\[ray\]'"):
        sweep(smol_dump, GRID, layers=[0], executor="ray", progress=False)
    out = tmp_path / "t.csv"
    code = main(
        ["sweep", str(smol_dump), "--grid", "bits=2", "--out", str(out), "--executor", "ray"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gear-lab: error: ") and len(err.strip().splitlines()) == 1
    assert "gear-lab[ray]" in err and not out.exists()
    code = main(["sweep", str(smol_dump), "--grid", "bits=2", "--out", str(out), "--address", "x"])
    assert code == 2 and "--executor ray" in capsys.readouterr().err


def test_get_executor():
    assert get_executor(None) == get_executor("serial")
    assert get_executor("ray") == RayExecutor()
    with pytest.raises(ConfigError, match="executor must be one of serial, ray"):
        get_executor("dask")
    with pytest.raises(ConfigError, match="address"):
        RayExecutor(address="")
    with pytest.raises(ConfigError, match="configs_per_task"):
        sweep("unused.h5", GRID, configs_per_task=0)


def test_a_worker_keeps_its_last_dumps_open_and_reopens_a_changed_file(smol_dump, tmp_path):
    """What a task that runs elsewhere does: its (empty, unpickled) open-dump table opens the
    dump once per worker, reopens it when the file changes, and keeps at most a few open."""
    import os
    import pickle

    copies = []
    for i in range(sweep_module._WORKER_DUMPS + 1):
        copies.append(tmp_path / f"copy{i}.h5")
        shutil.copy(smol_dump, copies[-1])
    sweep_module._worker_dumps.clear()
    remote = pickle.loads(pickle.dumps(sweep_module._OpenDumps()))
    path = str(copies[0])
    mtime = os.stat(path).st_mtime_ns
    with remote.get_dump(path) as first:
        pass
    with remote.get_dump(path) as again:
        assert again is first
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # the file changed
    with remote.get_dump(path) as changed:
        assert changed is not first and changed.layers == first.layers
    for copy in copies[1:]:
        with remote.get_dump(str(copy)):
            pass
    assert len(sweep_module._worker_dumps) == sweep_module._WORKER_DUMPS
    assert all(str(copies[0]) != key[0] for key in sweep_module._worker_dumps)
    for dump in sweep_module._worker_dumps.values():
        dump.close()
    sweep_module._worker_dumps.clear()
