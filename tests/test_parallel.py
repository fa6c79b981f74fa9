"""The ordered map every converter pass runs on: order, skips, faults, backpressure, shutdown."""

from __future__ import annotations

import ctypes
import functools
import multiprocessing as mp
import os
import resource
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankseg_core.errors import SampleError, UserError
from rankseg_core.utils.parallel import AHEAD_PER_WORKER, Skipped, ordered_map

# Makers are module-level so spawned workers can unpickle them.


def _square_or_fail(key: str) -> int:
    if key.endswith("3"):
        raise SampleError(f"/data/{key}.png: corrupt")
    return int(key[1:]) ** 2


def _die_on(key: str, *, victim: str, how: str) -> int:
    if key == victim:
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif how == "segfault":
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the checkout
            ctypes.string_at(0)  # reads address 0: SIGSEGV in native code
        elif how == "exit":
            os._exit(3)
    return int(key[1:])


def _buggy(key: str) -> int:
    if key == "k5":
        raise ValueError(f"bug on {key}")
    return int(key[1:])


def _boom() -> None:
    raise RuntimeError("cannot rebuild the maker in the worker")


class _Unloadable:
    """Pickles fine, fails to unpickle (as a maker whose module a worker cannot import)."""

    def __reduce__(self):
        return (_boom, ())

    def __call__(self, key: str) -> str:
        return key


def _mark(key: str, *, folder: str) -> int:
    """Leave a file per key started, so the test counts how far the workers ran ahead."""
    Path(folder, key).touch()
    return int(key[1:])


def _workers() -> list[mp.process.BaseProcess]:
    return [p for p in mp.active_children() if p.name == "rankseg-worker"]


@pytest.fixture(autouse=True)
def clean_and_no_hang(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail a test that hangs (a regression of the dead-worker handling) instead of CI, and
    one that leaves a worker or the worker pickle behind."""
    def expire(signum, frame):
        raise TimeoutError("ordered_map hung for 60 s")

    tmp = tmp_path_factory.mktemp("tmpdir")  # the pickle goes here, not in a shared /tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
    assert not _workers(), "workers left behind"
    assert not list(tmp.iterdir()), "worker pickle left behind"


KEYS = [f"k{i}" for i in range(25)]


@pytest.mark.parametrize("workers,ahead", [(0, None), (2, None), (2, 1), (3, 5)])
def test_results_come_in_key_order_with_skips(workers: int, ahead: int | None) -> None:
    with ordered_map(_square_or_fail, KEYS, workers, ahead=ahead) as results:
        got = list(results)
    want = [Skipped(k, f"/data/{k}.png: corrupt") if k.endswith("3") else int(k[1:]) ** 2 for k in KEYS]
    assert got == want


def test_more_workers_than_keys_and_no_keys() -> None:
    with ordered_map(_square_or_fail, ["k1", "k2"], 8) as results:
        assert list(results) == [1, 4]
        assert len(_workers()) == 2
    with ordered_map(_square_or_fail, [], 2) as results:
        assert list(results) == []


def test_leaving_early_stops_the_workers_and_removes_the_pickle() -> None:
    with pytest.raises(RuntimeError), \
            ordered_map(_square_or_fail, [f"k{i}" for i in range(100)], 2) as results:
        next(results)
        assert len(_workers()) == 2
        assert len(list(Path(tempfile.gettempdir()).glob("rankseg-worker-*.pkl"))) == 1
        raise RuntimeError("a failed sample stops the conversion")
    # the autouse fixture checks no worker and no pickle is left


@pytest.mark.parametrize("how,ending", [("sigkill", "(killed by signal 9, SIGKILL)"),
                                        ("segfault", "(killed by signal 11, SIGSEGV)"),
                                        ("exit", "(exited with code 3)")])
def test_a_dead_worker_stops_the_run_naming_its_sample(how: str, ending: str) -> None:
    fn = functools.partial(_die_on, victim="k7", how=how)
    got = []
    t = time.monotonic()
    with pytest.raises(UserError) as err, ordered_map(fn, KEYS, 2) as results:
        got.extend(results)  # keeps what came before the error
    assert time.monotonic() - t < 30
    msg = str(err.value)
    assert msg.startswith(f"worker process died {ending} while converting k7: "), msg
    assert msg.endswith("re-run the same command to resume (lower --workers if it ran out of memory)")
    assert "\n" not in msg
    assert got == list(range(len(got))) and len(got) <= 7  # a clean prefix, never k7 or later


def test_an_exception_in_the_maker_is_reraised_with_the_worker_traceback() -> None:
    got = []
    with pytest.raises(ValueError, match="bug on k5") as err, ordered_map(_buggy, KEYS, 2) as results:
        got.extend(results)
    assert got == [0, 1, 2, 3, 4]  # raised in key order, like the in-process run
    assert "_buggy" in str(err.value.__cause__)  # the worker's traceback


def test_a_maker_that_cannot_load_in_the_worker_is_reraised() -> None:
    with pytest.raises(RuntimeError, match="cannot rebuild the maker"), \
            ordered_map(_Unloadable(), KEYS, 2) as results:
        list(results)


@pytest.mark.parametrize("ahead", [None, 3])
def test_a_slow_consumer_holds_the_workers_back(tmp_path: Path, ahead: int | None) -> None:
    # multiprocessing.Pool.imap would run all 120 cheap keys while the consumer sleeps.
    keys = [f"k{i:03d}" for i in range(120)]
    bound = ahead or AHEAD_PER_WORKER * 2
    lead = []
    with ordered_map(functools.partial(_mark, folder=str(tmp_path)), keys, 2, ahead=ahead) as results:
        for consumed, res in enumerate(results, 1):
            assert res == consumed - 1
            time.sleep(0.005)  # the writer is slower than the workers
            lead.append(len(os.listdir(tmp_path)) - consumed)
    assert max(lead) <= bound, lead
    assert len(os.listdir(tmp_path)) == len(keys)


def test_ctrl_c_while_the_feeder_thread_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under load a Ctrl-C could land inside Thread.start(): the thread never started and the
    # tear-down's join raised RuntimeError (a traceback, exit 1). It must be a plain interrupt.
    real_start = threading.Thread.start

    def interrupted_start(self: threading.Thread) -> None:
        if self.name == "rankseg-feeder":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # without the hold, the interrupt is raised here, before the start
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)
    with pytest.raises(KeyboardInterrupt), ordered_map(_square_or_fail, KEYS, 2) as results:
        next(results)
    assert not _workers()


def test_workers_ignore_sigint_and_the_parent_tears_down_on_it() -> None:
    # The terminal sends Ctrl-C to every process of the group: workers must go on (no
    # traceback from them), and the parent's KeyboardInterrupt stops them.
    with pytest.raises(KeyboardInterrupt), ordered_map(_square_or_fail, KEYS, 2) as results:
        assert next(results) == 0
        for p in _workers():
            os.kill(p.pid, signal.SIGINT)
        got = [next(results) for _ in range(5)]
        assert got == [1, 4, Skipped("k3", "/data/k3.png: corrupt"), 16, 25]
        assert all(p.is_alive() for p in _workers())
        os.kill(os.getpid(), signal.SIGINT)
        next(results)
        time.sleep(5)  # the interrupt lands at once; never reached
