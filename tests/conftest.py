"""Session fixtures shared by the whole suite: the real embedded model and one small dump of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# before torch loads: gear_lab's OpenMP wait policy (idle threads spin briefly, then sleep; see
# gear_lab/__init__.py): spinning threads slow a 2-core machine shared with other processes ~10x
import gear_lab  # noqa: F401

# isort: split
import torch

# Triton reads TRITON_INTERPRET when a kernel module is first imported (by any test module at
# collection), so the CPU interpreter mode is chosen here, before any of them is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smol():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in float32 on the CPU, loaded once."""
    from gear_lab import load_model

    return load_model("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def smol_dump(smol, tmp_path_factory) -> Path:
    """Path of a small SmolLM2 dump: 2 pydoc samples x 128 tokens, every layer, with post-RoPE
    queries and pre-RoPE keys (kinds: keys, values, queries, keys_pre_rope)."""
    from gear_lab import capture_dump

    out = tmp_path_factory.mktemp("dumps") / "smollm2-135m-pydoc.h5"
    return capture_dump(
        out,
        corpus="pydoc",
        samples=2,
        max_tokens=128,
        with_queries=True,
        pre_rope_keys=True,
        progress=False,
        loaded=smol,
    )
