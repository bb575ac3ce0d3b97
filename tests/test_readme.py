"""The README's Python examples run as written (on the session's small dump instead of the demo's).

Every ```python block of README.md is executed in order in one namespace, with the demo dump's
path replaced by the ``smol_dump`` fixture; an exception fails the test. The command lines the
README shows are checked against the real parsers.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
DEMO_DUMP = "dumps/smollm2-135m-pydoc.h5"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_two_setup_commands_and_result_slots() -> None:
    text = README.read_text()
    setup = _blocks("sh")[0]
    assert [line.split("#")[0].strip() for line in setup.splitlines()] == ["make demo", "make test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    results = (README.parent / "docs" / "results.md").read_text()
    assert "(docs/results.md)" in text  # the long results live there, linked from the README
    for name in ("quality", "perplexity", "generation", "speed"):
        assert results.count(f"results:{name}") == 1 and f"results:{name}" not in text
    assert len(text) < 28_000, (
        "keep the README a set-up and a short tour (results: docs/results.md)"
    )


def _commands() -> list[list[str]]:
    """Every gear-capture / gear-lab command line of the README's sh blocks."""
    commands = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] in ("gear-capture", "gear-lab"):
                commands.append(words)
    return commands


def test_readme_command_lines_parse() -> None:
    from gear_lab.cli import build_parser
    from gear_lab.cli.capture import build_capture_parser

    commands = _commands()
    used = {words[1] for words in commands if words[0] == "gear-lab"}
    assert used == {"models", "info", "eval", "sweep", "check", "ppl", "allocate", "needle", "app"}
    for words in commands:
        parser = build_capture_parser() if words[0] == "gear-capture" else build_parser()
        args = parser.parse_args(words[1:])  # SystemExit (a failure) on an unknown option
        assert words[0] == "gear-capture" or callable(args.func)


@pytest.mark.slow
def test_readme_python_blocks_run(smol_dump: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _blocks("python")
    assert len(blocks) >= 3
    assert sum(block.count(f'"{DEMO_DUMP}"') for block in blocks) == 1
    namespace: dict[str, object] = {"__name__": "readme"}
    for block in blocks:
        code = block.replace(f'"{DEMO_DUMP}"', repr(str(smol_dump)))
        exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "bits per entry" in out and "bytes held vs" in out
    # every live example compresses: bytes held below full precision
    held, full = map(int, re.search(r"(\d+) bytes held vs (\d+) in full precision", out).groups())
    assert 0 < held < full
    comp, full = map(int, re.search(r"(\d+) bytes compressed vs (\d+) full", out).groups())
    assert 0 < comp < full


def test_readme_examples_write_where_git_ignores() -> None:
    """CLI outputs land under dumps/ (ignored), never in the repo root; the first capture does not
    collide with `make demo`'s dump; the live examples fill at least one cache block."""
    ignored = (README.parent / ".gitignore").read_text().split()
    makefile = (README.parent / "Makefile").read_text()
    model = re.search(r"^MODEL \?= (\S+)", makefile, re.M).group(1)
    demo = makefile.split("DEMO_DUMP := ")[1].split()[0].replace("$(MODEL)", model)
    assert demo == DEMO_DUMP
    captures = [w for w in _commands() if w[0] == "gear-capture"]
    assert captures[0][captures[0].index("--out") + 1] != demo
    for words in _commands():
        if "--out" in words:
            out = Path(words[words.index("--out") + 1])
            assert out.parent == Path("dumps") and f"dumps/*{out.suffix}" in ignored, out
        if words[:2] == ["gear-lab", "check"]:
            prompt = words[words.index("--prompt") + 1]
            block = int(words[words.index("--block-size") + 1]) if "--block-size" in words else 64
            assert "topics" in prompt or block <= 16, words


def test_make_test_ensures_chromium_before_anything() -> None:
    """`make test` runs .ci/ensure-chromium first (apt-installs chromium, or stops with one line
    saying what to run); .ci/run uses the same script."""
    import os
    import subprocess

    root = README.parent
    # run as a top-level make even when the suite itself runs under `make test` (CI)
    env = {k: v for k, v in os.environ.items() if k not in {"MAKELEVEL", "MAKEFLAGS", "MFLAGS"}}
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "test"],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
    )
    assert dry.returncode == 0 and dry.stdout.splitlines()[0] == ".ci/ensure-chromium"
    assert ".ci/ensure-chromium" in (root / ".ci" / "run").read_text()
    script = (root / ".ci" / "ensure-chromium").read_text()
    assert "apt-get install -y -q chromium" in script and "exit 1" in script
