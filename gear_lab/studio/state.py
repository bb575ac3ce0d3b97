"""Shared state of the studio: the current dump, cached loaders and computations, shared widgets.

Caching (so a slider redraws in well under a second on a CPU):
- the model loads once per process (``st.cache_resource``);
- dump slices, compressions, spectra and statistics are ``st.cache_data`` keyed on the dump's
  path and modification time plus everything the result depends on (sample, layer, kind and
  the compression config as JSON). They return numpy arrays and plain dicts.

Every page gets its dump through :func:`require_dump` and its compression settings through
:func:`method_settings`, so the explorer, spectra, outliers, sweeps and live pages share one
widget block. Errors a user can cause (:class:`gear_lab.errors.GearLabError`) are shown with
:func:`show_error` as one line, never a traceback.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st
import torch

from gear_lab import metrics
from gear_lab.compression import CompressionConfig, compress, get_preset, preset_descriptions
from gear_lab.compression.config import (
    CONFIG_SETTINGS,
    TENSOR_SETTINGS,
    Setting,
    format_value,
)
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.dump import open_dump
from gear_lab.errors import DumpError, GearLabError, OutputError
from gear_lab.files import atomic_write
from gear_lab.studio import DUMP_ENV
from gear_lab.sweeps import sweep

DUMP_KEY = "dump_path"  # session-state key of the dump chosen on the Dumps page
DUMPS_DIR = Path("dumps")
UPLOAD_PREFIX = "gear-lab-uploads-"  # of this process's private upload folder (mkdtemp)

# the settings of the method widgets, by name: the same table the CLI flags come from
SETTINGS: dict[str, Setting] = {s.name: s for s in (*TENSOR_SETTINGS, *CONFIG_SETTINGS)}


# --------------------------------------------------------------------------- errors


def show_error(err: Exception) -> None:
    """One-line error message in the page (the exception's own message, no traceback)."""
    st.error(f"{type(err).__name__}: {err}", icon=":material/error:")


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a :class:`GearLabError` raised inside as one line and stop this page's run."""
    try:
        yield
    except GearLabError as err:
        show_error(err)
        st.stop()


# --------------------------------------------------------------------------- the dump


def dump_candidates() -> list[Path]:
    """Dumps the app can offer: the one given to ``gear-lab app``, then ``dumps/*.h5``."""
    found: list[Path] = []
    env = os.environ.get(DUMP_ENV)
    if env:
        found.append(Path(env).resolve())
    if DUMPS_DIR.is_dir():
        found += sorted(p.resolve() for p in DUMPS_DIR.glob("*.h5"))
    return list(dict.fromkeys(found))


def current_dump() -> Path | None:
    """The chosen dump: the Dumps page's choice, else ``gear-lab app``'s, else the first found."""
    chosen = st.session_state.get(DUMP_KEY)
    if chosen:
        return Path(chosen)
    found = dump_candidates()
    return found[0] if found else None


def dump_key(path: Path) -> tuple[str, float]:
    """Cache key of a dump file: its path and modification time (a rewrite invalidates)."""
    try:
        return str(path), path.stat().st_mtime
    except OSError as err:
        raise GearLabError(f"cannot read dump {path}: {err.strerror}") from None


def require_dump() -> tuple[tuple[str, float], dict[str, Any]]:
    """The current dump's cache key and :func:`dump_info`; stops the page when there is none."""
    path = current_dump()
    if path is None:
        st.info("No dump yet: choose, upload or capture one on the Dumps page.")
        st.page_link("app_pages/dumps.py", label="Go to Dumps", icon=":material/database:")
        st.stop()
    with user_errors():
        key = dump_key(path)
        info = dump_info(*key)
    st.sidebar.caption(f"dump: `{Path(key[0]).name}` ({info['model_id']})")
    return key, info


_upload_dir: Path | None = None  # made on the first upload, see upload_dir()


def upload_dir() -> Path:
    """This process's private upload folder: made by ``tempfile.mkdtemp`` (a fresh random name,
    mode 0700) on first use, made anew if it stops being a private folder of this user, and
    removed when the process exits."""
    global _upload_dir
    if _upload_dir is None or not _is_private_dir(_upload_dir):
        _upload_dir = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX))
        atexit.register(shutil.rmtree, _upload_dir, ignore_errors=True)
    return _upload_dir


def _is_private_dir(folder: Path) -> bool:
    """A real folder (not a symlink) owned by this user, with no group / other permissions."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def upload_name(name: str, digest: str) -> str:
    """The plain file name an upload named ``name`` is stored under: ``<stem>-<digest>.h5``,
    the stem reduced to ``[A-Za-z0-9_.-]`` of the last path part. A name holding NUL or a
    ``..`` part, or with no usable stem, raises :class:`DumpError`."""
    parts = re.split(r"[\\/]", name)
    stem = re.sub(r"[^\w.-]+", "-", Path(parts[-1]).stem, flags=re.ASCII).strip(".-")
    if "\0" in name or ".." in parts or not stem:
        raise DumpError(f"invalid upload file name {name!r:.80}")
    return f"{stem[:80]}-{digest}.h5"


def save_upload(name: str, data: bytes, limit_mb: int) -> Path:
    """Store an uploaded file in :func:`upload_dir` (atomically) and validate it as a dump.

    Uploads are only ever read as HDF5 through :func:`open_dump` (never unpickled); a bad name,
    one over ``limit_mb`` or not a valid dump raises :class:`DumpError` and leaves no file
    behind. Files are created exclusively and without following symlinks (see
    ``docs/security.md``).
    """
    if len(data) > limit_mb * 2**20:
        raise DumpError(
            f"{name!r:.80} is {len(data) / 2**20:.1f} MB, over the {limit_mb} MB upload limit"
        )
    folder = upload_dir()
    out = folder / upload_name(name, hashlib.sha256(data).hexdigest()[:12])
    try:  # a new exclusive temporary file, renamed over a link at ``out``, never through it
        with atomic_write(out) as part:
            part.write_bytes(data)
    except OutputError as err:
        raise DumpError(f"cannot store the upload: {err}") from None
    try:
        open_dump(out).close()
    except GearLabError:
        out.unlink(missing_ok=True)
        raise
    return out


@st.cache_data(show_spinner=False, max_entries=16)
def dump_info(path: str, mtime: float) -> dict[str, Any]:
    """Everything a page needs to lay out its selectors (validated by :func:`open_dump`)."""
    del mtime  # cache key only
    with open_dump(path) as dump:
        return {
            "path": path,
            "model_id": dump.model_id,
            "num_samples": dump.num_samples,
            "layers": list(dump.layers),
            "num_heads": dump.num_heads,
            "num_kv_heads": dump.num_kv_heads,
            "head_dim": dump.head_dim,
            "kinds": tuple(dump.kinds),
            "seq_lens": [dump.seq_len(s) for s in range(dump.num_samples)],
            "texts": [dump.text(s) for s in range(dump.num_samples)],
            "summary": dump.summary(),
            "config": dict(dump.config),
            "metadata": dict(dump.metadata),
            "layer_info": {layer: dict(dump.layer_info(layer)) for layer in dump.layers},
        }


@st.cache_data(show_spinner=False, max_entries=128)
def load_slice(path: str, mtime: float, kind: str, layer: int, sample: int) -> np.ndarray:
    """One layer's ``kind`` tensor of one sample, float32 ``[kv_heads | heads, seq, head_dim]``."""
    del mtime
    with open_dump(path) as dump:
        return dump.load(kind, layer, sample=sample, dtype=torch.float32).numpy()


def tensor(key: tuple[str, float], kind: str, layer: int, sample: int) -> torch.Tensor:
    """:func:`load_slice` as ``[1, kv_heads, seq, head_dim]`` (the library's layout)."""
    return torch.from_numpy(load_slice(*key, kind, layer, sample))[None]


# --------------------------------------------------------------------------- computations


def _config(config_json: str) -> CompressionConfig:
    return CompressionConfig.from_json(config_json)


@st.cache_data(show_spinner=False, max_entries=64)
def compress_slice(
    path: str, mtime: float, kind: str, layer: int, sample: int, config_json: str
) -> dict[str, Any]:
    """Compress one layer's ``kind`` tensor ``[1, kv_heads, seq, head_dim]`` with the config.

    Returns the reconstruction ``x_hat`` and kept-outlier ``mask`` (``[kv_heads, seq, d]``),
    the whole-layer reconstruction metrics, measured ``bits_per_entry``, ``nbytes`` and
    ``bytes_by_part``.
    """
    x = tensor((path, mtime), kind, layer, sample)
    c = compress(x, _config(config_json), kind=kind)
    x_hat = c.decompress()
    return {
        "x_hat": x_hat[0].numpy(),
        "mask": c.outlier_mask()[0].numpy(),
        "metrics": metrics.reconstruction(x, x_hat),
        "bits_per_entry": float(c.bits_per_entry),
        "nbytes": int(c.nbytes),
        "numel": int(c.numel),
        "bytes_by_part": {k: int(v) for k, v in c.bytes_by_part().items()},
    }


@st.cache_resource(show_spinner=False, max_entries=4)
def attention_reference(path: str, mtime: float, layer: int, sample: int) -> Any:
    """Exact causal attention of one layer (:func:`gear_lab.metrics.attention_reference`, from
    the dump's queries, keys and values with the layer's scaling, sliding window and softcap),
    computed once and compared against every compressed variant."""
    key = (path, mtime)
    li = dump_info(path, mtime)["layer_info"][layer]
    return metrics.attention_reference(
        tensor(key, "queries", layer, sample),
        tensor(key, "keys", layer, sample),
        tensor(key, "values", layer, sample),
        scaling=li.get("scaling"),
        sliding_window=li.get("sliding_window"),
        softcap=li.get("softcap"),
    )


@st.cache_data(show_spinner=False, max_entries=64)
def attention_slice(
    path: str, mtime: float, kind: str, layer: int, sample: int, head: int, config_json: str
) -> dict[str, float]:
    """Attention error of KV head ``head`` (and its query heads) when only ``kind`` (keys or
    values) is compressed; see :func:`gear_lab.metrics.attention_error` for the metrics."""
    ref = attention_reference(path, mtime, layer, sample)
    res = compress_slice(path, mtime, kind, layer, sample, config_json)
    x_hat = torch.from_numpy(res["x_hat"][head : head + 1])[None]
    sel = slice(head, head + 1)
    return (
        ref.error(k_hat=x_hat, kv_heads=sel)
        if kind == "keys"
        else ref.error(v_hat=x_hat, kv_heads=sel)
    )


@st.cache_data(show_spinner=False, max_entries=64)
def spectra(
    path: str, mtime: float, kind: str, layer: int, sample: int, config_json: str
) -> dict[str, np.ndarray]:
    """Singular values ``[kv_heads, min(seq, d)]`` of the tensor and of its quantization residual."""
    x = tensor((path, mtime), kind, layer, sample)
    residual = metrics.quantization_residual(x, _config(config_json), kind=kind)
    return {
        "tensor": metrics.singular_values(x)[0].numpy(),
        "residual": metrics.singular_values(residual)[0].numpy(),
    }


@st.cache_data(show_spinner=False, max_entries=64)
def channel_stats(
    path: str, mtime: float, kind: str, layer: int, sample: int
) -> dict[str, np.ndarray]:
    """Per-channel ``max_abs``, ``kurtosis``, ``share_beyond``, each ``[kv_heads, head_dim]``."""
    x = tensor((path, mtime), kind, layer, sample)
    return {k: v[0].numpy() for k, v in metrics.outlier_stats(x, by="channel").items()}


@st.cache_data(show_spinner=False, max_entries=256)
def sweep_layer(
    path: str,
    mtime: float,
    grid_json: tuple[str, ...],
    layer: int,
    kinds: tuple[str, ...],
    sample: int,
) -> pd.DataFrame:
    """:func:`gear_lab.sweep` of one whole layer (``per_head=False``) over the configs in JSON."""
    del mtime
    configs = [_config(c) for c in grid_json]
    return sweep(
        path,
        configs,
        layers=[layer],
        kinds=kinds,
        samples=(sample,),
        per_head=False,
        progress=False,
    )


# one model held at a time: Qwen2.5-Coder-1.5B alone takes 7 GiB at float32
@st.cache_resource(show_spinner="Loading the model (once per server)...", max_entries=1)
def model(name: str = DEFAULT_MODEL) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from :func:`gear_lab.load_model`, loaded once per process."""
    from gear_lab import load_model

    return load_model(name, device="auto")


@st.cache_data(ttl=60, show_spinner=False)
def installed_models() -> list[str]:
    """Registry models whose packages are installed, the default first."""
    from gear_lab.models import list_models

    names = [info.name for info in list_models() if info.installed]
    return sorted(names, key=lambda name: name != DEFAULT_MODEL)


# --------------------------------------------------------------------------- widgets


def model_picker(key: str, container: Any = st) -> str:
    """A registry-model selectbox (installed models; the default first); returns the name."""
    return container.selectbox(
        "model",
        installed_models() or [DEFAULT_MODEL],
        key=key,
        help="registry models whose packages are installed (`gear-lab models`); "
        "the first use converts a model once, later loads are fast",
    )


def data_selectors(
    info: Mapping[str, Any],
    prefix: str,
    *,
    kinds: tuple[str, ...] = ("keys", "values"),
    head: bool = True,
    layer: bool = True,
) -> dict[str, Any]:
    """Sample / layer / head / kind pickers in the sidebar; layer 10 and keys by default."""
    out: dict[str, Any] = {}
    sb = st.sidebar
    out["sample"] = sb.selectbox(
        "sample",
        range(info["num_samples"]),
        key=f"{prefix}-sample",
        format_func=lambda s: f"{s}: {info['seq_lens'][s]} tokens",
    )
    if layer:
        layers = info["layers"]
        out["layer"] = sb.selectbox(
            "layer", layers, index=layers.index(10) if 10 in layers else 0, key=f"{prefix}-layer"
        )
    if head:
        out["head"] = sb.selectbox("head", range(info["num_kv_heads"]), key=f"{prefix}-head")
    available = [k for k in kinds if k in info["kinds"]]
    if available:
        out["kind"] = sb.radio("tensor", available, horizontal=True, key=f"{prefix}-kind")
    return out


def offered(name: str) -> list[int]:
    """The numbers the studio offers for the integer setting ``name`` (its steps or its span)."""
    setting = SETTINGS[name]
    if setting.steps or setting.span is None:
        return list(setting.steps)
    low, high, step = map(int, setting.span)
    return list(range(low, high + 1, step))


def _widget(where: Any, setting: Setting, label: str, value: Any, key: str, none_means: str) -> Any:
    """The widget of one setting (:data:`SETTINGS`), starting at ``value``: a checkbox (bool), a
    select box (choices), a select slider (steps), a slider (span) or a number input."""
    options: list[Any] = [None] if setting.optional else []

    def shown(v: Any) -> str:
        return none_means if v is None else format_value(v)

    common = {"label": label, "key": key, "help": setting.help}
    if setting.kind is bool:
        return where.checkbox(value=bool(value), **common)
    if setting.choices:
        options += setting.choices
        return where.selectbox(
            options=options, index=options.index(value), format_func=shown, **common
        )
    if setting.steps:  # a preset's value off the ladder joins it, in order
        options += sorted({*setting.steps, *([] if value is None else [value])})
        return where.select_slider(options=options, value=value, format_func=shown, **common)
    if setting.span:
        low, high, step = (setting.kind(v) for v in setting.span)
        digits = max(0, -math.floor(math.log10(step))) if setting.kind is float else 0
        return where.slider(
            min_value=min(low, value),
            max_value=max(high, value),
            value=setting.kind(value),
            step=step,
            format=f"%.{digits}f" if digits else None,
            **common,
        )
    return where.number_input(min_value=0, value=int(value), step=1, **common)


def method_settings(
    prefix: str,
    *,
    preset: str = "gear",
    initial: Mapping[str, Any] | None = None,
    label: str = "method",
    no_block: str = "whole sequence",
) -> CompressionConfig | None:
    """The shared method widget block: a preset and one widget per setting of the settings
    table (:data:`SETTINGS`, the table the CLI flags come from), returned as a config.

    A per-tensor setting gets one widget for keys and values, or a ``key_*`` and a ``value_*``
    widget where the preset sets them apart (``axis``). Widgets (keys
    ``{prefix}-{preset}-{override}``) start at the preset's values (``initial`` overrides them for
    the default ``preset``; ``no_block`` names ``block_size=None``); settings marked ``more`` sit
    on a second tab. Only values moved away from the preset become overrides, so an untouched
    block is exactly ``get_preset(name)``. Bad settings show one line and give None.
    """
    presets = preset_descriptions()
    names = list(presets)
    name = st.selectbox(
        label,
        names,
        index=names.index(preset),
        key=f"{prefix}-preset",
        help="\n\n".join(f"**{n}**: {text}" for n, text in presets.items()),
    )
    base = get_preset(name)
    widgets: list[tuple[str, Setting]] = []  # (override name, setting)
    reference: dict[str, Any] = {}  # override name -> the preset's value
    for s in TENSOR_SETTINGS:
        pair = getattr(base.keys, s.name), getattr(base.values, s.name)
        split = (f"key_{s.name}", f"value_{s.name}")
        sides = {s.name: pair[0]} if pair[0] == pair[1] else dict(zip(split, pair, strict=True))
        widgets += [(o, s) for o in sides]
        reference.update(sides)
    widgets += [(s.name, s) for s in CONFIG_SETTINGS]
    reference.update({s.name: getattr(base, s.name) for s in CONFIG_SETTINGS})
    start = {**reference, **(initial or {})} if name == preset else reference
    k = f"{prefix}-{name}"  # a new preset gets fresh widgets at its own defaults
    none_means = {"block_size": no_block}
    chosen: dict[str, Any] = {}
    for tab, more in zip(st.tabs(["settings", "more settings"]), (False, True), strict=True):
        columns = tab.columns(2)
        shown = [(o, s) for o, s in widgets if s.more == more]
        for i, (o, s) in enumerate(shown):
            none = none_means.get(s.name, s.none_means)
            chosen[o] = _widget(columns[i % 2], s, o, start[o], f"{k}-{o}", none)
    overrides = {f: v for f, v in chosen.items() if v != reference[f]}
    try:
        return get_preset(name, **overrides)
    except GearLabError as err:
        show_error(err)
        return None


def config_key(config: CompressionConfig) -> str:
    """The JSON a cached computation is keyed on."""
    return config.to_json()


def fmt(v: float, digits: int = 4) -> str:
    """A metric value as shown in the pages (and compared against in the tests)."""
    return f"{v:.{digits}g}"
