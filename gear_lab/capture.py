"""Real forward passes -> per-layer query / key / value tensors, in memory (writes no files).

Keys and values come from the model's own KV cache: a ``DynamicCache`` built *without* a config,
so sliding-window layers keep every token (a config-built cache would keep only the window).
Queries after RoPE, and keys before RoPE, come from forward hooks on each attention module: the
outputs of ``q_norm`` / ``k_norm`` (where the model has them, e.g. Gemma 3) or ``q_proj`` /
``k_proj``, rotated with the layer's own ``position_embeddings`` by the model's own
``apply_rotary_pos_emb``. Tensors are stored per sample as ``[kv_heads, seq, head_dim]``
(queries: ``[heads, seq, head_dim]``), i.e. the ``[batch, kv_heads, seq, head_dim]`` cache layout
without its batch axis (GEAR, Kang et al. 2024, compresses exactly these tensors).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gear_lab.errors import CaptureError, ConfigError
from gear_lab.models import check_context
from gear_lab.rope import rotary_function

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each captured layer of each sample."""

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class CapturedSample:
    """One captured prompt: ``token_ids`` [seq] and ``layers[i][kind]`` -> ``[heads, seq, head_dim]``.

    ``kind`` is ``"keys"``, ``"values"`` (``[kv_heads, seq, head_dim]``, post-RoPE keys as cached),
    and optionally ``"queries"`` (``[heads, seq, head_dim]``, post-RoPE) and ``"keys_pre_rope"``.
    Tensors are detached, on the CPU, in the model's dtype.
    """

    text: str
    token_ids: torch.Tensor
    layers: dict[int, dict[str, torch.Tensor]]


def attention_modules(model: PreTrainedModel) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise CaptureError(f"unsupported model {type(model).__name__}: no decoder layers found")
    return [layer.self_attn for layer in layers]


def parse_indices(spec: str | Sequence[int] | None, count: int, what: str = "layer") -> list[int]:
    """``None`` -> ``0 .. count-1``; ``"0,5,10-12"`` or a sequence of ints -> sorted unique
    indices, each in ``[0, count)``. Bounds are checked before a range is expanded, so a huge
    range is refused at once; messages quote at most a short prefix of ``spec``."""
    if spec is None:
        return list(range(count))
    bounds: list[tuple[int, int]] = []
    if isinstance(spec, str):
        for part in filter(None, (p.strip() for p in spec.split(","))):
            lo, sep, hi = part.partition("-")
            try:
                start, stop = int(lo), int(hi if sep else lo)
            except ValueError:
                raise ConfigError(
                    f"bad {what} spec {spec!r:.60}: {part!r:.30} is not N or N-M"
                ) from None
            if stop < start:
                raise ConfigError(f"bad {what} spec {spec!r:.60}: empty range {part!r:.30}")
            bounds.append((start, stop))
    else:
        try:
            bounds = [(int(i), int(i)) for i in spec]
        except (TypeError, ValueError):
            raise ConfigError(f"{what} indices must be integers, got {spec!r:.60}") from None
    if not bounds:
        raise ConfigError(f"{what} spec {spec!r:.60} selects no {what}")
    for start, stop in bounds:
        if start < 0 or stop >= count:
            where = f"{what} {start}" if start == stop else f"{what}s {start}-{stop}"
            raise ConfigError(f"{where} out of range: there are {count} {what}s (0-{count - 1})")
    return sorted({i for start, stop in bounds for i in range(start, stop + 1)})


def parse_layers(spec: str | Sequence[int] | None, num_layers: int) -> list[int]:
    """:func:`parse_indices` of layers: ``"0,5,10-12"`` -> ``[0, 5, 10, 11, 12]``."""
    return parse_indices(spec, num_layers, "layer")


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: ``.jsonl`` (one JSON object per line with a ``"text"`` field) or any
    other text file (one prompt per blank-line-separated block). Raises :class:`CaptureError`."""
    file = Path(path)
    try:
        content = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaptureError(f"prompts file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CaptureError(f"cannot read prompts file {file}: {err}") from None
    if file.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CaptureError(
                    f'{file}:{number}: expected a JSON object with a "text" field'
                ) from None
            if not isinstance(text, str):
                raise CaptureError(f'{file}:{number}: "text" is not a string')
            prompts.append(text)
    else:
        prompts = [block.strip() for block in re.split(r"\n\s*\n", content)]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise CaptureError(f"prompts file {file} holds no prompt")
    return prompts


@contextmanager
def _hooks(
    modules: dict[int, nn.Module],
    with_queries: bool,
    pre_rope_keys: bool,
    advance: Callable[[], None],
) -> Iterator[dict[int, dict[str, Any]]]:
    """Record per layer the pre-RoPE q / k (``[b, heads, seq, d]``) and the rotary cos / sin;
    call ``advance()`` as each attention module finishes."""
    seen: dict[int, dict[str, Any]] = {i: {} for i in modules}
    handles = []

    def keep(layer: int, name: str, head_dim: int):
        def hook(_mod: nn.Module, _args: Any, out: torch.Tensor) -> None:
            if out.dim() == 3:  # a projection's output [b, seq, heads * d]
                out = out.view(*out.shape[:2], -1, head_dim).transpose(1, 2)
            seen[layer][name] = out.detach()

        return hook

    def tick(*_: Any) -> None:  # returns None: a forward hook's return value replaces the output
        advance()

    def keep_rope(layer: int):
        def hook(_mod: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
            seen[layer]["rope"] = kwargs["position_embeddings"]

        return hook

    try:
        for i, attn in modules.items():
            head_dim = attn.head_dim
            handles.append(attn.register_forward_hook(tick))
            if with_queries:
                src = getattr(attn, "q_norm", None) or attn.q_proj
                handles.append(src.register_forward_hook(keep(i, "q", head_dim)))
            if with_queries or pre_rope_keys:
                src = getattr(attn, "k_norm", None) or attn.k_proj
                handles.append(src.register_forward_hook(keep(i, "k", head_dim)))
                handles.append(attn.register_forward_pre_hook(keep_rope(i), with_kwargs=True))
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def capture_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    max_tokens: int,
    layers: str | Sequence[int] | None = None,
    with_queries: bool = False,
    pre_rope_keys: bool = False,
    progress: bool | ProgressCallback = True,
) -> Iterator[CapturedSample]:
    """Run one forward pass per text (truncated to ``max_tokens`` tokens) and yield its tensors.

    ``layers``: ``None`` (all), a spec like ``"0,5,10-12"`` or indices. Keys / values are the
    model's cache tensors ``[kv_heads, seq, head_dim]``; ``with_queries`` adds post-RoPE queries
    ``[heads, seq, head_dim]``; ``pre_rope_keys`` adds keys before the rotary embedding.
    A truncated sample's ``text`` is the decoded text of the tokens kept. Progress counts
    samples x layers, advancing as each attention layer runs: a tqdm bar when ``progress`` is
    true, or ``progress(done, total)`` calls when it is a callable (e.g. an app's progress bar).
    """
    from transformers import DynamicCache

    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
    check_context(model, max_tokens, "max_tokens")
    if not texts:
        raise CaptureError("no prompts to capture")
    modules = attention_modules(model)
    picked = parse_layers(layers, len(modules))
    chosen = {i: modules[i] for i in picked}
    device = next(model.parameters()).device
    total = len(texts) * len(picked)
    callback = progress if callable(progress) else None
    bar = tqdm(total=total, desc="capture", unit="layer", disable=not progress or bool(callback))
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        bar.update(1)
        if callback is not None:
            callback(done, total)

    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[0]
            if ids.numel() == 0:
                raise CaptureError(f"prompt {text[:40]!r} tokenizes to nothing")
            if ids.numel() > max_tokens:  # keep the text that the kept tokens spell
                ids = ids[:max_tokens]
                text = tokenizer.decode(ids, skip_special_tokens=True)
            cache = DynamicCache()  # no config: sliding-window layers keep every token
            with (
                _hooks(chosen, with_queries, pre_rope_keys, advance) as seen,
                torch.inference_mode(),
            ):
                model(input_ids=ids[None].to(device), cache=cache, use_cache=True, logits_to_keep=1)
            out: dict[int, dict[str, torch.Tensor]] = {}
            for i, attn in chosen.items():
                tensors = {"keys": cache.layers[i].keys[0], "values": cache.layers[i].values[0]}
                if with_queries or pre_rope_keys:
                    cos, sin = seen[i]["rope"]
                    k_pre = seen[i]["k"]
                    if pre_rope_keys:
                        tensors["keys_pre_rope"] = k_pre[0]
                    if with_queries:
                        rotated, _ = rotary_function(attn)(seen[i]["q"], k_pre, cos, sin)
                        tensors["queries"] = rotated[0]
                out[i] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            yield CapturedSample(text=text, token_ids=ids.clone(), layers=out)
    finally:
        bar.close()
