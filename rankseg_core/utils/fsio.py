"""Atomic file writes that cannot destroy anything, and OS errors as one-line user errors.

Every result file rankseg writes (shard sidecars, `dataset.json`, eval / viz JSON, run files)
goes through `atomic_write_bytes`: write `<path>.tmp`, fsync, rename over `<path>`, fsync the
directory. Readers therefore see the old file or the new one, never half of one. The target
must be a regular file (or not exist): renaming over `/dev/full`, a directory or a FIFO would
replace the device node or fail half-way, so such a target is refused before anything is
written. A failed write removes its temp file and names the path and the reason.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from rankseg_core.errors import UserError
from rankseg_core.utils import jsonio

# errno -> (reason, what to do); anything else gets the OS's own wording.
_REASONS = {
    errno.ENOSPC: ("no space left on device", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you can write to or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to or fix its permissions"),
    errno.ENOENT: ("no such file or directory", "create the directory first or fix the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "fix the path"),
    errno.EISDIR: ("is a directory", "give a file name"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
    errno.EIO: ("input/output error", "check the disk"),
}


def os_error(path: str | Path, exc: OSError, doing: str = "cannot write") -> UserError:
    """One-line UserError for an OSError on `path`: what failed, why, and the fix."""
    reason, fix = _REASONS.get(exc.errno or 0, ((exc.strerror or str(exc)).lower(), "check the path"))
    return UserError(f"{path}: {doing} ({reason}): {fix}")


def check_writable_target(path: Path) -> None:
    """Refuse a target that exists and is not a regular file (device, directory, FIFO, socket)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise os_error(path, exc) from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise UserError(f"{path} is {kind}: rankseg only writes regular files, give a file path")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    """Remove a temp file after a failure; a failure to remove must not hide the first error."""
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via `<path>.tmp`, fsync, rename: readers never see a half-written file.

    Raises UserError (naming `path` and the reason) when the target is not a regular file or
    the write fails (full disk, read-only file system, permission denied); the temp file is
    removed then, and the previous `path`, if any, is left as it was.
    """
    path = Path(path)
    check_writable_target(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        # O_NOFOLLOW: a symlink planted at the temp name must not redirect the write.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise os_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        remove_quietly(tmp)
        raise os_error(path, exc) from None
    except BaseException:  # Ctrl-C mid-write: no temp file left behind either
        remove_quietly(tmp)
        raise
    try:
        fsync_dir(path.parent)
    except OSError:  # some file systems refuse fsync on a directory; the rename is done
        pass


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Strict JSON (no NaN / Infinity: they become null), indented, written atomically."""
    atomic_write_bytes(path, (jsonio.dumps(obj, indent=1) + "\n").encode())
