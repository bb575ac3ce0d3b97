"""One reader of a model's attention architecture: :func:`model_arch` -> :class:`ModelArch`.

Every gear-lab module that needs a fact about a model's attention (layer count, head shape,
sliding windows, RoPE, soft-cap, context length) asks :func:`model_arch`, so that supporting a new
model family means teaching this module only. It reads the transformers config (the text decoder's
config for multimodal models such as Gemma 3, whose attention facts sit under ``text_config``) and
covers the release differences met so far:

- ``head_dim`` is a config field for Llama and Gemma; Qwen2 lacks it (``hidden_size // heads``);
- RoPE: transformers 5.x keeps ``rope_theta`` and the scaling under ``config.rope_parameters``
  (per attention type for Gemma 3: ``{"sliding_attention": {...}, "full_attention": {...}}``);
  older configs have ``rope_theta`` and ``rope_scaling`` attributes;
- per-layer attention types come from ``layer_types``; a config without them is all full
  attention, or all sliding when it sets ``sliding_window`` (Mistral-style).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gear_lab.errors import ModelError

FULL = "full_attention"
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class LayerArch:
    """Attention facts of one decoder layer.

    ``sliding_window`` is ``None`` for full attention; ``rope_scaling`` is ``None`` for plain RoPE,
    else the RoPE parameters besides ``rope_theta`` (``rope_type``, ``factor``, ...).
    """

    attention_type: str
    sliding_window: int | None
    rope_theta: float | None
    rope_scaling: dict[str, Any] | None


@dataclass(frozen=True)
class ModelArch:
    """Attention architecture of a decoder (see :func:`model_arch`).

    Tensors of a layer are ``[batch, num_kv_heads, seq, head_dim]`` (queries: ``num_heads``).
    ``scaling`` multiplies ``q @ k^T`` (``head_dim ** -0.5``, or ``query_pre_attn_scalar ** -0.5``
    for Gemma); ``softcap`` is the attention logit soft-cap (``None``: none); ``max_context`` is
    ``max_position_embeddings`` (``None`` when the config has none).
    """

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    softcap: float | None
    max_context: int | None
    layers: tuple[LayerArch, ...]

    @property
    def sliding_windows(self) -> list[int | None]:
        """Sliding window of each layer (``None``: full attention)."""
        return [layer.sliding_window for layer in self.layers]

    def attention_type_counts(self) -> dict[str, int]:
        """``{attention_type: number of layers}``, in order of first appearance."""
        types = [layer.attention_type for layer in self.layers]
        return {t: types.count(t) for t in dict.fromkeys(types)}

    def summary(self) -> dict[str, Any]:
        """JSON-safe shape: ``layers``, ``heads``, ``kv_heads``, ``head_dim``, ``attention_types``
        (``{type: count}``)."""
        return {
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "attention_types": self.attention_type_counts(),
        }

    def cached_entries(self, tokens: int) -> int:
        """K/V entries a full-precision cache (built with the config, so sliding layers keep
        their last ``window - 1`` tokens) holds for one sequence of ``tokens`` tokens."""
        per_token = 2 * self.num_kv_heads * self.head_dim
        return sum(
            per_token * (tokens if w is None else min(tokens, w - 1)) for w in self.sliding_windows
        )


def _text_config(model_or_config: Any) -> Any:
    """The decoder's config of a model or of a (possibly multimodal) config."""
    config = getattr(model_or_config, "config", model_or_config)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config(decoder=True) if get_text_config else config


def _rope(config: Any, attention_type: str) -> tuple[float | None, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of one attention type, from either config layout."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # releases before rope_parameters
        params = {**(getattr(config, "rope_scaling", None) or {})}
        params.setdefault("rope_theta", getattr(config, "rope_theta", None))
    elif isinstance(params.get(attention_type), dict):  # per attention type (Gemma 3)
        params = params[attention_type]
    theta = params.get("rope_theta")
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    plain = scaling.get("rope_type", scaling.get("type", "default")) == "default"
    return (float(theta) if theta is not None else None), (None if plain else scaling)


def model_arch(model_or_config: Any) -> ModelArch:
    """The attention architecture of a transformers model or config (see the module docstring).

    Raises :class:`ModelError` when the config lacks the layer and head counts.
    """
    config = _text_config(model_or_config)
    try:
        num_layers = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        hidden = config.hidden_size
    except AttributeError as err:
        raise ModelError(f"unsupported model config {type(config).__name__}: {err}") from None
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or [SLIDING if window else FULL] * num_layers
    if len(types) != num_layers:
        raise ModelError(f"config has {len(types)} layer_types for {num_layers} layers")
    layers = []
    for kind in types:
        theta, scaling = _rope(config, kind)
        layers.append(
            LayerArch(kind, int(window) if kind == SLIDING and window else None, theta, scaling)
        )
    scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim
    softcap = getattr(config, "attn_logit_softcapping", None)
    max_context = getattr(config, "max_position_embeddings", None)
    return ModelArch(
        model_type=str(getattr(config, "model_type", "") or type(config).__name__),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        scaling=float(scalar) ** -0.5,
        softcap=float(softcap) if softcap else None,
        max_context=int(max_context) if max_context else None,
        layers=tuple(layers),
    )
