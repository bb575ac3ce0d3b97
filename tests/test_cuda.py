"""CUDA end to end: capture in float16 / bfloat16, compression, metrics, sweeps, GearCache
generation and the fused kernel at a Llama-2-7B layer's shape, each checked against the
float32 CPU path. Skipped without a CUDA device (CI has none); run by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch

from gear_lab import capture_dump, check_generation, load_model, open_dump, sweep
from gear_lab.compression import compress, get_preset, list_presets
from gear_lab.metrics import attention_error, reconstruction

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_capture_on_cuda_matches_cpu_float32(smol_dump, tmp_path, dtype):
    """The same pydoc windows captured on the GPU in half precision agree with the float32
    CPU dump of the session fixture (half-precision rounding through 30 layers only)."""
    out = capture_dump(
        tmp_path / "gpu.h5", corpus="pydoc", samples=2, max_tokens=128, with_queries=True,
        pre_rope_keys=True, device=CUDA, dtype=dtype, progress=False,
    )  # fmt: skip
    with open_dump(out) as gpu, open_dump(smol_dump) as cpu:
        assert gpu.token_ids(1).tolist() == cpu.token_ids(1).tolist()
        assert gpu.metadata["dtype"] == dtype and gpu.metadata["device"].startswith("cuda")
        for kind in ("keys", "values", "queries", "keys_pre_rope"):
            for layer in (0, 15, 29):
                assert rel(gpu.load(kind, layer, 1), cpu.load(kind, layer, 1)) < 0.05, (kind, layer)


@pytest.mark.parametrize("name", list_presets())
def test_compression_and_metrics_on_cuda_match_cpu(smol_dump, name):
    """Every preset, block-wise and whole-sequence, on real K/V: same measured size, and
    reconstruction / attention metrics within float rounding of the CPU result."""
    with open_dump(smol_dump) as dump:
        q, k, v = (dump.load(kind, 10)[None] for kind in ("queries", "keys", "values"))
    for block_size in (None, 64):
        config = get_preset(name, block_size=block_size)
        results = []
        for device in ("cpu", CUDA):
            ck = compress(k.to(device), config, kind="keys")
            cv = compress(v.to(device), config, kind="values")
            k_hat, v_hat = ck.decompress(), cv.decompress()
            assert k_hat.device.type == v_hat.device.type == torch.device(device).type
            results.append(
                (
                    ck.nbytes + cv.nbytes,
                    reconstruction(k.to(device), k_hat),
                    attention_error(q.to(device), k.to(device), v.to(device), k_hat, v_hat),
                )
            )
        (cpu_bytes, cpu_rec, cpu_att), (gpu_bytes, gpu_rec, gpu_att) = results
        assert gpu_bytes == cpu_bytes
        assert gpu_rec["rel_fro"] == pytest.approx(cpu_rec["rel_fro"], rel=2e-2, abs=1e-5)
        assert gpu_att["output_rel"] == pytest.approx(cpu_att["output_rel"], rel=5e-2, abs=1e-5)


def test_sweep_on_cuda_matches_cpu(smol_dump):
    grid = {"method": ["gear", "kivi"], "bits": [2, 4], "block_size": [64]}
    frames = [
        sweep(smol_dump, grid, layers=[0, 20], progress=False, device=device)
        for device in ("cpu", CUDA)
    ]
    cpu, gpu = frames
    assert len(gpu) == len(cpu) > 0
    assert (gpu["bits_per_entry"].to_numpy() == cpu["bits_per_entry"].to_numpy()).all()
    for column in ("rel_fro", "output_rel"):
        assert gpu[column].to_numpy() == pytest.approx(cpu[column].to_numpy(), rel=5e-2, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gear_cache_generation_on_cuda(dtype):
    """GearCache drives greedy generation on the GPU: with nothing compressed it is the
    full-precision cache token for token; 4-bit GEAR stores fewer bytes and stays close."""
    from pydoc_data.topics import topics

    model, tokenizer = load_model("smollm2-135m", device=CUDA, dtype=dtype)
    prompt = topics["assert"][:900]  # about 200 tokens: several 32-token blocks
    same = check_generation(model, tokenizer, prompt, get_preset("none", block_size=32), 24)
    assert same.token_agreement == 1.0 and same.first_divergence is None
    gear = check_generation(
        model, tokenizer, prompt, get_preset("gear", bits=4, rank=1, block_size=32), 24
    )
    assert gear.compressed_cache_bytes < 0.6 * gear.full_cache_bytes  # about 6 of 16 bits
    assert len(gear.kl) == 24 and all(0 <= kl < 5 for kl in gear.kl)
    assert sum(gear.top1) >= 12


def test_fused_kernel_at_llama2_7b_layer_shape():
    """The fused kernel on a Llama-2-7B-shaped layer ([8, 32, 4096, 128] float16) against
    the torch implementation on the same GPU, for the benchmark's 2-bit GEAR setting."""
    from gear_lab.kernels import compress_fused, decompress_fused

    gen = torch.Generator(device=CUDA).manual_seed(0)
    scales = torch.randn(128, device=CUDA, generator=gen).exp()
    x = (torch.randn(8, 32, 4096, 128, device=CUDA, generator=gen) * scales).half()
    config = get_preset("gear", bits=2, group_size=64, outliers=0.02, rank=2, block_size=64)
    for kind in ("keys", "values"):
        fused = compress_fused(x, config, kind=kind)
        ref = compress(x, config, kind=kind)
        assert fused.nbytes == ref.nbytes
        ft, rt = fused.tensors(), ref.tensors()
        assert {n: t.shape for n, t in ft.items()} == {n: t.shape for n, t in rt.items()}
        # fp16 inputs can tie in the outlier choice; everything else is bit-exact
        mask_agree = (fused.outlier_mask() == ref.outlier_mask()).float().mean().item()
        assert mask_agree > 0.9999
        for name in ("codes", "scale", "zero"):
            assert (ft[name] == rt[name]).float().mean().item() > 0.999, name
        y_fused, y_ref = fused.decompress(), ref.decompress()
        # the low rank runs in TF32 inside the kernel: the errors agree to ~1e-3
        assert rel(y_fused, x) == pytest.approx(rel(y_ref, x), rel=1e-2)
        assert rel(y_fused, y_ref) < 5e-3
        assert rel(decompress_fused(fused), y_fused) < 1e-3
        assert rel(decompress_fused(ref), y_ref) < 1e-3
        del fused, ref, y_fused, y_ref
    torch.cuda.empty_cache()
