"""A non-editable install (``pip install .``, not ``-e``) ships a working studio: ``gear-lab
app --help`` runs from the installed copy, the served studio answers, and a page runs there."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from gear_lab import native
from gear_lab.studio import DUMP_ENV

ROOT = Path(__file__).resolve().parent.parent
GEAR_LAB = [sys.executable, "-c", "import sys; from gear_lab.cli import main; sys.exit(main())"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gear-lab installed with plain ``pip install`` (no ``-e``) into a fresh target folder,
    built from a copy of the sources so that the checkout is left untouched."""
    work = tmp_path_factory.mktemp("install")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gear_lab", src / "gear_lab", ignore=shutil.ignore_patterns("*.pyc"))
    target = work / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    return target


def _env(target: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(target)}


def test_installed_copy_is_the_one_imported(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import gear_lab.studio as s; print(s.STUDIO_SCRIPT)"],
        env=_env(installed),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    script = Path(out.stdout.strip())
    assert script.is_relative_to(installed) and script.is_file()
    assert (script.parent / "app_pages" / "explorer.py").is_file()


def test_app_help_runs_from_a_plain_install(installed: Path, tmp_path: Path) -> None:
    out = subprocess.run(
        [*GEAR_LAB, "app", "--help"],
        env=_env(installed),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "--port" in out.stdout and "studio" in out.stdout.lower()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_plain_install_serves_the_studio(installed: Path, smol_dump: Path, tmp_path: Path):
    port = _free_port()
    proc = subprocess.Popen(
        [*GEAR_LAB, "app", str(smol_dump), "--port", str(port)],
        env=_env(installed),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        health = f"http://127.0.0.1:{port}/_stcore/health"
        while True:
            try:
                with urllib.request.urlopen(health, timeout=2) as response:
                    assert response.read().decode().strip() == "ok"
                    break
            except OSError:
                assert proc.poll() is None, "the studio exited before serving"
                assert time.monotonic() < deadline, "the studio did not answer in 90 s"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_page_runs_from_the_installed_copy(
    installed: Path, smol_dump: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(DUMP_ENV, str(smol_dump))
    monkeypatch.chdir(tmp_path)
    script = installed / "gear_lab" / "studio" / "studio.py"
    at = AppTest.from_file(str(script), default_timeout=300).run()
    assert not at.exception, at.exception
    assert any("Dumps" in t.value for t in at.title)


def test_a_plain_install_ships_the_compiled_cpu_path(installed: Path, tmp_path: Path) -> None:
    """The C++ source is package data, and the installed copy builds and uses it."""
    code = (
        "from gear_lab.compression import cpu_kernel; "
        "print(cpu_kernel.__file__); print(cpu_kernel.kernel_unavailable_reason())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(installed),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    module, reason = out.stdout.strip().splitlines()
    assert Path(module).is_relative_to(installed)
    shipped = [*native.SOURCES, *native.HEADERS]
    assert all((installed / "gear_lab" / "csrc" / name).is_file() for name in shipped)
    assert reason == "None", reason
