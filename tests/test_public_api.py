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
