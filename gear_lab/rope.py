"""A model's rotary position embedding (RoPE, Su et al. 2021), applied and undone per layer.

RoPE rotates each pair of a key's channels by an angle proportional to its position; transformers
models apply it with their modeling file's own ``apply_rotary_pos_emb`` to cos / sin tables from
the decoder's ``rotary_emb`` (per attention type for Gemma 3). :func:`rotary_function` finds that
function (the dump's pre-RoPE queries use it, :mod:`gear_lab.capture`); :class:`ModelRope` gives
the same rotation, and its inverse, of any keys ``[n, kv_heads, seq, head_dim]`` at given
positions, so that a cache can quantize keys before RoPE (KVQuant, Hooper et al. 2024) although
transformers hands it post-RoPE keys (:class:`gear_lab.cache.GearCache`, ``pre_rope``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from gear_lab.architecture import model_arch
from gear_lab.errors import ModelError


def rotary_function(module: nn.Module) -> Callable:
    """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of the modeling file that defines
    ``module``'s class (an attention module or the decoder); :class:`ModelError` when none."""
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ModelError(f"cannot find apply_rotary_pos_emb for {type(module).__name__}")
    return fn


class ModelRope:
    """The rotary embedding of ``model``'s decoder layers, as the model itself applies it.

    :meth:`rotate` ``(x, positions, layer)`` rotates ``x`` ``[n, kv_heads, seq, head_dim]``
    whose token ``(j, t)`` sits at RoPE position ``positions[j, t]`` (``[n, seq]`` int64), with
    the model's own cos / sin tables and ``apply_rotary_pos_emb``; ``inverse=True`` undoes it.
    RoPE scales cos and sin by the same factor ``a`` for some scaling types (YaRN), so the
    inverse uses ``cos / (cos^2 + sin^2)`` and ``-sin / (cos^2 + sin^2)``, exact for any ``a``.
    """

    def __init__(self, model: nn.Module) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.embedding = getattr(decoder, "rotary_emb", None)
        if self.embedding is None:
            raise ModelError(f"{type(model).__name__} has no rotary embedding (rotary_emb)")
        self.apply = rotary_function(decoder)
        #: attention type of each layer, passed to ``rotary_emb`` where it takes one (Gemma 3)
        self.layer_types: list[str] | None = None
        if "layer_type" in inspect.signature(self.embedding.forward).parameters:
            self.layer_types = [layer.attention_type for layer in model_arch(model).layers]

    def tables(self, x: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` ``[n, seq, head_dim]`` of ``layer`` at ``positions``, in ``x``'s dtype."""
        if self.layer_types is None:
            return self.embedding(x, positions)
        return self.embedding(x, positions, self.layer_types[layer])

    def rotate(self, x: Tensor, positions: Tensor, layer: int, inverse: bool = False) -> Tensor:
        """``x`` ``[n, kv_heads, seq, head_dim]`` rotated by RoPE at ``positions`` ``[n, seq]``
        (``inverse``: the rotation undone), in ``x``'s dtype."""
        cos, sin = self.tables(x, positions.to(x.device), layer)
        if inverse:
            norm = cos * cos + sin * sin
            cos, sin = cos / norm, -sin / norm
        return self.apply(x, x, cos, sin)[1]


def rope_positions(starts: Tensor, length: int) -> Tensor:
    """``[n, length]`` positions ``starts[j] + t``: RoPE positions of ``n`` runs of ``length``
    tokens starting at ``starts`` (``[n]`` int64)."""
    return starts[:, None] + torch.arange(length, device=starts.device)
