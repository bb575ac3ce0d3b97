"""``gear-lab models``: list the embedded model registry, install / conversion state and shapes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    parser = subparsers.add_parser(
        "models",
        help="list embedded models: installed, converted, shape",
        description=(
            "List the model registry: where each model comes from, whether it is installed and "
            "already converted to safetensors (and its size on disk), and its shape (layers, "
            "heads, KV heads, head_dim, attention types; for some models known once converted)."
        ),
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print one block per registry entry."""
    from gear_lab.models import cache_dir, list_models

    print(f"cache: {cache_dir()}")
    for info in list_models():
        state = ("installed" if info.installed else "not installed") + (
            ", converted" if info.converted else ", not converted"
        )
        print(f"{info.name}  ({state})")
        print(f"  source  {info.source}")
        if info.converted:
            print(f"  disk    {info.disk_bytes / 2**20:,.0f} MiB (converted safetensors)")
        if info.shape:
            s = info.shape
            types = ", ".join(f"{n} {t}" for t, n in s["attention_types"].items())
            print(
                f"  shape   {s['layers']} layers, {s['heads']} heads, {s['kv_heads']} KV heads, "
                f"head_dim {s['head_dim']}; {types}"
            )
        else:
            print("  shape   (known after the first load converts it)")
    return 0
