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
