"""Memory-true GearCache: what it keeps between steps, its peak memory, and that it attends to
exactly what the workspace mode does (GEAR streaming, Kang et al. 2024, section 3.3)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from gear_lab.cache import GearCache
from gear_lab.compression import Compressed, compress, get_preset, list_presets
from gear_lab.corpus import corpus_ids
from gear_lab.errors import TensorError

HEADS, DIM, N_B = 2, 64, 4


def _reachable_tensors(obj, seen: set[int] | None = None):
    """Every tensor reachable from ``obj`` through gear_lab objects, dataclasses and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _reachable_tensors(value, seen)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _reachable_tensors(value, seen)
    elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith("gear_lab"):
        for value in vars(obj).values():
            yield from _reachable_tensors(value, seen)


@pytest.mark.parametrize("preset", ["gear", "kivi"])
def test_memory_true_keeps_only_buffers_and_one_transient(preset):
    """After every step, the full-precision K/V a layer keeps (float32 tensors ending in
    head_dim, the shared transient aside) cover fewer than n_b tokens per row; the workspace
    mode keeps them all."""
    batch, prompt, steps, layers = 2, 13, 11, 3
    g = torch.Generator().manual_seed(0)
    states = torch.randn(layers, 2, batch, HEADS, prompt + steps, DIM, generator=g)
    caches = {w: GearCache(preset, bits=2, block_size=N_B, workspace=w) for w in (False, True)}
    mask = torch.ones(batch, prompt)
    mask[1, :3] = 0  # left padding in row 1
    for cache in caches.values():
        cache.set_padding(mask)
    for lo, hi in [(0, prompt), *((t, t + 1) for t in range(prompt, prompt + steps))]:
        for workspace, cache in caches.items():
            for i in range(layers):
                cache.update(states[i, 0, ..., lo:hi, :], states[i, 1, ..., lo:hi, :], i)
            transient = cache.transient.buffer if cache.transient is not None else None
            for layer in cache.layers:
                kept = [
                    t
                    for t in _reachable_tensors(layer)
                    if t.dtype == torch.float32
                    and t.dim() >= 3
                    and t.shape[-1] == DIM
                    and (
                        transient is None or t.untyped_storage() is not transient.untyped_storage()
                    )
                ]
                tokens = sum(t.numel() for t in kept) // (2 * batch * HEADS * DIM)  # K and V
                if workspace:
                    assert tokens == hi  # the workspace holds every position
                else:
                    assert tokens < N_B
                    assert all(hi - row.done < N_B for row in layer.rows)
            if not workspace:  # one transient, the size of one layer's K/V (+ growth slack)
                need = 2 * batch * HEADS * hi * DIM
                assert need <= transient.numel() <= need * 5 // 4 + 2 * batch * HEADS * DIM
                breakdown = cache.memory_breakdown()
                assert breakdown["workspace"] == 0 and breakdown["transient"] == transient.nbytes
                assert cache.resident_nbytes() == sum(breakdown.values())
    assert caches[True].memory_breakdown()["workspace"] == caches[True].workspace_nbytes() > 0
    assert caches[True].nbytes() == caches[False].nbytes()


_PEAK_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    from gear_lab.cache import GearCache

    def rss_kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])

    torch.set_num_threads(1)
    layers, batch, heads, prompt, dim, steps = 6, 2, 4, 1024, 64, 8
    g = torch.Generator().manual_seed(0)
    step = torch.randn(batch, heads, 1, dim, generator=g)
    warm = GearCache("kivi", workspace=sys.argv[1] == "workspace")  # first-call allocations
    warm.update(torch.randn(1, heads, 130, dim), torch.randn(1, heads, 130, dim), 0)
    del warm
    base = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    cache = GearCache("kivi", workspace=sys.argv[1] == "workspace")
    cache.set_padding(None)  # unpadded rows
    with torch.inference_mode():
        for i in range(layers):
            k = torch.randn(batch, heads, prompt, dim, generator=g)
            cache.update(k, k, i)
            del k
        for _ in range(steps):
            for i in range(layers):
                cache.update(step, step, i)
    print(rss_kib("VmHWM") - base)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_true_peak_is_below_the_workspace_peak():
    """Peak RSS of the same streaming run in fresh processes: 6 layers of 2 x 4 x 1024 x 64
    float32 K/V (24 MiB full precision); the memory-true peak is well below the workspace's.
    glibc's mmap threshold is fixed so freed temporaries leave the RSS (as in
    ``benchmarks/serving.py``)."""

    def peak_kib(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, mode],
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.strip().splitlines()[-1])

    true_peak, workspace_peak = peak_kib("true"), peak_kib("workspace")
    full_kib = 6 * 2 * 2 * 4 * 1024 * 64 * 4 // 1024
    assert workspace_peak > 0.9 * full_kib
    assert true_peak < 0.6 * workspace_peak


@pytest.mark.parametrize("preset", list_presets())
def test_compressed_cat_equals_separate_decompression(preset):
    """Blocks stacked with Compressed.cat decompress to the parts' decompressions, keep the
    sum of their bytes, and select() picks blocks back out."""
    config = get_preset(preset)
    g = torch.Generator().manual_seed(1)
    for kind in ("keys", "values"):
        tc = config.for_kind(kind)
        parts = [compress(torch.randn(n, HEADS, 32, DIM, generator=g), tc, kind) for n in (3, 1, 2)]
        joined = Compressed.cat(parts)
        want = torch.cat([p.decompress() for p in parts])
        assert joined.shape == want.shape
        assert torch.equal(joined.decompress(), want)
        assert joined.nbytes == sum(p.nbytes for p in parts)
        index = torch.tensor([5, 0, 3])
        assert torch.equal(joined.select(index).decompress(), want[index])
    other = compress(torch.randn(1, HEADS, 32, DIM), get_preset("kivi", bits=4).keys, "keys")
    with pytest.raises(TensorError):
        Compressed.cat([compress(torch.randn(1, HEADS, 32, DIM), get_preset("kivi").keys), other])


@pytest.mark.parametrize("preset", list_presets())
def test_decompress_into_a_split_strided_view_equals_decompress(preset):
    """Blocks [rows * count, ...] written into a [rows, count, heads, n_b, dim] view of a
    larger [rows, heads, seq, dim] buffer (as a cache's transient holds them) land exactly where
    decompress() puts them, touching nothing else; a wrong shape or dtype raises TensorError."""
    rows, count, size = 3, 4, 32
    config = get_preset(preset)
    g = torch.Generator().manual_seed(2)
    for kind in ("keys", "values"):
        part = compress(torch.randn(rows * count, HEADS, size, DIM, generator=g), config, kind)
        buffer = torch.full((rows, HEADS, 5 + count * size + 3, DIM), 7.0)
        view = buffer[:, :, 5 : 5 + count * size].unflatten(2, (count, size)).transpose(1, 2)
        assert part.decompress_into(view) is view
        want = part.decompress().unflatten(0, (rows, count)).transpose(1, 2).flatten(2, 3)
        assert torch.equal(buffer[:, :, 5:-3], want)
        assert bool((buffer[:, :, :5] == 7).all()) and bool((buffer[:, :, -3:] == 7).all())
        with pytest.raises(TensorError):
            part.decompress_into(view.double())
        with pytest.raises(TensorError):
            part.decompress_into(view[:2])


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 4),
    prompt=st.integers(1, 14),
    steps=st.integers(0, 9),
    padded=st.booleans(),
    preset=st.sampled_from(["gear", "kivi", "quant"]),
)
def test_memory_true_states_are_the_blocks_where_they_belong(batch, prompt, steps, padded, preset):
    """Batches of unpadded rows of equal length (the chunk is a grid, written straight into the
    transient) and left-padded ones (index_copy_): attention sees, at every position, the
    decompression of the block holding it, the buffer, then the new states."""
    cache = GearCache(preset, bits=2, block_size=N_B)
    mask = torch.ones(batch, prompt)
    if padded and batch > 1:
        mask[1, : prompt // 2] = 0
    cache.set_padding(mask)
    g = torch.Generator().manual_seed(batch * 100 + prompt)
    k, v = torch.randn(2, batch, HEADS, prompt + steps + 1, DIM, generator=g)
    cache.update(k[..., :prompt, :], v[..., :prompt, :], 0)
    for t in range(prompt, prompt + steps):
        cache.update(k[..., t : t + 1, :], v[..., t : t + 1, :], 0)
    layer, end = cache.layers[0], prompt + steps
    want_k, want_v = k[..., : end + 1, :].clone(), v[..., : end + 1, :].clone()
    for chunk in layer.chunks.values():
        assert chunk.grid is not None or (padded and batch > 1)  # equal unpadded rows: a grid
        blocks = zip(chunk.keys.decompress(), chunk.values.decompress(), strict=True)
        for j, (bk, bv) in enumerate(blocks):
            i, start = int(chunk.rows[j]), int(chunk.starts[j])
            want_k[i, :, start : start + N_B], want_v[i, :, start : start + N_B] = bk, bv
    seen_k, seen_v = cache.update(k[..., end : end + 1, :], v[..., end : end + 1, :], 0)
    for i, row in enumerate(layer.rows):  # left padding is masked: whatever it holds
        assert torch.equal(seen_k[i, :, row.first :], want_k[i, :, row.first :])
        assert torch.equal(seen_v[i, :, row.first :], want_v[i, :, row.first :])


# ---------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def prompt_ids(smol):
    _, tokenizer = smol
    return corpus_ids(tokenizer)[:150][None]


def _generate(model, ids, cache, n=8):
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, cache=cache)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("preset", list_presets())
def test_memory_true_generates_what_the_workspace_mode_does(smol, prompt_ids, preset):
    """Token for token, for every preset (n_b = 32); 'none' also equals DynamicCache."""
    model, _ = smol
    config = get_preset(preset, block_size=32)
    true = GearCache(config, model_config=model.config)
    got = _generate(model, prompt_ids, true)
    want = _generate(
        model, prompt_ids, GearCache(config, model_config=model.config, workspace=True)
    )
    assert torch.equal(got, want)
    assert true.memory_breakdown()["workspace"] == 0
    if preset == "none":
        assert torch.equal(got, _generate(model, prompt_ids, DynamicCache(config=model.config)))
