"""Hypothesis strategies shared by the compression tests: seeded tensors of varied shape, dtype,
magnitude and structure (outlier channels, constant stretches)."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Lean property runs: the whole suite must stay within minutes on 2 cores.
PROPERTY = settings(max_examples=30, deadline=None)


def make_tensor(seed: int, shape, dtype=torch.float32, scale: float = 1.0, style: str = "gauss"):
    """A reproducible tensor ``[..., seq, head_dim]``.

    ``style``: ``gauss``; ``channels`` (a few channels 10x larger, like real keys);
    ``blocky`` (many constant stretches and exact zeros, to hit constant groups).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if style == "channels":
        boost = 1 + 9 * (torch.rand(shape[-1], generator=gen, dtype=torch.float64) < 0.1)
        x = x * boost
    elif style == "blocky":
        x = torch.round(x * 2) / 2
        x[..., : max(1, shape[-2] // 2), :] = x[..., :1, :]
    return (x * scale).to(dtype)


@st.composite
def tensors(draw, max_batch=2, max_heads=3, max_seq=70, max_dim=40, dtypes=DTYPES):
    """A drawn tensor ``[batch, heads, seq, head_dim]``."""
    shape = (
        draw(st.integers(1, max_batch)),
        draw(st.integers(1, max_heads)),
        draw(st.integers(1, max_seq)),
        draw(st.integers(1, max_dim)),
    )
    return make_tensor(
        draw(st.integers(0, 2**31 - 1)),
        shape,
        draw(st.sampled_from(dtypes)),
        draw(st.sampled_from((1e-3, 1.0, 30.0))),
        draw(st.sampled_from(("gauss", "channels", "blocky"))),
    )


def left_padded(k, v, other_k, other_v, pad: int):
    """A batch of two rows for padding tests: row 0 is ``k`` / ``v`` ``[1, heads, seq, dim]``
    after ``pad`` garbage positions (1e4, which would wreck any statistic they entered), row 1 is
    ``other_k`` / ``other_v`` ``[1, heads, pad + seq', dim]``; plus the attention mask of the
    first ``pad + real`` positions as ``mask(real)``."""
    garbage = torch.full((*k.shape[:2], pad, k.shape[-1]), 1e4, dtype=k.dtype)
    keys = torch.cat([torch.cat([garbage, k], dim=-2), other_k])
    values = torch.cat([torch.cat([garbage, v], dim=-2), other_v])
    return keys, values, lambda real: torch.tensor([[0] * pad + [1] * real, [1] * (pad + real)])
