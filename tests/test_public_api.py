"""The public API: every exported name resolves to what it names, in any import order."""

from __future__ import annotations

import subprocess
import sys


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


def test_import_makes_idle_openmp_threads_sleep() -> None:
    """Spinning OpenMP threads slow decoding ~10x on a busy 2-core machine (1 vs 10 tok/s):
    importing gear_lab before torch sets OMP_WAIT_POLICY=PASSIVE, unless the user chose one."""
    import os

    code = "import os, gear_lab, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"
