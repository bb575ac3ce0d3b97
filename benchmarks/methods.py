"""Issue 16's "methods of 2024-26" table: each KV quantizer family near 3 and 5 measured bits.

The protocol is :mod:`benchmarks.perplexity`'s (windows of pydoc, prefill 512 compressed, 128
continuation tokens scored through it, K/V compressed as float16; :func:`half_precision`), with
every statistic :func:`gear_lab.perplexity_check` reports: mean / median / p99 / p99.9 per-token
``KL(full || compressed)``, same-top-token %, perplexity change with its 95 % interval across
windows, scored tokens. Families: KIVI-style grouped quantization (Liu et al. 2024), GEAR (Kang
et al. 2024), Hadamard-rotated grouped quantization (QuaRot, Ashkboos et al. 2024; SpinQuant, Liu
et al. 2025), KVQuant-style non-uniform codebooks, pre-RoPE keys and sinks (Hooper et al. 2024),
TurboQuant (Zandieh et al. 2025; rotation, Lloyd-Max sphere codebook at b - 1 bits and a 1-bit
QJL sketch of the key residual; also without the sketch), attention sinks on the rotated rows
(StreamingLLM, Xiao et al. 2024) and per-layer allocations (:mod:`gear_lab.allocation`, given as
files by ``--allocation``). ``--rows search`` is the handful of candidates per family the table's
rows were picked from (one window ranks them); ``--rows table`` the picked rows.

    python benchmarks/methods.py [--rows table|search] [--windows 2] [--only SUBSTRING]
        [--model qwen2.5-coder-1.5b] [--allocation alloc-3.json --allocation alloc-5.json]
"""

from __future__ import annotations

import argparse
import sys

from perplexity import TABLE, TUNED_3, TUNED_5, Line, _q, half_precision, verdicts

from gear_lab import load_model
from gear_lab.allocation import load_allocation
from gear_lab.compression import CompressionConfig, get_preset, with_overrides
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.fidelity import perplexity_check

# issue 16's targets: (bits budget, max mean KL, min same-top-token)
TARGETS = ((3.0, 0.03, None), (5.0, 0.002, 0.98))


def _one_block(config):
    """``config`` on a prompt compressed as one 512-token block (fitted codebooks, sinks)."""
    return half_precision(config, prompt_compression="oneshot")


def _kvquant(config):
    """KVQuant's full recipe on ``config``: keys before RoPE, one float32 sink, one-block prompt."""
    return half_precision(
        with_overrides(config, sinks=1), pre_rope=True, prompt_compression="oneshot"
    )


def _turbo(**kw):
    """The turboquant preset (per token: rotation, sphere Lloyd-Max, keys' QJL bit), n_b 64."""
    return get_preset("turboquant", block_size=64, **kw)


def _nuq(**kw):
    """The nuq preset (a k-means codebook per head, keys per channel), n_b 64."""
    return get_preset("nuq", block_size=64, **kw)


# KVQuant-style: keys per channel with a k-means codebook per channel (fitted on the one-block
# prompt, so its 2**b float16 levels cost 2**b * 16 / 512 bits per entry), values per head
_FITTED_3 = _q(3, None, value_bits=2, key_codebook="fitted", value_codebook="fitted-head")
_FITTED_5 = _q(5, None, value_bits=4, key_codebook="fitted", value_codebook="fitted-head")
# KVQuant's dense-and-sparse form: 1 % of each vector's entries kept exactly beside the codebook
_NUQ_3 = _nuq(key_bits=3, value_bits=2, outliers=0.01)
_NUQ_5 = _nuq(key_bits=5, value_bits=4, outliers=0.01)
_GAUSS_3 = _q(3, 64, value_bits=2, rotate=True, codebook="gaussian")
_GAUSS_5 = _q(5, 64, value_bits=4, rotate=True, codebook="gaussian")

SEARCH = {
    "KIVI-style 2-bit, G 32": _q(2, 32),
    "KIVI-style keys 3-bit / values 2-bit, G 64": _q(3, 64, value_bits=2),
    "KIVI-style 4-bit, G 32": _q(4, 32),
    "KIVI-style keys 5-bit / values 4-bit, G 64": _q(5, 64, value_bits=4),
    "nuq 3-bit (k-means per head)": _nuq(bits=3),
    "nuq keys 3-bit / values 2-bit": _nuq(key_bits=3, value_bits=2),
    "nuq 5-bit": _nuq(bits=5),
    "nuq keys 5-bit / values 4-bit": _nuq(key_bits=5, value_bits=4),
    "fitted per-channel keys 3-bit / values 2-bit, one block": _one_block(_FITTED_3),
    "fitted per-channel keys 5-bit / values 4-bit, one block": _one_block(_FITTED_5),
    "nuq keys 3 / values 2 + 1% outliers, one block": _one_block(_NUQ_3),
    "nuq keys 3 / values 2 + 1% outliers, pre-RoPE keys + 1 sink": _kvquant(_NUQ_3),
    "nuq keys 5 / values 4 + 1% outliers, one block": _one_block(_NUQ_5),
    "nuq keys 5 / values 4 + 1% outliers, pre-RoPE keys + 1 sink": _kvquant(_NUQ_5),
    "Hadamard + k-means per head, keys 3 / values 2, G 64": _q(
        3, 64, value_bits=2, rotate=True, codebook="fitted-head"
    ),
    "Hadamard + Gaussian codebook, keys 3 / values 2, G 64": _GAUSS_3,
    "Hadamard + Gaussian codebook, keys 5 / values 4, G 64": _GAUSS_5,
    "TurboQuant 3-bit": _turbo(bits=3),
    "TurboQuant keys 3-bit / values 2-bit": _turbo(key_bits=3, value_bits=2),
    "TurboQuant 4-bit": _turbo(bits=4),
    "TurboQuant 5-bit": _turbo(bits=5),
    "TurboQuant keys 5-bit / values 4-bit": _turbo(key_bits=5, value_bits=4),
    "TurboQuant 6-bit": _turbo(bits=6),
}


def table_rows() -> dict:
    """The picked rows: each family's best candidate of the search near 3 and 5 bits."""
    rows = {
        "KIVI-style keys 3-bit / values 2-bit, G 64": SEARCH[
            "KIVI-style keys 3-bit / values 2-bit, G 64"
        ],
        "KIVI-style keys 5-bit / values 4-bit, G 64": SEARCH[
            "KIVI-style keys 5-bit / values 4-bit, G 64"
        ],
        "GEAR 2-bit, s = 2%, r = 4, G 64": get_preset("gear", bits=2, block_size=64),
        "GEAR 4-bit, s = 2%, r = 4, G 64": get_preset("gear", block_size=64),
        "Hadamard keys 3-bit / values 2-bit, G 64 (tuned ~3)": TUNED_3,
        "Hadamard keys 5-bit / values 4-bit, G 64 (tuned ~5)": TUNED_5,
    }
    for name in (
        "TurboQuant 3-bit",
        "TurboQuant keys 3-bit / values 2-bit",
        "TurboQuant 5-bit",
        "TurboQuant keys 5-bit / values 4-bit",
    ):
        rows[name] = SEARCH[name]
        rows[f"{name}, no QJL"] = with_overrides(SEARCH[name], key_qjl=False)
    return rows | {
        "KVQuant-style: nuq K3 / V2 + 1% outliers, pre-RoPE keys, 1 sink": _kvquant(_NUQ_3),
        "KVQuant-style: nuq K5 / V4 + 1% outliers, pre-RoPE keys, 1 sink": _kvquant(_NUQ_5),
        "tuned ~3 + 1 sink": TABLE["tuned ~3 + 1 sink"],
        "tuned ~5 + 1 sink": TABLE["tuned ~5 + 1 sink"],
        "tuned ~3, keys G 128 + 1 sink": TABLE["tuned ~3, keys G 128 + 1 sink"],
        "tuned ~5, keys G 128 + 1 sink": TABLE["tuned ~5, keys G 128 + 1 sink"],
        "tuned ~3, keys G 128 + 1 sink, pre-RoPE keys": TABLE[
            "tuned ~3, keys G 128 + 1 sink, pre-RoPE keys"
        ],
    }


def measure(rows: dict, windows: int, model_name: str) -> list[Line]:
    """Run each row through :func:`perplexity_check`, print its statistics, return its line."""
    model, tokenizer = load_model(model_name, device="cpu")
    print(
        f"{model_name}, {windows} window(s) x (prefill 512 + 128 scored) of pydoc\n"
        f"{'method':58} {'bits':>5} {'ppl full->comp':>14} {'dppl +/- 95%':>15} {'KL':>7} "
        f"{'median':>8} {'p99':>7} {'p99.9':>7} {'top-1':>6} {'tokens':>6}",
        flush=True,
    )
    lines = []
    for label, spec in rows.items():
        if isinstance(spec, CompressionConfig):
            spec = half_precision(spec)
        r = perplexity_check(model, tokenizer, spec, windows=windows, progress=False)
        ppl = f"{r.perplexity_full:.2f}->{r.perplexity_compressed:.2f}"
        delta = f"{r.delta_perplexity:+.3f} +/- {r.delta_perplexity_ci:.3f}"
        print(
            f"{label:58} {r.bits_per_entry:5.2f} {ppl:>14} {delta:>15} {r.kl:7.4f} "
            f"{r.kl_median:8.5f} {r.kl_p99:7.4f} {r.kl_p999:7.4f} {r.top1_agreement:6.1%} "
            f"{r.scored_tokens:6d}",
            flush=True,
        )
        lines.append(
            Line(label, "measured", r.bits_per_entry, r.perplexity_full,
                 r.perplexity_compressed, r.kl, r.top1_agreement)
        )  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=2, help="corpus windows (default: 2)")
    parser.add_argument("--rows", choices=("table", "search"), default="table")
    parser.add_argument("--only", help="comma-separated substrings of the row labels to run")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument(
        "--allocation", action="append", default=[], help="a per-layer allocation file (repeat)"
    )
    args = parser.parse_args(argv)
    rows = table_rows() if args.rows == "table" else dict(SEARCH)
    for path in args.allocation:
        allocation = load_allocation(path)
        rows[f"per-layer allocation, target {allocation.target_bits:g} bits"] = allocation
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        rows = {k: v for k, v in rows.items() if any(w in k for w in wanted)}
    for line in verdicts(measure(rows, args.windows, args.model), TARGETS):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
