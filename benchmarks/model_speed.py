"""Load, prefill and decode times of one registry model on the CPU (float32, full-precision cache).

Loads the model (converting it first when it never was: that first load is reported as such),
prefills ``--prompt-tokens`` tokens of pydoc text into a ``DynamicCache``, then decodes
``--new-tokens`` tokens greedily, one timed forward each. Prints the 1-minute load average next
to the times: on a shared machine they grow with it.

    python benchmarks/model_speed.py [--model qwen2.5-coder-1.5b] [--prompt-tokens 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
from transformers import DynamicCache

from gear_lab import list_models, load_model
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.corpus import corpus_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    converted = {i.name: i.converted for i in list_models()}.get(args.model, True)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model, device="cpu")
    load = time.perf_counter() - start
    what = "load" if converted else "first load (assemble, convert, load)"
    print(f"{args.model}: {what} {load:.1f} s; torch {torch.get_num_threads()} threads")
    ids = corpus_ids(tokenizer)[None, : args.prompt_tokens]
    cache = DynamicCache()
    steps = []
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, cache=cache)
        prefill = time.perf_counter() - start
        for _ in range(args.new_tokens):
            start = time.perf_counter()
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, cache=cache)
            steps.append(time.perf_counter() - start)
    print(f"prefill {ids.shape[1]} tokens: {prefill:.1f} s ({ids.shape[1] / prefill:.0f} tok/s)")
    print(
        f"decode {len(steps)} tokens: median {statistics.median(steps):.2f} s/token "
        f"(min {min(steps):.2f}, max {max(steps):.2f})"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"peak RSS {rss:.1f} GiB; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
