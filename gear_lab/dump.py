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
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import torch

from gear_lab.capture import (
    KINDS,
    CapturedSample,
    ProgressCallback,
    attention_modules,
    capture_samples,
    corpus_texts,
    layer_infos,
    parse_layers,
)
from gear_lab.errors import CaptureError, ConfigError, DumpError, DumpExistsError
from gear_lab.models import DEFAULT_MODEL, load_model, model_id

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
    """Check, creating nothing, that ``out`` may be written: no file there unless ``overwrite``,
    and its folder exists and is writable, or can be created inside a writable folder."""
    path = Path(out).expanduser()
    if path.exists() and not overwrite:
        raise DumpExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    if path.is_dir():
        raise CaptureError(f"{path} is a folder, not a dump file path")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CaptureError(f"output folder {path.parent} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK):
        raise CaptureError(f"output folder {existing} is not writable")
    return path


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

    Written to a temporary file in the target folder and renamed into place only on success;
    any exception (KeyboardInterrupt included) removes the temporary file.
    """
    path = _check_target(out, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    infos = layer_infos(model)
    dtype = next(model.parameters()).dtype
    storage = _storage_dtype(dtype)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            count = 0
            heads = 0
            for count, sample in enumerate(samples, start=1):
                group = f.create_group(sample_group(count - 1))
                group.create_dataset("token_ids", data=sample.token_ids.numpy().astype(np.int32))
                group.create_dataset("text", data=sample.text, dtype=_STR)
                for layer, tensors in sample.layers.items():
                    lg = group.create_group(layer_group(layer))
                    info = infos[layer]
                    lg.attrs["attention_type"] = info["attention_type"]
                    lg.attrs["sliding_window"] = info["sliding_window"] or 0
                    lg.attrs["rope_theta"] = info["rope_theta"]
                    lg.attrs["scaling"] = info["scaling"]
                    lg.attrs["softcap"] = info["softcap"] or 0.0
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
            if count == 0:
                raise CaptureError("no samples were captured")
            config = getattr(model.config, "text_config", None) or model.config
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
                "num_heads": heads or config.num_attention_heads,
                "num_kv_heads": config.num_key_value_heads,
                "head_dim": getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads,
            }
            f.attrs.update(attrs)
        if path.exists() and not overwrite:
            raise DumpExistsError(f"{path} appeared during the capture; not replaced")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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
            raise DumpError(f"{self.path}: {reason} ({_first_line(err)})") from err
        try:
            self._validate()
        except Exception:
            self._file.close()
            raise

    # ----------------------------------------------------------------- validation
    def _fail(self, problem: str) -> DumpError:
        return DumpError(f"{self.path}: {problem}")

    def _validate(self) -> None:
        attrs = self._file.attrs
        if "schema_version" not in attrs or attrs.get("format") != FORMAT:
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
        try:
            self.config: dict[str, Any] = json.loads(attrs["config"])
            self.kinds: tuple[str, ...] = tuple(json.loads(attrs["kinds"]))
            self._versions = json.loads(attrs["versions"])
        except (json.JSONDecodeError, TypeError) as err:
            raise self._fail(f"corrupt JSON attribute ({_first_line(err)})") from err
        self.model_id = str(attrs["model_id"])
        self.num_samples = int(attrs["num_samples"])
        self.layers = [int(i) for i in np.atleast_1d(attrs["layers"])]
        self.num_heads = int(attrs["num_heads"])
        self.num_kv_heads = int(attrs["num_kv_heads"])
        self.head_dim = int(attrs["head_dim"])
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise self._fail(f"unknown tensor kinds {unknown or 'none'}")
        for sample in range(self.num_samples):
            name = sample_group(sample)
            for needed in ("token_ids", "text"):
                if f"{name}/{needed}" not in self._file:
                    raise self._fail(f"missing dataset /{name}/{needed}")
            seq = self._file[f"{name}/token_ids"].shape
            if len(seq) != 1 or seq[0] < 1:
                raise self._fail(f"/{name}/token_ids has shape {seq}, expected [seq]")
            for layer in self.layers:
                for kind in self.kinds:
                    where = f"{name}/{layer_group(layer)}/{kind}"
                    if where not in self._file:
                        raise self._fail(f"missing dataset /{where}")
                    heads = self.num_heads if kind == "queries" else self.num_kv_heads
                    expected = (heads, seq[0], self.head_dim)
                    if self._file[where].shape != expected:
                        raise self._fail(
                            f"/{where} has shape {self._file[where].shape}, expected {expected}"
                        )

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
        return self._file[f"{sample_group(sample)}/text"].asstr()[()]

    def token_ids(self, sample: int = 0) -> torch.Tensor:
        """Token ids of ``sample``: LongTensor [seq]."""
        self._check(sample)
        return torch.from_numpy(
            self._file[f"{sample_group(sample)}/token_ids"][()].astype(np.int64)
        )

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
        as stored when None). Raises :class:`DumpError` on unreadable data or NaN / Inf."""
        self._check(sample, layer, kind)
        where = f"{sample_group(sample)}/{layer_group(layer)}/{kind}"
        try:
            array = self._file[where][()]
        except OSError as err:
            raise self._fail(f"cannot read /{where} ({_first_line(err)})") from err
        tensor = torch.from_numpy(array)
        if not torch.isfinite(tensor).all():
            raise self._fail(f"/{where} holds NaN or Inf values")
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    runs: list[list[int]] = []
    for v in sorted(values):
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
