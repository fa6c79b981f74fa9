"""Progress reporting: a rich bar on a terminal, a plain log line every few seconds otherwise.

rich only renders the final state when stdout is not a terminal (CI logs, SLURM, nohup), so
there we print periodic lines instead, which also survive in log files.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from rankseg_core.utils.console import make_console

console = make_console(stderr=True)


class Progress:
    """`with Progress(total, "desc", unit="img") as bar: bar.advance(1)`."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", log_every: float = 10.0,
                 enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.log_every = total, desc, unit, log_every
        self.enabled = enabled
        self.done = 0
        self.postfix = ""
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None  # set together with _rich
        self._start = self._last_log = 0.0

    def __enter__(self) -> "Progress":
        self._start = self._last_log = time.monotonic()
        if self.enabled and console.is_terminal:
            self._rich = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[postfix]}"), console=console, transient=False)
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total, rate="", postfix="")
        return self

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self._start, 1e-9)

    def advance(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        if self._rich is not None:
            assert self._task is not None  # set together with _rich (__enter__)
            self._rich.update(self._task, advance=n, rate=f"{self.rate():.1f} {self.unit}/s",
                              postfix=self.postfix)
        elif self.enabled and time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            self._log()

    def _log(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}{of} {self.unit} ({self.rate():.1f} {self.unit}/s){extra}",
              file=sys.stderr, flush=True)

    def __exit__(self, et: type | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and et is None:
            self._log()
