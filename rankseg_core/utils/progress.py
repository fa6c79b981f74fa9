"""Progress reporting: a rich bar on a terminal, a plain log line every few seconds otherwise.

rich only renders the final state when stdout is not a terminal (CI logs, SLURM, nohup), so
there we print periodic lines instead, which also survive in log files. Each plain line says
when (UTC), how far, how fast, the time spent and the time left (ETA), e.g.

    2026-12-05T22:55:18Z train: 1200/160000 it (2.31 it/s, elapsed 0:08:39, ETA 19:05:41) loss 1.93

The rate counts only what this process did, so a resumed run (`done` set to where it starts)
gets a true ETA. Inside a text-log capture (textlog.py, `RUN/train.log`) a terminal's bar is
kept out of the log and the same plain line is logged every `log_every` seconds instead.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from datetime import timedelta
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from rankseg_core.utils import textlog
from rankseg_core.utils.console import make_console
from rankseg_core.utils.environment import utc_now

console = make_console(stderr=True)


class Progress:
    """`with Progress(total, "desc", unit="img") as bar: bar.advance(1)`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", log_every: float = 10.0,
                 enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.log_every = total, desc, unit, log_every
        self.enabled = enabled
        self._done = 0
        self._counted = 0  # advanced by this process (the rate's numerator; `done` may start > 0)
        self.postfix = ""
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None  # set together with _rich
        self._start = self._last_log = 0.0
        self._held = ExitStack()

    @property
    def done(self) -> int:
        return self._done

    @done.setter
    def done(self, value: int) -> None:
        """Where the count starts (a resumed run): not work done now, so not in the rate."""
        self._done = value
        if self._rich is not None:
            assert self._task is not None  # set together with _rich
            self._rich.reset(self._task, completed=value)

    def __enter__(self) -> "Progress":
        self._start = self._last_log = time.monotonic()
        if self.enabled and console.is_terminal:
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"), console=console, transient=False)
            self._held.enter_context(textlog.paused())  # the bar's frames are not log lines
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total, rate="", postfix="")
        return self

    def rate(self) -> float:
        return self._counted / max(time.monotonic() - self._start, 1e-9)

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        self._done += n
        self._counted += n
        if postfix is not None:
            self.postfix = postfix
        if self._rich is not None:
            assert self._task is not None  # set together with _rich (__enter__)
            self._rich.update(self._task, advance=n, rate=f"{self.rate():.1f} {self.unit}/s",
                              postfix=self.postfix)
        if self.enabled and time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            self._log()

    def line(self) -> str:
        """The plain progress line: UTC time, count, rate, elapsed and remaining time."""
        elapsed = time.monotonic() - self._start
        of = f"/{self.total}" if self.total is not None else ""
        timing = f"{self.rate():.2f} {self.unit}/s, elapsed {_clock(elapsed)}"
        if self.total is not None:
            left, rate = max(self.total - self._done, 0), self.rate()
            eta = _clock(left / rate) if left and rate > 0 else ("?" if left else _clock(0))
            timing += f", ETA {eta}"
        extra = f" {self.postfix}" if self.postfix else ""
        return f"{utc_now()} {self.desc}: {self._done}{of} {self.unit} ({timing}){extra}"

    def _log(self) -> None:
        if self._rich is not None:
            textlog.log_line(self.line())  # the terminal shows the bar; the log gets the line
        else:
            print(self.line(), file=sys.stderr, flush=True)

    def __exit__(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._held.close()
            if et is None:
                textlog.log_line(self.line())
        elif self.enabled and et is None:
            self._log()


def _clock(seconds: float) -> str:
    """h:mm:ss (days spelled out beyond 24 h, as timedelta prints them)."""
    return str(timedelta(seconds=round(seconds))) if seconds < 1e8 else "?"
