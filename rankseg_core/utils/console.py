"""Consoles for people and for logs: rich on a terminal, whole lines in pipes and log files.

Two things rich does by default break logs, so every Console of rankseg comes from here:
- Off a terminal rich assumes 80 columns and hard-wraps every longer line, cutting paths in
  two (grep and copy-paste then fail). Off a terminal, unless COLUMNS is set, these consoles
  are as wide as any line.
- A file name that is not valid UTF-8 reaches Python as a str with surrogate escapes, which
  stdout refuses to encode (UnicodeEncodeError in the middle of a report). These consoles
  write such bytes as `\\xNN` instead.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any, cast

from rich.console import Console, ConsoleDimensions

# Wide enough for any line rankseg prints; rich pads nothing to the width (tables do not
# expand), so a large value costs nothing.
LOG_WIDTH = 100_000


def printable(text: str, encoding: str | None = "utf-8") -> str:
    """`text` as it can be written to a stream in `encoding`: bytes of a non-UTF-8 file name
    (surrogate escapes, as `os.fsdecode` makes them) become `\\xNN`, other characters the
    encoding lacks become `\\uNNNN`. Never raises."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is not an escaped byte
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    enc = encoding or "utf-8"
    return text.encode(enc, "backslashreplace").decode(enc)


class _StdStream:
    """`sys.stdout` / `sys.stderr` as they are at each write (test runners swap them), writing
    what the stream cannot encode through `printable` instead of failing."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _stream(self) -> Any:
        return getattr(sys, self._name)

    def write(self, text: str) -> int:
        stream = self._stream()
        try:
            return stream.write(text)
        except UnicodeEncodeError:
            return stream.write(printable(text, getattr(stream, "encoding", None)))

    def __getattr__(self, name: str) -> Any:  # isatty, flush, encoding, fileno, ...
        return getattr(self._stream(), name)


class _LogConsole(Console):
    """A Console that does not wrap lines when it writes to a pipe or a file."""

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self.is_terminal or self._width is not None or os.environ.get("COLUMNS", "").isdigit():
            return size
        return ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        # mypy sees the property object `Console.size` as its (overloaded) accessor functions.
        fset = cast(property, Console.size).fset
        assert fset is not None  # rich's Console.size has a setter
        fset(self, new_size)


def make_console(stderr: bool = False) -> Console:
    """The Console for stdout (results) or stderr (notes, progress, errors)."""
    # _StdStream is a text stream by delegation (__getattr__), which mypy cannot see.
    stream = cast(IO[str], _StdStream("stderr" if stderr else "stdout"))
    return _LogConsole(file=stream, stderr=stderr)
