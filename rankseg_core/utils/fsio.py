"""Atomic file writes that cannot destroy anything, and OS errors as one-line user errors.

Every result file rankseg writes (shard sidecars, `dataset.json`, eval / viz JSON, run files)
goes through `atomic_write_bytes`: write `<path>.tmp`, fsync, rename over `<path>`, fsync the
directory. Readers therefore see the old file or the new one, never half of one. The target
must be a regular file (or not exist): renaming over `/dev/full`, a directory or a FIFO would
replace the device node or fail half-way, so such a target is refused before anything is
written. A failed write removes its temp file and names the path and the reason.

Reading is guarded the other way round (`open_regular`, `read_regular`): a FIFO, a device or a
link to one where a file is expected would block or stream forever, so only regular files are
opened, and a whole-file read is bounded.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from rankseg_core.errors import UserError
from rankseg_core.utils import jsonio

# Written first into a directory of outputs (`predict --out`, `eval --save-predictions`): names
# the command that owns the directory, so a later run of that command may write there again
# and no command writes over files it did not create; the files there are never inputs.
OUTPUTS_MARKER = ".rankseg-predict.json"
_MAX_MARKER_BYTES = 1 << 16

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
    errno.EFBIG: ("file too large", "the file system or a file size limit (ulimit -f) refuses it: choose "
                  "another location or raise the limit"),
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


def _not_regular(path: str | Path, mode: int, what: str) -> str:
    kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
    return f"{path} is {kind}: give the {what} as a regular file"


def open_regular(path: str | Path, what: str = "file",
                 error: Callable[[str], Exception] = UserError) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (links followed).

    Raises `error(message)` naming the path for a directory, FIFO, device or socket (without
    reading from it: opening a FIFO would wait for a writer, /dev/zero never ends); OSError
    (missing, permission denied) is left to the caller, which knows what the file is for.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # refused before open: opening a device can have effects of its own
        raise error(_not_regular(path, mode, what))
    # O_NONBLOCK: should a FIFO replace the file between stat and open, the open does not wait.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(_not_regular(path, mode, what))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, what: str, max_bytes: int,
                 error: Callable[[str], Exception] = UserError) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them.

    Raises `error(message)` naming the path for a file that is not regular (`open_regular`) or
    larger than `max_bytes` (checked on its size before reading, and again while reading, for
    a file that grows or lies about its size); OSError is left to the caller.
    """
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        parts, total = [], 0
        if size <= max_bytes:
            # The stated size first (one read, no copy), then on to the end: some files grow
            # while read, and /proc files state 0 bytes.
            want = size + 1
            while total <= max_bytes and (part := f.read(min(want, max_bytes + 1 - total))):
                parts.append(part)
                total += len(part)
                want = 1 << 20
        if size > max_bytes or total > max_bytes:
            shown = f"{size:,} bytes" if size > max_bytes else "larger than it stated"
            raise error(f"{path}: {what} is {shown}, over rankseg's limit of {max_bytes:,} bytes: "
                        "check that this is the right file")
    return parts[0] if len(parts) == 1 else b"".join(parts)


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


def write_synced(tmp: Path, data: bytes) -> None:
    """Write `data` to the temp file `tmp` and fsync it; OSError is the caller's (it removes `tmp`)."""
    # O_NOFOLLOW: a symlink planted at the temp name must not redirect the write.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
        write_synced(tmp, data)
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


def _marker_owner(marker: Path) -> str | None:
    """The command an outputs marker names, or None (no marker, or not one rankseg wrote)."""
    try:
        doc = jsonio.loads(read_regular(marker, "marker", _MAX_MARKER_BYTES))
    except (OSError, UserError, ValueError):
        return None
    owner = doc.get("written_by") if isinstance(doc, dict) else None
    return owner if isinstance(owner, str) else None


def claim_out_dir(out: Path, written_by: str, option: str, is_lock_file: Callable[[str], bool]) -> None:
    """Make the output directory `out` ours: refuse it when it holds files that no earlier run of
    `written_by` (e.g. "rankseg predict") wrote, since its outputs could overwrite them; else
    create it and write OUTPUTS_MARKER. Lock files (`lock.is_lock_file`, passed in: lock.py
    reports its errors through this module) do not count. Call with `out` locked."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if _marker_owner(out / OUTPUTS_MARKER) != written_by:
            # The marker (and its temp file) may be another process of this same run writing it.
            ours = (OUTPUTS_MARKER, OUTPUTS_MARKER + ".tmp")
            other = next((f.name for f in sorted(out.iterdir()) if not is_lock_file(f.name) and f.name not in ours),
                         None)
            if other is not None:
                raise UserError(f"{option} {out} already holds files that `{written_by}` did not write (e.g. {other}), "
                                f"which its outputs could overwrite; choose a new or empty {option}")
    except OSError as exc:
        raise os_error(out, exc, "cannot create the output directory") from None
    atomic_write_json(out / OUTPUTS_MARKER, {"written_by": written_by})
