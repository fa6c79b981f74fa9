"""One writer per directory: a second process is refused while the first lives, not after it dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.errors import UserError
from rankseg_core.shards.write import DatasetHeader, encode_sample
from rankseg_core.utils.lock import LOCK_NAME, acquire, dir_lock

HOLDER = """
import sys, time
from rankseg_core.utils.lock import acquire
acquire(sys.argv[1], "prepare", shared=sys.argv[2] == "shared")
if len(sys.argv) > 3:
    acquire(sys.argv[1], "prepare", name=sys.argv[3])
print("locked", flush=True)
time.sleep(120)
"""


def _hold(directory: Path, shared: bool = False, part_name: str | None = None) -> subprocess.Popen:
    """Another process holding the lock (a real second process: flock is per open file)."""
    args = [sys.executable, "-c", HOLDER, str(directory), "shared" if shared else "exclusive"]
    proc = subprocess.Popen(args + ([part_name] if part_name else []), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def _maker(key: str):
    return encode_sample(key, b"\xff\xd8", np.zeros((3, 3), np.uint16), 3)


def _convert(out: Path, **opts):
    return run_conversion(out, DatasetHeader("s", ["a", "b", "c"]), {"train": ["k0", "k1", "k2"]},
                          _maker, ConvertOptions(samples_per_shard=1, **opts))


def test_second_writer_is_refused_until_the_holder_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    proc = _hold(out)
    try:
        with pytest.raises(UserError) as info:
            _convert(out)
        msg = str(info.value)
        assert f"{out} is being written by another rankseg process" in msg
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
        assert not list(out.glob("*.h5*"))  # nothing written alongside the holder
    finally:
        _kill(proc)  # kill -9: no clean-up code runs in the holder
    assert _convert(out)["splits"]["train"]["num_samples"] == 3  # the kernel freed the lock
    assert not (out / LOCK_NAME).exists()  # an exclusive holder removes its file on release


def test_cli_prepare_refused_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    proc = _hold(out)
    try:
        res = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "--images", "2",
                                       "--size", "32", "--num-classes", "40"])
    finally:
        _kill(proc)
    assert res.exit_code == 2 and "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "error:" in text and "is being written by another rankseg process" in text
    assert f"pid {proc.pid}" in text


def test_parts_run_side_by_side_but_not_twice(tmp_path: Path) -> None:
    out = tmp_path / "d"
    out.mkdir()
    part0 = f"{LOCK_NAME}.part-00000-of-00002"
    proc = _hold(out, shared=True, part_name=part0)  # part 0 of 2 running elsewhere
    try:
        assert _convert(out, num_shards=2, shard_index=1) is None  # part 1 runs alongside
        with pytest.raises(UserError, match="being written by another rankseg process"):
            _convert(out, num_shards=2, shard_index=0)  # the same part twice
        with pytest.raises(UserError, match="being written by another rankseg process"):
            _convert(out)  # a whole run while parts are running
    finally:
        _kill(proc)
    assert _convert(out)["splits"]["train"]["num_samples"] == 3


def test_dir_lock_in_one_process(tmp_path: Path) -> None:
    with dir_lock(tmp_path, what="train") as lock:
        assert (tmp_path / LOCK_NAME).exists()
        with pytest.raises(UserError, match=f"train, pid {os.getpid()}"):
            acquire(tmp_path, "train")  # a second open file description conflicts too
        assert lock.fd is not None
    with dir_lock(tmp_path, what="train"):  # released at the end of the block
        pass


def test_lock_does_not_wait(tmp_path: Path) -> None:
    proc = _hold(tmp_path)
    try:
        start = time.monotonic()
        with pytest.raises(UserError):
            acquire(tmp_path, "prepare")
        assert time.monotonic() - start < 1.0
    finally:
        _kill(proc)
