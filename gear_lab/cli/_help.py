"""Help text shared by the subcommands: plain text from docstrings and a formatter for lists."""

from __future__ import annotations

import argparse
import re
import textwrap

# :func:`x`, :class:`~a.b` -> x, b ; ``code`` -> code
_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def plain(doc: str) -> str:
    """A docstring's reST markup as plain text for ``--help`` (roles and literals unwrapped)."""
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", doc))


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description as usual, but keeps the lines of a paragraph that
    starts with two spaces (a list: ``  name  text``) one per entry, wrapped under the text."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.strip("\n").split("\n\n"):
            if not para.startswith("  "):
                paragraphs.append(super()._fill_text(para, width, indent))
                continue
            lines = []
            for line in para.splitlines():
                head = re.match(r"\s*\S+\s+", line)
                hang = indent + " " * (head.end() if head else 0)
                lines.append(
                    textwrap.fill(line, width, initial_indent=indent, subsequent_indent=hang)
                )
            paragraphs.append("\n".join(lines))
        return "\n\n".join(paragraphs)
