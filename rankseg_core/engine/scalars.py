"""TensorBoard scalars of a training run: every record of metrics.jsonl, mirrored as it is logged.

    RUN/tensorboard/events.out.tfevents.*    written by torch's SummaryWriter (rank 0 only)

metrics.jsonl stays the record of a run; the events are a live view of it for TensorBoard
(`tensorboard --logdir runs/`), written through `torch.utils.tensorboard`, which needs the
`tensorboard` package. A record {"type": T, "iter": s, k: v, ...} becomes the scalar `T/k` = v
at step s for each number v (`record_scalars`); `iter`, `type`, the `final` flag and undefined
values (null) are not scalars.

Resume. TensorBoard shows the points of every event file of a run, so a resumed run must hide
what the interrupted one logged after the checkpoint it restarts from (metrics.jsonl drops
those records: `runs.truncate_metrics`). The writer of a run resumed at iteration s is opened
with `purge_step=s` (a session-start event: readers hide every earlier point at step >= s),
then the records of metrics.jsonl at iteration s, logged before that checkpoint, are written
again. A resumed run whose directory has no events yet (TensorBoard was off or not installed)
gets the whole history of metrics.jsonl first, so its events always equal the log.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from rankseg_core.engine import runs
from rankseg_core.errors import UserError
from rankseg_core.utils.fsio import os_error

TENSORBOARD = "tensorboard"  # RUN/tensorboard/
EVENTS_PREFIX = "events.out.tfevents."
# Record fields that are not measurements.
NOT_SCALARS = frozenset({"type", "iter", "final"})
INSTALL = "pip install tensorboard (or the toolkit's extra: pip install 'rankseg-toolkit[tensorboard]')"


@functools.cache
def tensorboard_available() -> bool:
    """Whether torch's SummaryWriter can be imported (it needs the `tensorboard` package)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:  # ModuleNotFoundError, or a tensorboard older than torch accepts
        return False
    return True


def resolve_tensorboard(setting: bool | None) -> bool:
    """Whether a run with config `tensorboard: setting` writes events.

    None (the default) = when the package is importable; True = required (UserError without
    it, raised before the run writes anything); False = never.
    """
    if setting is None:
        return tensorboard_available()
    if setting and not tensorboard_available():
        raise UserError(f"tensorboard=true: the tensorboard package is not installed; {INSTALL}, or train "
                        "with --no-tensorboard (metrics.jsonl is written either way)")
    return bool(setting)


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metrics.jsonl record: {"<type>/<key>": value}.

    Numbers only (booleans and null are skipped), in the record's order.
    """
    kind = str(record.get("type", "train"))
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)}


def event_files(run_dir: str | Path) -> list[Path]:
    """RUN/tensorboard/events.out.tfevents.*, in the order TensorBoard reads them (by name)."""
    folder = Path(run_dir) / TENSORBOARD
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(EVENTS_PREFIX) and p.is_file())


class ScalarLog:
    """Writes metrics.jsonl records as TensorBoard scalars; does nothing when `writer` is None
    (TensorBoard off, or not the main process). A context manager: closed however training ends."""

    def __init__(self, writer: Any = None, folder: Path | None = None) -> None:
        self._writer = writer
        self.folder = folder

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def write(self, record: dict[str, Any], flush: bool = True) -> None:
        """Add the record's scalars at step record["iter"].

        Flushed at once by default: a record is written every `log_every` steps, and a crash
        must not lose the points a resume keeps (those up to its checkpoint), since only the
        records at the checkpoint's own iteration are written again.
        """
        if self._writer is None:
            return
        step = int(record["iter"])
        try:
            for tag, value in record_scalars(record).items():
                self._writer.add_scalar(tag, value, step)
        except OSError as exc:
            raise os_error(self.folder or TENSORBOARD, exc) from None
        if flush:
            self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            try:
                self._writer.flush()
            except OSError as exc:
                raise os_error(self.folder or TENSORBOARD, exc) from None

    def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            try:
                writer.close()
            except OSError as exc:
                raise os_error(self.folder or TENSORBOARD, exc) from None

    def __enter__(self) -> ScalarLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_scalars(run_dir: str | Path, setting: bool | None, start: int, main: bool = True) -> ScalarLog:
    """The scalar log of a run starting (start = 0) or resuming at iteration `start`.

    Call after the resume state was checked and metrics.jsonl truncated to `start` (train.py
    `_setup`): a refused resume must leave RUN as it was. Only the main process writes.
    """
    if not main or not resolve_tensorboard(setting):
        return ScalarLog()
    from torch.utils.tensorboard import SummaryWriter

    folder = Path(run_dir) / TENSORBOARD
    previous = event_files(run_dir)
    try:
        if start == 0:
            # A fresh run: events here are from an attempt that never checkpointed (its
            # metrics.jsonl was removed too: train.prepare_run).
            for path in previous:
                path.unlink()
            previous = []
        _wait_for_later_name(previous)
        # purge_step: readers hide the interrupted run's points at steps >= start.
        writer = SummaryWriter(str(folder), purge_step=start if previous else None, flush_secs=30)
    except OSError as exc:
        raise os_error(folder, exc) from None
    log = ScalarLog(writer, folder)
    if start:
        history = [r for r in runs.read_metrics(run_dir) if isinstance(r.get("iter"), int) and r["iter"] <= start]
        for record in history if not previous else [r for r in history if r["iter"] == start]:
            log.write(record, flush=False)
        log.flush()
    return log


def _wait_for_later_name(previous: list[Path]) -> None:
    """TensorBoard reads a run's event files in name order, and a name starts with the second it
    was created (`events.out.tfevents.<seconds>.<host>.<pid>.<n>`). A resume in the same second
    as the previous file (a run that failed at once, or a test) could sort before it and have
    its purge applied first: wait for the next second then. Costs at most a second, rarely.
    (A newest name from a later second than now, a clock set back, is not waited for.)"""
    newest = 0
    for path in previous:
        head = path.name[len(EVENTS_PREFIX):].split(".")[0]
        if head.isdigit():
            newest = max(newest, int(head))
    now = time.time()
    if int(now) == newest:
        time.sleep(newest + 1 - now + 0.01)
