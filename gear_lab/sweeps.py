"""Sweeps: compress every (sample, layer, head, kind) of one or more dumps with every config of a
grid and return one tidy :class:`pandas.DataFrame` of measured sizes and errors.

Work is shared where results allow: configs of one kind that differ only in ``rank`` share one
compression through :func:`gear_lab.compression.compress_ranks` (one low-rank fit per matrix for
every rank, the GEAR error-vs-rank study of Kang et al. 2024), the heads of a layer are compressed
in one call (each its own matrix), the reconstruction metrics of many configs are computed on one
stack, and the exact attention of each (sample, layer) is computed once per task
(:func:`gear_lab.metrics.attention_reference`).

The work is cut into tasks, one per (dump, sample, layer, chunk of configs), that an executor
(:mod:`gear_lab.executors`: this process, or a Ray cluster) runs; their rows merge into the same
table whatever ran them.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import pandas as pd
import torch

from gear_lab import metrics
from gear_lab.capture import parse_indices
from gear_lab.compression import (
    Compressed,
    CompressionConfig,
    TensorCompression,
    compress_ranks,
    get_preset,
)
from gear_lab.compression.config import CUSTOM
from gear_lab.constants import COMPRESSIBLE_KINDS
from gear_lab.dump import Dump, open_dump
from gear_lab.errors import ConfigError
from gear_lab.executors import Executor, get_executor
from gear_lab.models import resolve_device

__all__ = [
    "ATTENTION_COLUMNS",
    "RECONSTRUCTION_COLUMNS",
    "expand_grid",
    "pareto_front",
    "parse_grid",
    "sweep",
]

DumpSource: TypeAlias = Dump | str | os.PathLike[str]
RECONSTRUCTION_COLUMNS = ("rel_fro", "max_abs", "cosine", "snr_db")
ATTENTION_COLUMNS = ("score_rel", "kl", "tv", "output_rel")
# the batched path decompresses and measures as many configs at once as keep their float64
# reconstructions under this size
_STACK_BYTES = 2**27
# its reconstruction metrics go a few configs at a time, their float64 copies under this size
# (cache-resident: ~7x faster than the whole stack at once, the same values)
_RECONSTRUCTION_BYTES = 2**21


def expand_grid(grid: Mapping[str, Any]) -> list[CompressionConfig]:
    """The Cartesian product of a grid of preset overrides, one config per combination.

    ``grid`` maps ``"method"`` to preset names (default ``["gear"]``) and any other key to the
    values of a :func:`gear_lab.compression.get_preset` override (``bits``, ``group_size``, ``rank``,
    ``outliers``, ``key_bits``, ``block_size``, ...); a scalar counts as a one-value list.
    Example: ``{"method": ["gear"], "bits": [2, 4], "rank": [0, 2]}`` -> four configs labelled
    by what differs from the preset (:func:`gear_lab.compression.config_label`):
    ``gear (bits=2, rank=0)``, ``gear (bits=2, rank=2)``, ``gear (rank=0)``, ``gear (rank=2)``.
    """
    if not isinstance(grid, Mapping) or not grid:
        raise ConfigError("a grid must be a non-empty mapping of setting -> list of values")

    def values(key: str, value: Any) -> list[Any]:
        seq = list(value) if isinstance(value, list | tuple) else [value]
        if not seq:
            raise ConfigError(f"grid setting {key!r} has no values")
        return seq

    methods = values("method", grid.get("method", ["gear"]))
    keys = [k for k in grid if k != "method"]
    choices = [values(k, grid[k]) for k in keys]
    return [
        get_preset(method, **dict(zip(keys, combo, strict=True)))
        for method in methods
        for combo in itertools.product(*choices)
    ]


def _grid_value(text: str) -> Any:
    """``none`` / ``true`` / ``false`` / an int / a float, else the word itself."""
    lowered = text.lower()
    if lowered in ("none", "true", "false"):
        return {"none": None, "true": True, "false": False}[lowered]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_grid(text: str) -> dict[str, list[Any]]:
    """Parse the grid grammar ``NAME=V1,V2,...;NAME=...`` into a mapping for :func:`expand_grid`.

    NAME is ``method`` or a :func:`gear_lab.compression.get_preset` override (``-`` may stand for
    ``_``: ``group-size``); ``method`` takes preset names, every other value is an integer, a
    float, ``none``, ``true``/``false`` or a word (an axis, ``svd``, ...). Example: ``"method=gear,gear-l;bits=2,4;rank=0,2,4"``.
    """
    grid: dict[str, list[Any]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, values = entry.partition("=")
        name = name.strip().replace("-", "_")
        items = [v.strip() for v in values.split(",")]
        if not sep or not name or not all(items):
            raise ConfigError(f"bad grid entry {entry!r}: expected NAME=V1,V2,...")
        if name in grid:
            raise ConfigError(f"bad grid: {name!r} appears twice")
        grid[name] = items if name == "method" else [_grid_value(v) for v in items]
    if not grid:
        raise ConfigError(f"bad grid {text!r}: expected NAME=V1,V2,...;NAME=...")
    return grid


def _configs(grid: Sequence[CompressionConfig] | Mapping[str, Any]) -> list[CompressionConfig]:
    if isinstance(grid, Mapping):
        return expand_grid(grid)
    configs = list(grid)
    if not configs:
        raise ConfigError("the grid holds no config")
    for config in configs:
        if not isinstance(config, CompressionConfig):
            raise ConfigError(
                f"grid entries must be CompressionConfig, got {type(config).__name__}"
            )
    return configs


def _compress_all(
    x: torch.Tensor, configs: Sequence[CompressionConfig], chunk: Sequence[int], kind: str
) -> list[tuple[int, Compressed]]:
    """``(config index, Compressed of x)`` for the configs at ``chunk`` (indices into
    ``configs``, the whole grid), in chunk order.

    Configs whose ``kind`` settings and other settings (``block_size``, ...) differ only in
    ``rank`` are served by one ``compress_ranks`` call (shared outliers and quantization, one
    low-rank fit at the largest rank). That call always includes the largest rank of the group
    in the whole grid, so a row does not depend on how the grid is cut into tasks
    (power-iteration ranks depend on it).
    """
    groups: dict[tuple[TensorCompression, tuple[Any, ...]], list[int]] = {}
    for i, config in enumerate(configs):
        base = dataclasses.replace(config.for_kind(kind), rank=0)
        whole = tuple(
            getattr(config, f.name)
            for f in dataclasses.fields(config)
            if f.name not in ("keys", "values", "name", "preset")
        )  # block_size and every other setting of the whole config
        groups.setdefault((base, whole), []).append(i)
    wanted = set(chunk)
    out: dict[int, Compressed] = {}
    for members in groups.values():
        ranks = {i: configs[i].for_kind(kind).rank for i in members}
        needed = [i for i in members if i in wanted]
        if not needed:
            continue
        distinct = sorted({ranks[i] for i in needed} | {max(ranks.values())})
        packed = dict(
            zip(distinct, compress_ranks(x, configs[members[0]], distinct, kind), strict=True)
        )
        out.update((i, packed[ranks[i]]) for i in needed)
    return [(i, out[i]) for i in chunk]


@functools.lru_cache(maxsize=1024)
def _settings(config: CompressionConfig, kind: str) -> dict[str, Any]:
    """The method-parameter columns of one row (cached: every layer's rows repeat them; callers
    copy, never change, the dict)."""
    return {
        "preset": config.preset or CUSTOM,
        **dataclasses.asdict(config.for_kind(kind)),
        "block_size": config.block_size,
        "prefill_rank": config.prefill_rank,
        "sinks": config.sinks,
    }


def pareto_front(df: pd.DataFrame, *, x: str, y: str) -> pd.Series:
    """Boolean mask of the rows of a sweep table not dominated in (lower ``x``, lower ``y``)."""
    order = df.sort_values([x, y]).index
    best = math.inf
    keep = pd.Series(False, index=df.index)
    for i in order:
        if df.at[i, y] < best:
            keep[i] = True
            best = df.at[i, y]
    return keep


def _pick(what: str, wanted: str | Sequence[int] | None, available: Sequence[int]) -> list[int]:
    """``wanted`` (None: all; a spec like ``"0,2-4"`` or indices) among ``available`` (sorted)."""
    available = list(available)
    picked = parse_indices(wanted, available[-1] + 1, what) if wanted is not None else available
    have = set(available)
    missing = next((i for i in picked if i not in have), None)
    if missing is not None:
        raise ConfigError(
            f"{what} {missing} not in the dump (it has {len(available)} {what}s, "
            f"{available[0]}-{available[-1]})"
        )
    return picked


def _reference(
    dump: Dump, layer: int, sample: int, device: torch.device, dtype: torch.dtype | None
) -> metrics.AttentionReference:
    """Exact attention of one (sample, layer) from the dump's queries, keys and values."""
    info = dump.layer_info(layer)
    load = dict(layer=layer, sample=sample, device=device)
    return metrics.attention_reference(
        dump.load("queries", **load)[None],
        dump.load("keys", dtype=dtype, **load)[None],
        dump.load("values", dtype=dtype, **load)[None],
        scaling=info.get("scaling"),
        sliding_window=info.get("sliding_window"),
        softcap=info.get("softcap"),
    )


@dataclass(frozen=True)
class _Job:
    """What every task of a sweep shares (it travels to workers, so it holds no open file)."""

    configs: tuple[CompressionConfig, ...]
    kinds: tuple[str, ...]
    attention: bool
    device: str
    dtype: torch.dtype | None
    batch: bool = True


@dataclass(frozen=True)
class _Task:
    """One (dump, sample, layer, chunk of configs) of a sweep."""

    path: str  # absolute: a worker opens it whatever its working folder
    modified: int  # the dump's mtime (ns): shards of an older file at that path are not reused
    label: str  # the dump as given, the ``dump`` column
    model: str
    index: int  # of the dump in the sweep
    sample: int
    layer: int
    heads: tuple[int, ...]  # (-1,): the whole layer
    configs: tuple[int, ...]  # indices into _Job.configs
    with_attention: bool

    @property
    def name(self) -> str:
        """``dump.h5 sample 0 layer 3 configs 0-9`` (``config 4`` for a chunk of one)."""
        first, last = self.configs[0], self.configs[-1]
        chunk = f"config {first}" if first == last else f"configs {first}-{last}"
        return f"{Path(self.path).name} sample {self.sample} layer {self.layer} {chunk}"

    @property
    def shard(self) -> str:
        """``d0-s0-l3-c0``: a file-name-safe stem unique within the sweep."""
        return f"d{self.index}-s{self.sample}-l{self.layer}-c{self.configs[0]}"


class _OpenDumps(dict[str, Dump]):
    """The dumps this process holds open, by absolute path. It pickles empty, so a task that
    runs elsewhere opens its dump there (read-only): a worker keeps its last
    ``_WORKER_DUMPS`` dumps open for its next tasks (opening validates every object of the
    file, ~30 ms for the demo dump), reopening one whose file changed since."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return (_OpenDumps, ())

    @contextmanager
    def get_dump(self, path: str) -> Iterator[Dump]:
        """The open dump at ``path``."""
        if path in self:
            yield self[path]
            return
        try:
            key = (path, os.stat(path).st_mtime_ns)
        except OSError:  # open_dump says what is wrong
            key = (path, -1)
        dump = _worker_dumps.pop(key, None)
        if dump is None:
            dump = open_dump(path)
        _worker_dumps[key] = dump  # most recent last
        while len(_worker_dumps) > _WORKER_DUMPS:
            _worker_dumps.pop(next(iter(_worker_dumps))).close()
        yield dump


_WORKER_DUMPS = 4
_worker_dumps: dict[tuple[str, int], Dump] = {}  # by (path, mtime in ns)


def _run_task(job: _Job, dumps: _OpenDumps, task: _Task) -> list[dict[str, Any]]:
    """The rows of one task, ordered by kind, head, config."""
    device = torch.device(job.device)
    measure = _measure_batched if job.batch else _measure_alone
    rows: list[dict[str, Any]] = []
    with dumps.get_dump(task.path) as dump:
        ref = None
        if task.with_attention:
            ref = _reference(dump, task.layer, task.sample, device, job.dtype)
        for kind in job.kinds:
            x = dump.load(kind, task.layer, sample=task.sample, device=device, dtype=job.dtype)
            kind_ref = None if kind == "keys_pre_rope" else ref  # pre-RoPE keys: no attention
            settings = {i: _settings(job.configs[i], kind) for i in task.configs}
            for head, i, (nbytes, numel), measured in measure(job, task, kind, x[None], kind_ref):
                rows.append(
                    {
                        "model": task.model,
                        "dump": task.label,
                        "sample": task.sample,
                        "layer": task.layer,
                        "head": head,
                        "kind": kind,
                        "config": job.configs[i].name,
                        "config_index": i,
                        **settings[i],
                        "nbytes": nbytes,
                        "numel": numel,
                        "bits_per_entry": 8 * nbytes / numel,
                        **measured,
                    }
                )
    return rows


# (head, config index, (stored bytes, entries) of the head's Compressed, metrics)
_Measured: TypeAlias = Iterator[tuple[int, int, tuple[int, int], dict[str, float]]]


def _measure_alone(
    job: _Job,
    task: _Task,
    kind: str,
    x: torch.Tensor,
    ref: metrics.AttentionReference | None,
) -> _Measured:
    """``(head, config index, (nbytes, numel), metrics)`` per head and config of the task,
    each head compressed alone and each config measured alone (least memory)."""
    for head in task.heads:
        part = x if head < 0 else x[:, head : head + 1]
        sel = None if head < 0 else slice(head, head + 1)
        for i, packed in _compress_all(part, job.configs, task.configs, kind):
            x_hat = packed.decompress()
            att = dict.fromkeys(ATTENTION_COLUMNS, math.nan)
            if ref is not None:
                replaced = {"k_hat" if kind == "keys" else "v_hat": x_hat}
                att = ref.error(**replaced, kv_heads=sel)
            sizes = (packed.nbytes, packed.numel)
            yield head, i, sizes, {**metrics.reconstruction(part, x_hat), **att}


def _measure_batched(
    job: _Job,
    task: _Task,
    kind: str,
    x: torch.Tensor,
    ref: metrics.AttentionReference | None,
) -> _Measured:
    """What :func:`_measure_alone` yields, with the task's heads compressed in one call per
    group of configs (each head a leading element ``[heads, 1, seq, head_dim]``, so its
    statistics and low rank are its own) and the reconstruction metrics computed on stacks of
    configs, as many at once as keep their float64 copies under ``_STACK_BYTES``."""
    whole = task.heads == (-1,)
    stack = x if whole else x[0, list(task.heads)].unsqueeze(1)  # [units, 1 | kv, seq, d]
    packed = _compress_all(stack, job.configs, task.configs, kind)
    step = max(1, _STACK_BYTES // (stack.numel() * 8))  # float64 reconstructions per config
    columns: dict[str, list[list[float]]] = {name: [] for name in RECONSTRUCTION_COLUMNS}
    columns |= {name: [] for name in ATTENTION_COLUMNS}
    for start in range(0, len(packed), step):
        x_hat = torch.stack([p.decompress() for _, p in packed[start : start + step]])
        for name, values in _stack_metrics(task, kind, stack, x_hat, ref).items():
            columns[name] += values
    # every head's selection holds the same bytes (select takes dim 0 of every kept tensor), so
    # the first head's selection gives each head's stored size
    first = torch.tensor([0], device=x.device)
    heads = [p if whole else p.select(first) for _, p in packed]
    sizes = [(one.nbytes, one.numel) for one in heads]
    for u, head in enumerate(task.heads):
        for c, (i, _) in enumerate(packed):
            yield head, i, sizes[c], {name: values[c][u] for name, values in columns.items()}


def _stack_metrics(
    task: _Task,
    kind: str,
    stack: torch.Tensor,
    x_hat: torch.Tensor,
    ref: metrics.AttentionReference | None,
) -> dict[str, list[list[float]]]:
    """Every metric column as ``[config][unit]`` for reconstructions ``x_hat``
    ``[configs, units, 1 | kv, seq, d]`` of ``stack`` ``[units, 1 | kv, seq, d]``."""
    n, units = x_hat.shape[:2]
    dim = stack.shape[-1]
    step = max(1, _RECONSTRUCTION_BYTES // (stack.numel() * 8))
    rec = [
        metrics.reconstruction_profile(
            stack.expand_as(part).reshape(1, -1, stack[0].numel() // dim, dim),
            part.reshape(1, -1, stack[0].numel() // dim, dim),
            by="head",
        )
        for part in x_hat.split(step)
    ]
    columns = {
        name: torch.cat([r[name] for r in rec]).view(n, units).tolist()
        for name in RECONSTRUCTION_COLUMNS
    }
    if ref is None:
        return columns | dict.fromkeys(ATTENTION_COLUMNS, [[math.nan] * units] * n)
    replaced = "k_hat" if kind == "keys" else "v_hat"
    sel = [None] if task.heads == (-1,) else [slice(h, h + 1) for h in task.heads]
    # unit u as a batch of one: [configs, 1, 1 | kv, seq, d]
    att = [
        ref.error_stack(**{replaced: x_hat[:, u : u + 1]}, kv_heads=s) for u, s in enumerate(sel)
    ]
    return columns | {
        name: torch.stack([a[name] for a in att], dim=1).tolist() for name in ATTENTION_COLUMNS
    }


def _tasks(
    dump: Dump,
    index: int,
    *,
    kinds: Sequence[str],
    layers: str | Sequence[int] | None,
    samples: str | Sequence[int],
    heads: str | Sequence[int] | None,
    per_head: bool,
    attention: bool,
    chunks: Sequence[tuple[int, ...]],
) -> list[_Task]:
    """The tasks of one dump, checked against what it holds: sample, then layer, then chunk."""
    for kind in kinds:
        if kind not in dump.kinds:
            raise ConfigError(f"{dump.path} holds no {kind!r} (it has {', '.join(dump.kinds)})")
    try:
        layer_list = _pick("layer", layers, sorted(dump.layers))
        sample_list = _pick("sample", samples, range(dump.num_samples))
        head_list = _pick("head", heads, range(dump.num_kv_heads)) if per_head else [-1]
    except ConfigError as err:
        raise ConfigError(f"{dump.path}: {err}") from None
    return [
        _Task(
            path=os.path.abspath(dump.path),
            modified=dump.path.stat().st_mtime_ns,
            label=str(dump.path),
            model=dump.model_id,
            index=index,
            sample=sample,
            layer=layer,
            heads=tuple(head_list),
            configs=chunk,
            with_attention=attention and "queries" in dump.kinds,
        )
        for sample, layer in itertools.product(sample_list, layer_list)
        for chunk in chunks
    ]


def _merge(
    tasks: Sequence[_Task], results: Sequence[list[dict[str, Any]]], kinds: Sequence[str]
) -> pd.DataFrame:
    """One table from the rows of every task: dump, sample, layer (task order), then kind,
    head, config; the same whether a (sample, layer) ran as one task or as several chunks."""
    kind_pos = {kind: i for i, kind in enumerate(kinds)}
    rows: list[dict[str, Any]] = []
    pairs = zip(tasks, results, strict=True)
    for _, unit in itertools.groupby(pairs, key=lambda p: (p[0].index, p[0].sample, p[0].layer)):
        unit = list(unit)
        head_pos = {head: i for i, head in enumerate(unit[0][0].heads)}
        unit_rows = [row for _, task_rows in unit for row in task_rows]
        unit_rows.sort(key=lambda r: (kind_pos[r["kind"]], head_pos[r["head"]], r["config_index"]))
        rows.extend(unit_rows)
    return pd.DataFrame(rows)


def sweep(
    dump: DumpSource | Sequence[DumpSource],
    grid: Sequence[CompressionConfig] | Mapping[str, Any],
    layers: str | Sequence[int] | None = None,
    kinds: Sequence[str] = ("keys", "values"),
    samples: str | Sequence[int] = (0,),
    heads: str | Sequence[int] | None = None,
    attention: bool = True,
    progress: bool = True,
    per_head: bool = True,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    executor: str | Executor | None = None,
    configs_per_task: int | None = None,
    batch: bool = True,
) -> pd.DataFrame:
    """Compress the tensors of one or more dumps with every config of ``grid``, measure each.

    ``dump``: an open :class:`Dump` or a path, or a list of them (one table, told apart by the
    ``model`` and ``dump`` columns). ``grid``: configs, or a mapping for :func:`expand_grid`.
    ``layers``: ``None`` (all in each dump), a spec like ``"0,5,10-12"`` or indices; ``samples``
    and ``heads`` (KV heads; ``None``: all) likewise, checked against every dump. ``device``: see
    :func:`gear_lab.models.resolve_device`. With ``per_head`` each KV head
    (``[1, 1, seq, head_dim]``) is compressed and measured alone; without it the whole layer
    (``[1, kv_heads, seq, head_dim]``) is, and ``head`` is -1. ``dtype``: the dtype K/V are
    compressed in (e.g. ``torch.float16``, as a real cache holds them; ``None``: as stored),
    which also fixes the dtype of kept full-precision parts such as outlier values.

    ``executor``: where the tasks run, one per (dump, sample, layer, chunk of
    ``configs_per_task`` configs; ``None``: all configs in one task): ``"serial"`` / ``None``
    (this process), ``"ray"`` or a :class:`gear_lab.executors.RayExecutor` (a Ray cluster,
    resumable Parquet shards). Every executor returns the same table, row for row.

    ``batch``: compress the selected heads of a layer in one call per group of configs (each
    head still its own matrix) and compute the reconstruction metrics of many configs on one
    stack (at most 128 MiB of float64 copies at a time); ``False``: one head and one config at a
    time (least memory, slower) and the attention metrics in float64 by
    :meth:`gear_lab.metrics.AttentionReference.error`, where the batched path computes them for
    all configs at once in float32 on differences (``error_stack``). Both give the same table
    up to float64 summation order (~1e-12 relative), the attention metrics to ~1e-6 relative.

    One row per dump x sample x layer x head x kind x config, columns: ``model, dump`` (the
    dump's model id and path as given), ``sample, layer, head, kind, config`` (its name),
    ``config_index, preset`` (``custom`` when built by hand), every :class:`TensorCompression`
    field of that kind, ``block_size, prefill_rank, sinks``, the measured ``nbytes, numel,
    bits_per_entry``, the reconstruction metrics ``rel_fro, max_abs, cosine, snr_db`` and the
    attention metrics ``score_rel, kl, tv, output_rel`` (keys rows compress keys only and use
    exact values, values rows the reverse; NaN when ``attention`` is off, the dump has no
    queries, or for ``keys_pre_rope``).
    """
    configs = _configs(grid)
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    if not kinds:
        raise ConfigError("kinds selects nothing")
    for kind in kinds:
        if kind not in COMPRESSIBLE_KINDS:
            raise ConfigError(f"kind must be one of {', '.join(COMPRESSIBLE_KINDS)}, got {kind!r}")
    if not isinstance(batch, bool):
        raise ConfigError(f"batch must be True or False, got {batch!r}")
    per_task = len(configs) if configs_per_task is None else configs_per_task
    if isinstance(per_task, bool) or not isinstance(per_task, int) or per_task < 1:
        raise ConfigError(f"configs_per_task must be a positive integer, got {per_task!r}")
    chunks = [
        tuple(range(start, min(start + per_task, len(configs))))
        for start in range(0, len(configs), per_task)
    ]
    runner = get_executor(executor)
    job = _Job(tuple(configs), tuple(kinds), attention, str(resolve_device(device)), dtype, batch)
    sources = [dump] if isinstance(dump, Dump | str | os.PathLike) else list(dump)
    if not sources:
        raise ConfigError("no dump given")
    selection = dict(layers=layers, samples=samples, heads=heads, per_head=per_head)
    with ExitStack() as stack:
        dumps = _OpenDumps()
        tasks: list[_Task] = []
        for source in sources:
            opened = source if isinstance(source, Dump) else stack.enter_context(open_dump(source))
            path = os.path.abspath(opened.path)
            if path in dumps:
                raise ConfigError(f"dump {opened.path} is given twice")
            dumps[path] = opened
            tasks += _tasks(
                opened, len(dumps) - 1, kinds=kinds, attention=attention, chunks=chunks, **selection
            )
        fn = functools.partial(_run_task, job, dumps)
        results = runner.run(fn, tasks, key=repr(job), progress=progress)
    return _merge(tasks, results, kinds)
