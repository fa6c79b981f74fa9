"""An ordered map over sample keys, in this process or in spawned worker processes.

Every converter pass (`prepare <dataset>`, ADE20K-X's class-frequency pass) runs a per-sample
function over keys and consumes the results in key order, so shards are deterministic
whatever the number of workers.

With workers, this module runs its own small pool rather than `multiprocessing.Pool`, for
three guarantees the stock pools do not give together:

- **A dead worker stops the run at once, naming its sample.** Each worker has its own pipe
  and is sent keys by this process, so this process always knows which keys a worker holds:
  the first key it has not answered is the one it was converting. A worker killed (SIGKILL,
  the out-of-memory killer), crashed in native code (SIGSEGV) or exited (`os._exit`) shows
  up as end-of-file on its pipe or as its process sentinel, and `UserError` names that key
  and how the worker ended. (`Pool` starts a new worker and waits forever for the lost
  task; `ProcessPoolExecutor` raises `BrokenProcessPool` but cannot say which task died.)
- **Bounded memory.** At most `ahead` results are sent-but-not-consumed (default
  `AHEAD_PER_WORKER` x workers), so a slow consumer (the shard writer) holds the workers back
  instead of piling results up in this process (`Pool.imap` has no backpressure).
- **Ctrl-C is the parent's business.** Workers ignore SIGINT (the terminal sends it to the
  whole process group), so they print no tracebacks; the parent's `KeyboardInterrupt` leaves
  the `with` block, which terminates the workers and removes the temp file.

A feeder thread does the talking, so the workers keep converting (up to `ahead`) while the
consumer writes a shard; the consumer's thread only takes finished results in order.
A worker that hangs without dying is not detected (the in-process run would hang too).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from rankseg_core.errors import SampleError, UserError

# Keys a worker holds at once: the one it converts and the next, so it never waits for a
# round trip to this process.
DEPTH = 2
# Results sent-but-not-consumed, per worker. Enough for the workers to go on while the writer
# writes a shard (1000 ADE20K-size samples: ~0.65 s; 2 workers make ~30 in that time) or a
# slow sample holds back the in-order output; small next to the shard the writer holds
# (32 samples of ~135 kB = 4 MB against 135 MB).
AHEAD_PER_WORKER = 16
# Seconds a terminated (SIGTERM) worker gets to exit before SIGKILL, then to be reaped.
_GRACE = 5.0


def default_workers() -> int:
    """One worker per core: every converter's (and `export`'s) default --workers."""
    return os.cpu_count() or 1


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


# --- the worker side ----------------------------------------------------------------------

class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker (set as the re-raised one's cause)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class _Failure:
    """An exception raised by `fn` in a worker (a bug, not a SampleError), sent to the parent."""

    exc: BaseException
    tb: str

    @classmethod
    def of(cls, exc: BaseException) -> _Failure:
        tb = "".join(traceback.format_exception(exc))
        try:  # some exception types cannot be rebuilt from their args on the other side
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - any failure to round-trip means: send its text
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return cls(exc, tb)


def _serve(path: str, conn: Connection) -> None:
    """A worker's life: load `fn` from `path` once, then answer each key sent on `conn`.

    Ends on end-of-file (the parent closed the pipe or died), so orphans do not linger.
    """
    # The parent started us with SIGINT blocked (see `_sigint_held`); ignore it before
    # unblocking, so a Ctrl-C that arrived while we were importing is dropped too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    fn: Callable[[str], Any] | None = None
    broken: _Failure | None = None
    try:
        import cv2

        cv2.setNumThreads(1)  # one OpenCV thread per worker: the workers are the parallelism
        with open(path, "rb") as fh:
            fn = pickle.load(fh)
    except Exception as exc:  # noqa: BLE001 - every key is answered with it; the parent re-raises it
        broken = _Failure.of(exc)
    while True:
        try:
            key = conn.recv()
        except (EOFError, OSError):
            return
        if fn is None:
            result: Any = broken
        else:
            try:
                result = _call(fn, key)
            except Exception as exc:  # noqa: BLE001 - a bug in `fn`: the parent re-raises it
                result = _Failure.of(exc)
        try:
            conn.send(result)
        except (BrokenPipeError, ConnectionResetError):
            return
        except Exception as exc:  # noqa: BLE001 - unpicklable result (pickling fails before sending)
            conn.send(_Failure.of(exc))


# --- the parent side ----------------------------------------------------------------------

@contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs, then deliver it.

    Used while starting the workers and while tearing them down, so neither is cut in half.
    SIGINT is blocked in this thread's signal mask (a spawned worker inherits it, so a Ctrl-C
    while it imports its modules cannot raise there; `_serve` then ignores it) and, in the
    main thread, a handler notes it for re-delivery once the block is over.
    """
    caught: list[int] = []
    handler = None
    # (getsignal is None when a handler was set outside Python: leave that one alone)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
        handler = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) \
        if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending SIGINT lands in `caught`
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
            if caught:
                signal.raise_signal(signal.SIGINT)  # to the handler the caller had


def _how_it_ended(proc: BaseProcess) -> str:
    code = proc.exitcode
    if code is None:
        return f"closed its pipe, pid {proc.pid}"
    if code < 0:
        try:
            return f"killed by signal {-code}, {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass(eq=False)  # hashed by identity
class _Worker:
    proc: BaseProcess
    conn: Connection
    held: deque[int] = field(default_factory=deque)  # indices of keys sent, not yet answered


class _Pool:
    """`workers` spawned processes running `_serve`, and a feeder thread (see the module doc).

    The feeder thread alone talks to the workers: it sends keys (at most DEPTH held by a
    worker, at most `ahead` sent-but-not-consumed) and stores answers in `_done`, so the
    workers keep converting while the consumer writes a shard. The consumer's thread takes
    results from `_done` in key order and wakes the feeder through a pipe as it consumes.
    """

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.path: str | None = None
        self._cv = threading.Condition()  # guards the four fields below
        self._done: dict[int, Any] = {}  # key index -> answer, not yet consumed
        self._consumed = 0
        self._error: BaseException | None = None  # a dead worker (UserError) or a feeder bug
        self._stop = False
        self._feeder: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def start(self, fn: Callable[[str], Any], workers: int) -> None:
        # `fn` may hold a large annotation index (COCO+LVIS: tens of MB). Sent to each child
        # through its start-up pipe, the parent would block on that write until the child had
        # imported its modules, so workers would start one after another. Through a file
        # they start together and each unpickles it once.
        fd, self.path = tempfile.mkstemp(prefix="rankseg-worker-", suffix=".pkl")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(fn, fh, protocol=pickle.HIGHEST_PROTOCOL)
        ctx = mp.get_context("spawn")  # fork + HDF5/OpenCV state is unsafe
        # Spawning starts multiprocessing's resource tracker once, and that unblocks SIGINT
        # in this thread; start it first so the mask below holds while the workers start.
        resource_tracker.ensure_running()
        with _sigint_held():
            for _ in range(workers):
                mine, theirs = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(self.path, theirs), daemon=True,
                                   name="rankseg-worker")
                proc.start()
                theirs.close()  # only the worker holds its end: its death is end-of-file here
                self.workers.append(_Worker(proc, mine))

    def results(self, keys: Sequence[str], ahead: int) -> Iterator[Any]:
        """`fn(key)` (or `Skipped`) for `keys` in order; the workers start on them at once."""
        self._feeder = threading.Thread(target=self._feed, args=(keys, ahead), daemon=True,
                                        name="rankseg-feeder")
        with _sigint_held():  # a Ctrl-C inside Thread.start() leaves a thread close() cannot join
            self._feeder.start()
        return self._collect(len(keys))

    def _collect(self, n: int) -> Iterator[Any]:
        for i in range(n):
            with self._cv:
                while i not in self._done and self._error is None:
                    self._cv.wait()
                if self._error is not None:
                    raise self._error
                res = self._done.pop(i)
                self._consumed = i + 1
            self._wake()  # the feeder may be waiting for room to send more keys
            if isinstance(res, _Failure):  # a bug in `fn`: re-raise it with its traceback
                raise res.exc from RemoteTraceback(res.tb)
            yield res

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full: the feeder has wake-ups pending anyway
            pass

    def _feed(self, keys: Sequence[str], ahead: int) -> None:
        try:
            handles: dict[Any, _Worker] = {}
            for w in self.workers:
                handles[w.conn] = handles[w.proc.sentinel] = w
            sent = received = 0
            while received < len(keys):
                with self._cv:
                    if self._stop:
                        return
                    limit = min(len(keys), self._consumed + ahead)
                dead = []
                for w in self.workers:
                    while len(w.held) < DEPTH and sent < limit and w not in dead:
                        try:
                            w.conn.send(keys[sent])
                        except OSError:  # it died: its sentinel says how, below
                            dead.append(w)
                            break
                        w.held.append(sent)
                        sent += 1
                ready = wait([*handles, self._wake_r])
                if self._wake_r in ready:
                    os.read(self._wake_r, 1 << 16)
                got: dict[int, Any] = {}
                for w in dict.fromkeys(handles[h] for h in ready if h in handles):
                    try:
                        while w.conn.poll():  # what it sent before dying is still good
                            res = w.conn.recv()
                            got[w.held.popleft()] = res
                    except (EOFError, OSError):
                        dead.append(w)
                        continue
                    if not w.proc.is_alive():
                        dead.append(w)
                received += len(got)
                error = UserError(self._obituary(list(dict.fromkeys(dead)), keys)) if dead else None
                with self._cv:
                    self._done.update(got)
                    if error is not None and not self._stop:
                        self._error = error
                    self._cv.notify()
                if dead:
                    return
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave the consumer waiting
            with self._cv:
                self._error = self._error or exc
                self._cv.notify()

    def _obituary(self, dead: list[_Worker], keys: Sequence[str]) -> str:
        parts = []
        for w in dead:
            w.proc.join(_GRACE)  # end-of-file can come a moment before the exit status
            what = f"while converting {keys[w.held[0]]}" if w.held else "between samples"
            parts.append(f"worker process died ({_how_it_ended(w.proc)}) {what}")
        return (f"{'; '.join(parts)}: finished shards are kept; re-run the same command to "
                "resume (lower --workers if it ran out of memory)")

    def close(self) -> None:
        """Stop every worker now (work in progress is dropped) and remove the temp file."""
        with _sigint_held():
            with self._cv:
                self._stop = True
            self._wake()
            for w in self.workers:
                if w.proc.exitcode is None:
                    w.proc.terminate()
            if self._feeder is not None:
                self._feeder.join(2 * _GRACE)  # it returns as soon as the workers are gone
            for w in self.workers:
                w.proc.join(_GRACE)
                if w.proc.exitcode is None:  # SIGTERM cannot be ignored, but be sure
                    w.proc.kill()
                    w.proc.join(_GRACE)
                w.conn.close()
            if self._feeder is None or not self._feeder.is_alive():
                os.close(self._wake_r)
                os.close(self._wake_w)
            if self.path is not None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


@contextmanager
def ordered_map(fn: Callable[[str], Any], keys: Sequence[str], workers: int,
                ahead: int | None = None) -> Iterator[Iterator[Any]]:
    """Yield an iterator of `fn(key)` (or `Skipped`) for `keys`, in order.

    `workers` = 0 runs `fn` lazily in this process. Otherwise `fn` must be picklable (a
    module-level function or a `functools.partial` of one) and runs in up to `workers`
    spawned processes, with at most `ahead` (default `AHEAD_PER_WORKER` x workers) results
    computed but not yet consumed. An exception other than SampleError raised by `fn` is
    re-raised here with the worker's traceback as its cause; a worker that dies raises
    UserError naming the key it was converting. The workers are stopped and the temp file
    removed on leaving the block, also when breaking out early (a failed sample).
    """
    if workers <= 0:
        yield (_call(fn, key) for key in keys)
        return
    if not keys:
        yield iter(())
        return
    workers = min(workers, len(keys))
    pool = _Pool()
    try:
        pool.start(fn, workers)
        yield pool.results(keys, max(1, ahead or AHEAD_PER_WORKER * workers))
    finally:
        pool.close()
