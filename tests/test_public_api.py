"""The public API: every exported name resolves to what it names, in any import order."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_exports_resolve_to_functions_and_classes_not_modules():
    import gear_lab.compression
    import gear_lab.sweeps

    for name in gear_lab.__all__:
        value = getattr(gear_lab, name)
        assert not isinstance(value, type(sys)), f"gear_lab.{name} is a module"
    assert callable(gear_lab.compress) and callable(gear_lab.sweep)


def test_import_stays_light():
    """``import gear_lab`` (and so ``gear-lab --help``) does not import torch."""
    code = "import sys, gear_lab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("chosen", "want"),
    [
        ({}, "PASSIVE 10000"),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE -"),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, "PASSIVE -"),
        ({"GOMP_SPINCOUNT": "0"}, "PASSIVE 0"),
    ],
)
def test_import_bounds_how_long_idle_openmp_threads_spin(chosen, want) -> None:
    """Spinning OpenMP threads slow decoding ~2x and a sweep ~3x on a busy 2-core machine,
    sleeping at once slows a sweep 1.6x on an idle one: importing gear_lab before torch sets
    GOMP_SPINCOUNT=10000 (a brief spin) and OMP_WAIT_POLICY=PASSIVE, unless the user chose."""
    import os

    code = (
        "import os, gear_lab, torch; "
        "print(os.environ['OMP_WAIT_POLICY'], os.environ.get('GOMP_SPINCOUNT', '-'))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, **chosen}, capture_output=True, text=True
    )
    assert out.stdout.strip() == want, out.stderr
