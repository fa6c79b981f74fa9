"""One writer per directory: an advisory `flock` on a lock file inside it.

`with dir_lock(out, what="train"):` refuses, with one line naming the holder (pid and host),
when another process already writes `out`. The kernel drops a `flock` when its process dies,
however it dies (kill -9, out of memory, power loss on the client), so a crash never leaves a
lock behind that blocks the next run; there is nothing to clean up by hand.

Shared mode is for cooperating writers: the `--shard-index` parts of one conversion each hold
the directory lock shared (so they run side by side) and an exclusive lock of their own part,
while a whole-directory run holds the directory lock exclusively.

File systems without `flock` support (some Lustre / old NFS mounts) cannot lock: a note is
printed and the work goes on unlocked, as it did before locks existed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rankseg_core.errors import UserError

LOCK_NAME = ".rankseg.lock"  # every lock file's name starts with this (see `is_lock_file`)

_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def is_lock_file(name: str) -> bool:
    """True for lock files, which do not count as content when a directory must be empty."""
    return name.startswith(LOCK_NAME)


class DirLock:
    """A held lock: `release()` it (or let the process end, which releases it too)."""

    def __init__(self, path: Path, fd: int | None, exclusive: bool) -> None:
        self.path, self.fd, self.exclusive = path, fd, exclusive

    def release(self) -> None:
        if self.fd is None:
            return
        if self.exclusive:
            # Nobody else holds it, so the file can go; a process that opened it before the
            # unlink notices (inode check in `acquire`) and retries on a fresh file.
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"{info['what']}, pid {int(info['pid'])} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"


def acquire(directory: str | Path, what: str, *, shared: bool = False, name: str = LOCK_NAME) -> DirLock:
    """Lock `directory` (which must exist) without waiting; UserError naming the holder if taken.

    `what` names the command holding it ("prepare", "train") for the other process's message;
    `name` (starting with LOCK_NAME) selects a separate lock, e.g. one per conversion part.
    """
    directory = Path(directory)
    path = directory / name
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            from rankseg_core.utils.fsio import os_error

            raise os_error(path, exc, "cannot create the lock file") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                from rankseg_core.utils.progress import console

                console.print(f"note: {directory}: this file system does not support file locks; "
                              f"make sure no other rankseg process writes it at the same time",
                              highlight=False, soft_wrap=True)
                return DirLock(path, None, False)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{directory} is being written by another rankseg process "
                            f"({_holder(path)}); wait for it to finish or stop it (if that process "
                            f"is gone, as on a crashed NFS client, delete {path})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # unlinked by the previous holder between our open and our flock
            os.close(fd)
            continue
        if not shared:  # shared holders are several: the file names the exclusive one only
            info = json.dumps({"what": what, "pid": os.getpid(), "host": socket.gethostname()})
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode(), 0)
        return DirLock(path, fd, not shared)


@contextmanager
def dir_lock(directory: str | Path, what: str, *, shared: bool = False,
             name: str = LOCK_NAME) -> Iterator[DirLock]:
    """`with dir_lock(out, what="train"):` hold the lock of `out` for the block."""
    lock = acquire(directory, what, shared=shared, name=name)
    try:
        yield lock
    finally:
        lock.release()


# Locks a command holds until it ends (or `release_held`): the converters' `claim` takes the
# output's lock early (ADE20K-X writes a cache before converting) and keeps it through the
# conversion; a second `claim` of the same directory in the same process reuses it.
_HELD: dict[Path, tuple[list[tuple[str, bool]], list[DirLock]]] = {}


def hold(directory: str | Path, what: str, locks: list[tuple[str, bool]]) -> None:
    """Take `locks` ((name, shared) pairs, in order) on `directory` for this process, once."""
    key = Path(directory).resolve()
    spec, held = _HELD.get(key, (None, []))
    if spec == locks and all(_still_held(lk) for lk in held):
        return
    release_held(directory)
    taken: list[DirLock] = []
    try:
        for name, shared in locks:
            taken.append(acquire(key, what, shared=shared, name=name))
    except BaseException:
        for lk in reversed(taken):
            lk.release()
        raise
    _HELD[key] = (list(locks), taken)


def release_held(directory: str | Path) -> None:
    """Release what `hold` took on `directory` (nothing if it holds nothing)."""
    for lk in reversed(_HELD.pop(Path(directory).resolve(), (None, []))[1]):
        lk.release()


def _still_held(lock: DirLock) -> bool:
    """False when the directory was deleted or replaced since (tests re-create directories)."""
    if lock.fd is None:  # a file system without locks: nothing to re-take
        return True
    try:
        return os.stat(lock.path).st_ino == os.fstat(lock.fd).st_ino
    except OSError:
        return False
