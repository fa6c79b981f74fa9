"""An ordered map over sample keys, in this process or in spawned worker processes.

Every converter pass (`prepare <dataset>`, ADE20K-X's class-frequency pass) runs a per-sample
function over keys and consumes the results in key order, so shards are deterministic
whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import SampleError


@dataclass
class Skipped:
    """A sample whose function raised SampleError, with the message (which names the file)."""

    key: str
    reason: str


def _call(fn: Callable[[str], Any], key: str) -> Any:
    try:
        return fn(key)
    except SampleError as exc:
        return Skipped(key, str(exc))


_FN: Callable[[str], Any] | None = None


def _init(path: str) -> None:
    import cv2

    # One OpenCV thread per worker: the workers are the parallelism.
    cv2.setNumThreads(1)
    global _FN
    with open(path, "rb") as fh:
        _FN = pickle.load(fh)


def _work(key: str) -> Any:
    assert _FN is not None
    return _call(_FN, key)


@contextmanager
def ordered_map(fn: Callable[[str], Any], keys: Sequence[str], workers: int,
                chunksize: int = 4) -> Iterator[Iterator[Any]]:
    """Yield an iterator of `fn(key)` (or `Skipped`) for `keys`, in order.

    `workers` = 0 runs `fn` lazily in this process. Otherwise `fn` must be picklable (a
    module-level function or a `functools.partial` of one) and runs in `workers` spawned
    processes (fork + HDF5/OpenCV state is unsafe). The pool is terminated on leaving the
    block, so breaking out early (a failed sample) leaves no workers behind.
    """
    if workers <= 0:
        yield (_call(fn, key) for key in keys)
        return
    # `fn` may hold a large annotation index (COCO+LVIS: tens of MB). Passed as a Pool
    # initarg it would be written to each child's pipe, and the parent blocks on that write
    # until the child has imported its modules, so workers would start one after another.
    # Through a file they start together and each unpickles it once.
    fd, path = tempfile.mkstemp(prefix="rankseg-worker-", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(fn, fh, protocol=pickle.HIGHEST_PROTOCOL)
        pool = mp.get_context("spawn").Pool(workers, initializer=_init, initargs=(path,))
        try:
            yield pool.imap(_work, keys, chunksize=chunksize)
        finally:
            pool.terminate()
            pool.join()
    finally:
        os.unlink(path)
