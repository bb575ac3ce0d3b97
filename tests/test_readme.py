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
    for name in ("quality", "perplexity", "generation", "speed"):
        assert text.count(f"results:{name}") == 1


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
    assert used == {"models", "info", "eval", "sweep", "check", "ppl", "app"}
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
