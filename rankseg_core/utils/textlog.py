"""A text log of what a command printed (`RUN/train.log`): each line timestamped, ISO UTC.

`with capture():` puts a tee on `sys.stdout` / `sys.stderr`: every complete line printed while
it is open (rich consoles, `print`, Python warnings) is kept, stamped with the UTC time it was
completed. Until a file is named the lines wait in memory (a bounded buffer); `attach(path)`
then appends them to the file, and every later line is appended and flushed as it completes.
A command that never reaches `attach` (a refusal before the run directory is claimed, a
non-zero rank under torchrun) writes nothing. Captures nest: an inner one joins the outer.

The outermost capture also logs how the command ended when it ends by an exception: the
`error: ...` line of a user error (the line the CLI prints after the capture has closed),
`interrupted` for Ctrl-C, the exception's type and message for anything else.

A live rich progress bar (on a terminal) redraws itself many times a second; `paused()` keeps
its frames out of the log, and the bar logs a plain line of its own every few seconds
(`log_line`). Escape sequences (colours) are removed; a line redrawn with carriage returns
keeps its last state.
"""

from __future__ import annotations

import collections
import functools
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TypeVar, cast

from rankseg_core.errors import UserError
from rankseg_core.utils.fsio import os_error

F = TypeVar("F", bound=Callable[..., Any])

MAX_PENDING = 2000  # lines kept before a file is attached (the oldest are dropped beyond)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")


def utc_stamp() -> str:
    """Now, UTC, ISO 8601 to the second: 2026-12-05T22:55:18Z (the progress lines' format)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def clean(text: str) -> str:
    """A printed line as a log line: no escape sequences, the last carriage-return state,
    no trailing white space."""
    text = _ANSI.sub("", text)
    return text.rsplit("\r", 1)[-1].rstrip()


class TextLog:
    """Lines being captured; see the module docstring."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._partial: dict[str, str] = {}  # per stream: text after its last newline
        self._pending: collections.deque[str] = collections.deque(maxlen=MAX_PENDING)
        self._file: IO[str] | None = None
        self.path: Path | None = None
        self._paused = 0

    def feed(self, stream: str, text: str) -> None:
        """Text written to `stream` ("stdout" / "stderr")."""
        with self._lock:
            if self._paused:
                return
            buf = self._partial.get(stream, "") + text
            *lines, self._partial[stream] = buf.split("\n")
            for line in lines:
                self.line(line)

    def line(self, text: str) -> None:
        """Log one line (stamped now, unless it already starts with a stamp); blank lines are dropped."""
        text = clean(text)
        if not text:
            return
        if not STAMP.match(text):
            text = f"{utc_stamp()} {text}"
        with self._lock:
            if self._file is None:
                self._pending.append(text)
                return
            try:
                self._file.write(text + "\n")
                self._file.flush()
            except (OSError, ValueError):  # a full disk must not stop training: the log stops
                self._close_file()

    def attach(self, path: Path, header: str = "") -> None:
        """Append to `path` from now on, first the lines printed so far (then `header`, if any)."""
        with self._lock:
            if self._file is not None:
                return
            try:
                self._file = open(path, "a", encoding="utf-8", errors="backslashreplace")
            except OSError as exc:
                raise os_error(path, exc) from None
            self.path = Path(path)
            pending, self._pending = list(self._pending), collections.deque(maxlen=MAX_PENDING)
            for text in pending:
                self.line(text)
            if header:
                self.line(header)

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            for stream in list(self._partial):
                rest = self._partial.pop(stream)
                if rest:
                    self.line(rest)
            self._close_file()
            self._pending.clear()


class _Tee:
    """A text stream that writes through to `stream` and feeds `log` (everything else:
    isatty, encoding, fileno, flush ... is the stream's)."""

    def __init__(self, stream: Any, name: str, log: TextLog) -> None:
        self._stream, self._name, self._log = stream, name, log

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        try:
            self._log.feed(self._name, text)
        except Exception:  # the log must never break printing
            pass
        return cast(int, n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_current: TextLog | None = None


def _ending(exc: BaseException) -> str | None:
    """The log line of a command that ends by `exc`; None for a successful exit."""
    code = getattr(exc, "code", getattr(exc, "exit_code", 1))  # SystemExit / click's Exit (typer.Exit)
    if isinstance(exc, SystemExit) or type(exc).__name__ == "Exit":
        return None if code in (0, None) else f"exit code {code}"
    if isinstance(exc, UserError):
        return f"error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"error: {type(exc).__name__}: {exc}".splitlines()[0]


@contextmanager
def capture() -> Iterator[TextLog]:
    """Capture printed lines until the block ends (see the module docstring)."""
    global _current
    if _current is not None:
        yield _current
        return
    log = _current = TextLog()
    saved = sys.stdout, sys.stderr
    tees = _Tee(sys.stdout, "stdout", log), _Tee(sys.stderr, "stderr", log)
    sys.stdout, sys.stderr = tees[0], tees[1]  # text streams by delegation (__getattr__)
    try:
        yield log
    except BaseException as exc:
        ending = _ending(exc)
        if ending:
            log.line(ending)
        raise
    finally:
        # Put the streams back unless someone replaced them meanwhile (then theirs stays).
        if sys.stdout is tees[0]:
            sys.stdout = saved[0]
        if sys.stderr is tees[1]:
            sys.stderr = saved[1]
        _current = None
        log.close()


def captured(fn: F) -> F:
    """`fn` run inside `capture()` (for a command: the lines it prints before and after its
    engine call go to the same log)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with capture():
            return fn(*args, **kwargs)

    return cast(F, wrapper)


def attach(path: str | Path, header: str = "") -> None:
    """Send the current capture to `path` (no-op outside a capture)."""
    if _current is not None:
        _current.attach(Path(path), header)


def log_line(text: str) -> None:
    """Log a line that is not printed (a progress bar's state); no-op outside a capture."""
    if _current is not None:
        _current.line(text)


@contextmanager
def paused() -> Iterator[None]:
    """Keep what is printed meanwhile out of the log (a live progress bar's frames)."""
    if _current is None:
        yield
        return
    with _current.paused():
        yield
