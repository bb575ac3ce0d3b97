"""gear-lab: observe what KV-cache compression (GEAR, KIVI, ...) does to real model tensors.

The public API, and only that. Data flows one way:
model -> capture -> dump -> compress -> metrics -> sweep -> app / notebooks.

Names are imported lazily so that ``import gear_lab`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# torch's CPU build runs its intra-op threads on OpenMP, whose idle threads spin by default: on a
# machine whose cores are also busy with other work (a second process, the studio's browser), the
# spinning threads starve the working ones (2-core machine, two busy loops beside it: decoding
# 5.9 tok/s, a 10-layer demo sweep 18.6 s). Sleeping at once (OMP_WAIT_POLICY=PASSIVE: 11.3
# tok/s, 6.5 s there) costs an idle machine the wake-up of every small parallel op (the 30-layer
# sweep on 2 threads 12.3 s instead of 7.7 s). So: GNU OpenMP (torch's on Linux) spins briefly,
# 10000 rounds (9.8 tok/s and 7.0 s busy; 23.1 tok/s and 8.1 s idle, against 23.9 and 7.7
# spinning), other runtimes sleep. Read once, when torch first loads; set OMP_WAIT_POLICY or
# GOMP_SPINCOUNT yourself to choose otherwise.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = "10000"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "gear_lab.models",
    "list_models": "gear_lab.models",
    "capture_dump": "gear_lab.dump",
    "open_dump": "gear_lab.dump",
    "Dump": "gear_lab.dump",
    "compress": "gear_lab.compression",
    "Compressed": "gear_lab.compression",
    "TensorCompression": "gear_lab.compression",
    "CompressionConfig": "gear_lab.compression",
    "get_preset": "gear_lab.compression",
    "list_presets": "gear_lab.compression",
    "sweep": "gear_lab.sweeps",
    "GearCache": "gear_lab.cache",
    "check_generation": "gear_lab.fidelity",
    "perplexity_check": "gear_lab.fidelity",
    "run_retrieval": "gear_lab.retrieval",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gear_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
