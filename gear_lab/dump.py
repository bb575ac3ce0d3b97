"""The HDF5 dump: atomic writes of captured tensors, lazy validated reads (schema in dumps/README.md).

Layout (schema_version 1)::

    /                         attrs: format, schema_version, model_id, config (JSON), versions (JSON),
                                     device, dtype, storage_dtype, created, source, max_tokens,
                                     num_samples, layers, kinds, num_heads, num_kv_heads, head_dim
    /sample_0000/token_ids    int32 [seq]
    /sample_0000/text         UTF-8 string (scalar)
    /sample_0000/layer_00/    attrs: attention_type, sliding_window (0 = none), rope_theta,
                                     scaling, softcap (0 = none)
        keys, values          [kv_heads, seq, head_dim]   (post-RoPE keys, as in the model's cache)
        queries               [heads, seq, head_dim]      (post-RoPE; only with_queries)
        keys_pre_rope         [kv_heads, seq, head_dim]   (only pre_rope_keys)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

from gear_lab.architecture import model_arch
from gear_lab.capture import (
    CapturedSample,
    ProgressCallback,
    attention_modules,
    capture_samples,
    parse_layers,
)
from gear_lab.constants import DEFAULT_MODEL, KINDS
from gear_lab.corpus import corpus_texts
from gear_lab.errors import CaptureError, ConfigError, DumpError, DumpExistsError, first_line
from gear_lab.files import GuardedFile, atomic_write, check_output
from gear_lab.models import check_context, load_model, model_id

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCHEMA_VERSION = 1
FORMAT = "gear-lab-dump"
_ROOT_ATTRS = (
    "format",
    "schema_version",
    "model_id",
    "config",
    "versions",
    "device",
    "dtype",
    "created",
    "num_samples",
    "layers",
    "kinds",
    "num_heads",
    "num_kv_heads",
    "head_dim",
)
_STR = h5py.string_dtype("utf-8")
# what a dump may hold (see docs/security.md): storage in the file itself, built-in filters only
_LAYOUTS = frozenset({h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED})
_FILTERS = frozenset(
    {
        h5py.h5z.FILTER_DEFLATE,
        h5py.h5z.FILTER_SHUFFLE,
        h5py.h5z.FILTER_FLETCHER32,
        h5py.h5z.FILTER_LZF,
    }
)
_LAYER_ATTRS = {
    "attention_type": "str",
    "sliding_window": "int",
    "rope_theta": "float",
    "scaling": "float",
    "softcap": "float",
}


def sample_group(sample: int) -> str:
    """Name of sample ``sample``'s group: ``sample_0000``."""
    return f"sample_{sample:04d}"


def layer_group(layer: int) -> str:
    """Name of layer ``layer``'s group inside a sample group: ``layer_00``."""
    return f"layer_{layer:02d}"


def default_out(model: str, source: str) -> Path:
    """``dumps/<model>-<source>.h5`` with file-name-safe parts."""
    stem = Path(model).stem if os.sep in model or model.endswith(".gguf") else model
    slug = re.sub(r"[^\w.-]+", "-", f"{stem}-{source}").strip("-")
    return Path("dumps") / f"{slug}.h5"


def _storage_dtype(dtype: torch.dtype) -> np.dtype:
    """float16 is kept as is; float32 and bfloat16 (which HDF5 lacks; upcast is exact) as float32."""
    return np.dtype("float16") if dtype == torch.float16 else np.dtype("float32")


def _versions() -> dict[str, str]:
    import transformers

    from gear_lab import __version__

    return {
        "gear_lab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "h5py": h5py.__version__,
    }


def _check_target(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """:func:`gear_lab.files.check_output` for a dump (its folder may still be missing)."""
    return check_output(out, overwrite=overwrite, make_parents=True, exists_error=DumpExistsError)


def write_dump(
    out: str | os.PathLike[str],
    samples: Iterable[CapturedSample],
    model: PreTrainedModel,
    layers: Sequence[int],
    kinds: Sequence[str],
    source: str = "prompts",
    max_tokens: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Stream ``samples`` into a new dump at ``out`` and return its path.

    Written through :func:`gear_lab.files.atomic_write`: whole or absent; a failed write (a full
    disk) stops the capture once the current sample is done, with a one-line
    :class:`~gear_lab.errors.OutputError`.
    """
    path = _check_target(out, overwrite)
    arch = model_arch(model)
    dtype = next(model.parameters()).dtype
    storage = _storage_dtype(dtype)
    with (
        atomic_write(path, overwrite=overwrite, exists_error=DumpExistsError) as tmp,
        GuardedFile(tmp, "w+") as raw,  # h5py crashes when its own writes fail
    ):
        with h5py.File(raw, "w") as f:
            count = 0
            heads = 0
            for count, sample in enumerate(samples, start=1):
                group = f.create_group(sample_group(count - 1))
                group.create_dataset("token_ids", data=sample.token_ids.numpy().astype(np.int32))
                group.create_dataset("text", data=sample.text, dtype=_STR)
                for layer, tensors in sample.layers.items():
                    lg = group.create_group(layer_group(layer))
                    info = arch.layers[layer]
                    lg.attrs["attention_type"] = info.attention_type
                    lg.attrs["sliding_window"] = info.sliding_window or 0
                    lg.attrs["rope_theta"] = info.rope_theta or 0.0
                    lg.attrs["scaling"] = arch.scaling
                    lg.attrs["softcap"] = arch.softcap or 0.0
                    for kind, tensor in tensors.items():
                        data = tensor.to(torch.float32).numpy().astype(storage)
                        lg.create_dataset(
                            kind,
                            data=data,
                            chunks=(1, min(data.shape[1], 1024), data.shape[2]),
                            compression="gzip",
                            compression_opts=1,
                            shuffle=True,
                        )
                        heads = data.shape[0] if kind == "queries" else heads
                raw.check()
            if count == 0:
                raise CaptureError("no samples were captured")
            device = next(model.parameters()).device
            attrs = {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "model_id": model_id(model),
                "config": model.config.to_json_string(use_diff=False),
                "versions": json.dumps(_versions(), sort_keys=True),
                "device": str(device),
                "dtype": str(dtype).removeprefix("torch."),
                "storage_dtype": storage.name,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "source": source,
                "max_tokens": max_tokens or 0,
                "num_samples": count,
                "layers": np.asarray(layers, dtype=np.int32),
                "kinds": json.dumps(list(kinds)),
                "num_heads": heads or arch.num_heads,
                "num_kv_heads": arch.num_kv_heads,
                "head_dim": arch.head_dim,
            }
            f.attrs.update(attrs)
        raw.check()
    return path


def capture_dump(
    out: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    prompts: Sequence[str] | None = None,
    corpus: str | None = None,
    samples: int = 1,
    max_tokens: int = 512,
    layers: str | Sequence[int] | None = None,
    with_queries: bool = False,
    pre_rope_keys: bool = False,
    device: str = "auto",
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    progress: bool | ProgressCallback = True,
    loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> Path:
    """Capture K/V (and optionally queries, pre-RoPE keys) of ``model`` into a new dump at ``out``.

    Text comes from ``prompts`` (each used whole, up to ``max_tokens`` tokens) or ``corpus``
    (``samples`` windows of ``max_tokens`` tokens; ``"pydoc"`` is the default when neither is
    given). ``loaded=(model, tokenizer)`` reuses an already loaded model (``model``, ``device`` and
    ``dtype`` are then ignored). ``progress``: a tqdm bar, or a ``progress(done, total)`` callable
    (see :func:`gear_lab.capture.capture_samples`). Returns the path of the dump.
    """
    if prompts is not None and corpus is not None:
        raise ConfigError("give prompts or a corpus, not both")
    if prompts is not None and (not prompts or not all(p.strip() for p in prompts)):
        raise ConfigError("prompts must be a non-empty list of non-empty strings")
    if max_tokens < 1 or samples < 1:
        raise ConfigError(f"max_tokens and samples must be >= 1, got {max_tokens} and {samples}")
    _check_target(out, overwrite)  # fail before the slow model load
    if loaded is None:
        loaded = load_model(model, device=device, dtype=dtype)
    lm, tokenizer = loaded
    check_context(lm, max_tokens, "max_tokens")  # before the corpus is cut into windows
    source = "prompts" if prompts is not None else corpus or "pydoc"
    texts = (
        list(prompts)
        if prompts is not None
        else corpus_texts(source, samples, tokenizer, max_tokens)
    )
    picked = parse_layers(layers, len(attention_modules(lm)))
    kinds = [
        k for k, on in zip(KINDS, (True, True, with_queries, pre_rope_keys), strict=True) if on
    ]
    captured = capture_samples(
        lm, tokenizer, texts, max_tokens, picked, with_queries, pre_rope_keys, progress
    )
    return write_dump(out, captured, lm, picked, kinds, source, max_tokens, overwrite)


class Dump:
    """A dump opened read-only and validated (see :func:`open_dump`); tensors load lazily.

    ``load(kind, layer, sample)`` returns ``[kv_heads, seq, head_dim]`` (``[heads, seq, head_dim]``
    for queries); add the batch axis with ``x[None]``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DumpError(f"{self.path}: no such dump file")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            reason = "truncated file" if "truncated" in str(err) else "not an HDF5 file"
            raise DumpError(f"{self.path}: {reason} ({first_line(err)})") from err
        try:
            self._validate()
        except (KeyError, TypeError, ValueError, OSError, RuntimeError) as err:
            self._file.close()  # HDF5 / h5py failures on a malformed file: still one line
            raise self._fail(f"malformed dump ({first_line(err)})") from err
        except BaseException:
            self._file.close()
            raise

    # ----------------------------------------------------------------- validation
    def _fail(self, problem: str) -> DumpError:
        return DumpError(f"{self.path}: {problem}")

    def _validate(self) -> None:
        attrs = self._file.attrs
        fmt = attrs.get("format")
        if "schema_version" not in attrs or not isinstance(fmt, str) or fmt != FORMAT:
            raise self._fail("not a gear-lab dump (no format / schema_version attribute)")
        version = attrs["schema_version"]
        if not isinstance(version, (int, np.integer)) or version < 1:
            raise self._fail(f"invalid schema_version {version!r}")
        if version > SCHEMA_VERSION:
            raise self._fail(
                f"schema_version {version} is newer than this gear-lab reads ({SCHEMA_VERSION}); "
                "upgrade gear-lab"
            )
        missing = [name for name in _ROOT_ATTRS if name not in attrs]
        if missing:
            raise self._fail(f"missing root attributes {missing}")
        self._check_storage()
        self._read_root(attrs)
        for sample in range(self.num_samples):
            name = sample_group(sample)
            ids = self._dataset(f"{name}/token_ids")
            if ids.ndim != 1 or ids.shape[0] < 1 or ids.dtype.kind not in "iu":
                raise self._fail(
                    f"/{name}/token_ids is {ids.dtype} {ids.shape}, expected integer [seq]"
                )
            text = self._dataset(f"{name}/text")
            if text.shape != () or h5py.check_string_dtype(text.dtype) is None:
                raise self._fail(f"/{name}/text is {text.dtype} {text.shape}, expected a string")
            for layer in self.layers:
                self._check_layer_attrs(f"{name}/{layer_group(layer)}")
                for kind in self.kinds:
                    where = f"{name}/{layer_group(layer)}/{kind}"
                    data = self._dataset(where)
                    heads = self.num_heads if kind == "queries" else self.num_kv_heads
                    expected = (heads, ids.shape[0], self.head_dim)
                    if data.shape != expected:
                        raise self._fail(f"/{where} has shape {data.shape}, expected {expected}")
                    if data.dtype.kind != "f" or data.dtype.itemsize not in (2, 4, 8):
                        raise self._fail(f"/{where} has dtype {data.dtype}, expected a float dtype")

    def _check_storage(self) -> None:
        """Refuse anything not stored in the file's own bytes, walking every object without
        following a link: soft and external links, objects reachable twice (hard-link loops),
        virtual datasets, external raw storage, unknown layouts or filters, named datatypes."""
        groups: list[tuple[str, h5py.Group]] = [("", self._file)]
        while groups:
            where, group = groups.pop()
            for name in group:
                path = f"{where}/{name}"
                link = group.get(name, getlink=True)
                if not isinstance(link, h5py.HardLink):
                    raise self._fail(f"{path} is a {type(link).__name__}; a dump holds no links")
                obj = group[name]
                if h5py.h5o.get_info(obj.id).rc != 1:
                    raise self._fail(f"{path} is linked more than once (an alias or a link loop)")
                if isinstance(obj, h5py.Group):
                    groups.append((path, obj))
                elif isinstance(obj, h5py.Dataset):
                    self._check_dataset_storage(path, obj)
                else:
                    raise self._fail(f"{path} is a {type(obj).__name__}, not a group or dataset")

    def _check_dataset_storage(self, path: str, data: h5py.Dataset) -> None:
        """A dataset must be compact, contiguous or chunked in this file, with built-in filters."""
        if data.is_virtual:
            raise self._fail(f"{path} is a virtual dataset (it reads other files)")
        plist = data.id.get_create_plist()
        if plist.get_external_count():
            raise self._fail(f"{path} keeps its data in external files")
        if plist.get_layout() not in _LAYOUTS:
            raise self._fail(f"{path} has an unsupported storage layout")
        filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
        if filters - _FILTERS:
            raise self._fail(
                f"{path} uses HDF5 filters {sorted(filters - _FILTERS)} "
                "(only gzip, shuffle, fletcher32 and lzf are read)"
            )

    def _read_root(self, attrs: h5py.AttributeManager) -> None:
        """Decode and type-check the root attributes into the public fields."""
        list(attrs.values())  # every attribute must be readable: metadata returns them all
        try:
            self.config: dict[str, Any] = json.loads(attrs["config"])
            kinds = json.loads(attrs["kinds"])
            self._versions = json.loads(attrs["versions"])
        except (json.JSONDecodeError, TypeError) as err:
            raise self._fail(f"corrupt JSON attribute ({first_line(err)})") from err
        if not isinstance(self.config, dict) or not isinstance(self._versions, dict):
            raise self._fail("config and versions must be JSON objects")
        if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
            raise self._fail(f"kinds must be a JSON list of names, got {kinds!r:.60}")
        self.kinds: tuple[str, ...] = tuple(kinds)
        if not isinstance(attrs["model_id"], str):
            raise self._fail("model_id must be a string")
        self.model_id = attrs["model_id"]
        counts = {}
        for name in ("num_samples", "num_heads", "num_kv_heads", "head_dim"):
            value = attrs[name]
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise self._fail(f"{name} must be an integer >= 1, got {value!r:.60}")
            counts[name] = int(value)
        self.num_samples = counts["num_samples"]
        self.num_heads = counts["num_heads"]
        self.num_kv_heads = counts["num_kv_heads"]
        self.head_dim = counts["head_dim"]
        if self.num_heads % self.num_kv_heads:
            raise self._fail(f"num_heads {self.num_heads} is not a multiple of num_kv_heads")
        layers = np.atleast_1d(attrs["layers"])
        if layers.ndim != 1 or layers.dtype.kind not in "iu" or not layers.size:
            raise self._fail(f"layers must be a non-empty integer array, got {layers.dtype}")
        self.layers = [int(i) for i in layers]
        if min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise self._fail("layers must be distinct indices >= 0")
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise self._fail(f"unknown tensor kinds {unknown or 'none'}")

    def _dataset(self, where: str) -> h5py.Dataset:
        """The dataset at ``where`` (links were refused by :meth:`_check_storage`)."""
        obj = self._file.get(where)
        if not isinstance(obj, h5py.Dataset):
            raise self._fail(f"missing dataset /{where}")
        return obj

    def _check_layer_attrs(self, where: str) -> None:
        """Every per-layer attribute is present with its schema type (floats finite)."""
        attrs = self._file[where].attrs
        missing = [name for name in _LAYER_ATTRS if name not in attrs]
        if missing:
            raise self._fail(f"/{where} lacks attributes {missing}")
        for name, kind in _LAYER_ATTRS.items():
            value = attrs[name]
            if not _attr_ok(value, kind):
                raise self._fail(f"/{where} attribute {name} is {value!r:.60}, expected {kind}")

    # ----------------------------------------------------------------- metadata
    @property
    def metadata(self) -> dict[str, Any]:
        """Root attributes as plain Python (JSON attributes decoded, arrays as lists)."""
        out: dict[str, Any] = {}
        for key, value in self._file.attrs.items():
            if key in ("config", "versions", "kinds"):
                value = json.loads(value)
            elif isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    def _check(self, sample: int, layer: int | None = None, kind: str | None = None) -> None:
        if not 0 <= sample < self.num_samples:
            raise self._fail(f"no sample {sample} (it has {self.num_samples})")
        if layer is not None and layer not in self.layers:
            raise self._fail(f"no layer {layer} (it has {_ranges(self.layers)})")
        if kind is not None and kind not in self.kinds:
            raise self._fail(f"no {kind!r} tensors (it has {', '.join(self.kinds)})")

    def layer_info(self, layer: int) -> dict[str, Any]:
        """``attention_type``, ``sliding_window`` (None = full attention), ``rope_theta``,
        ``scaling`` (the q.k multiplier) and ``softcap`` (None = none) of ``layer``."""
        self._check(0, layer)
        attrs = self._file[f"{sample_group(0)}/{layer_group(layer)}"].attrs
        return {
            "attention_type": str(attrs["attention_type"]),
            "sliding_window": int(attrs["sliding_window"]) or None,
            "rope_theta": float(attrs["rope_theta"]),
            "scaling": float(attrs["scaling"]),
            "softcap": float(attrs["softcap"]) or None,
        }

    def text(self, sample: int = 0) -> str:
        """The text of ``sample``."""
        self._check(sample)
        return self._read(f"{sample_group(sample)}/text", text=True)

    def token_ids(self, sample: int = 0) -> torch.Tensor:
        """Token ids of ``sample``: LongTensor [seq]."""
        self._check(sample)
        return torch.from_numpy(self._read(f"{sample_group(sample)}/token_ids").astype(np.int64))

    def seq_len(self, sample: int = 0) -> int:
        """Number of tokens of ``sample``."""
        self._check(sample)
        return int(self._file[f"{sample_group(sample)}/token_ids"].shape[0])

    def load(
        self,
        kind: str,
        layer: int,
        sample: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """One tensor ``[kv_heads | heads, seq, head_dim]`` as torch on ``device`` (``dtype``:
        as stored when None). Raises :class:`DumpError` on unreadable data, NaN / Inf, or
        values beyond the range of ``dtype``."""
        self._check(sample, layer, kind)
        where = f"{sample_group(sample)}/{layer_group(layer)}/{kind}"
        tensor = torch.from_numpy(self._read(where))
        if not torch.isfinite(tensor).all():
            raise self._fail(f"/{where} holds NaN or Inf values")
        out = tensor.to(device=device, dtype=dtype or tensor.dtype)
        if out.dtype != tensor.dtype and not torch.isfinite(out).all():
            amax = float(tensor.abs().max())
            raise self._fail(
                f"/{where} values exceed the {str(out.dtype).removeprefix('torch.')} range "
                f"(|x| up to {amax:.4g}); load it in a wider dtype"
            )
        return out

    def _read(self, where: str, text: bool = False) -> Any:
        """The whole dataset at ``where``: a str for ``text``, else a native-byte-order array."""
        data = self._file[where]
        try:
            if text:
                return data.asstr(errors="replace")[()]
            array = data[()]
        except OSError as err:
            raise self._fail(f"cannot read /{where} ({first_line(err)})") from err
        return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))

    def summary(self) -> str:
        """A human-readable multi-line description: model, samples, layers, shapes, metadata."""
        meta = self.metadata
        types: dict[str, list[int]] = {}
        for layer in self.layers:
            info = self.layer_info(layer)
            label = info["attention_type"]
            if info["sliding_window"]:
                label += f" (window {info['sliding_window']})"
            types.setdefault(label, []).append(layer)
        seqs = [self.seq_len(s) for s in range(self.num_samples)]
        lines = [
            f"dump      {self.path} ({self.path.stat().st_size / 1e6:.1f} MB, schema "
            f"{meta['schema_version']})",
            f"model     {self.model_id}",
            f"created   {meta['created']} on {meta['device']} ({meta['dtype']}, stored "
            f"{meta.get('storage_dtype', '?')})",
            "versions  " + ", ".join(f"{k} {v}" for k, v in sorted(meta["versions"].items())),
            f"source    {meta.get('source', '?')}: {self.num_samples} samples, tokens {seqs}",
            f"layers    {len(self.layers)}: {_ranges(self.layers)}",
            *(f"          {label}: {_ranges(ls)}" for label, ls in types.items()),
            f"heads     {self.num_heads} query heads, {self.num_kv_heads} KV heads, "
            f"head_dim {self.head_dim}",
            "tensors   "
            + ", ".join(
                f"{k} [{self.num_heads if k == 'queries' else self.num_kv_heads}, seq, "
                f"{self.head_dim}]"
                for k in self.kinds
            ),
        ]
        return "\n".join(lines)

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        with contextlib.suppress(Exception):
            self._file.close()

    def __enter__(self) -> Dump:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Dump({str(self.path)!r}, model={self.model_id!r}, samples={self.num_samples})"


def open_dump(path: str | os.PathLike[str]) -> Dump:
    """Open a dump lazily and read-only, validating its schema and structure (fast: no tensor
    data is read; NaN / Inf are detected by :meth:`Dump.load`). Raises :class:`DumpError`."""
    return Dump(path)


def _attr_ok(value: Any, kind: str) -> bool:
    """Whether an attribute value has the schema type ``kind`` (``str``, ``int`` >= 0, finite
    ``float``)."""
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, (int, np.integer)) and value >= 0
    return isinstance(value, (int, float, np.integer, np.floating)) and bool(np.isfinite(value))


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
