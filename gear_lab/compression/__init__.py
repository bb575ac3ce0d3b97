"""KV-cache compression methods: GEAR (Kang et al. 2024) ``X_hat = D + L + S`` and its
neighbours (KIVI, KCVT, FP8, Lloyd-Max / k-means codebooks, TurboQuant with QJL), one building
block per module, composed in :mod:`.gear`,
configured by :mod:`.config` and named in :mod:`.presets`. Tensors are ``[batch, kv_heads, seq, head_dim]``.
"""

from gear_lab.compression.codebook import (
    CodebookQuantized,
    codebook_quantize,
    fit_codebooks,
    lloyd_max_levels,
)
from gear_lab.compression.config import CompressionConfig, TensorCompression
from gear_lab.compression.fp8 import Fp8Tensor, fp8_quantize
from gear_lab.compression.gear import Compressed, compress, compress_ranks
from gear_lab.compression.lowrank import LowRank, power_lowrank, svd_lowrank
from gear_lab.compression.outliers import Outliers, extract_outliers, index_dtype, outlier_count
from gear_lab.compression.presets import (
    config_label,
    get_preset,
    list_presets,
    preset_descriptions,
    with_overrides,
)
from gear_lab.compression.qjl import Sketch, qjl_sketch, sketch_matrix
from gear_lab.compression.quantize import (
    Quantized,
    pack_codes,
    quantize,
    quantize_reconstruct,
    unpack_codes,
)
from gear_lab.compression.rotation import hadamard_rotation, rotate, unrotate

__all__ = [
    "CodebookQuantized",
    "Compressed",
    "CompressionConfig",
    "Fp8Tensor",
    "LowRank",
    "Outliers",
    "Quantized",
    "Sketch",
    "TensorCompression",
    "codebook_quantize",
    "compress",
    "compress_ranks",
    "config_label",
    "extract_outliers",
    "fit_codebooks",
    "fp8_quantize",
    "get_preset",
    "hadamard_rotation",
    "index_dtype",
    "list_presets",
    "lloyd_max_levels",
    "outlier_count",
    "pack_codes",
    "power_lowrank",
    "preset_descriptions",
    "qjl_sketch",
    "quantize",
    "quantize_reconstruct",
    "rotate",
    "sketch_matrix",
    "svd_lowrank",
    "unpack_codes",
    "unrotate",
    "with_overrides",
]
