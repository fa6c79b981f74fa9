"""Atomic writes that cannot destroy anything, OS errors as one line, strict JSON everywhere."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.write import DatasetHeader, encode_sample
from rankseg_core.utils import fsio, jsonio
from rankseg_core.utils.fsio import atomic_write_bytes, atomic_write_json


def strict_loads(text: str):
    """An independent strict parser: the stdlib's, told to refuse NaN / Infinity."""
    def refuse(name: str):
        raise AssertionError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# --- strict JSON ---------------------------------------------------------------------------

def test_strict_replaces_non_finite_floats() -> None:
    obj = {"a": float("nan"), "b": [np.float32("inf"), -math.inf, 1.5], "c": (np.int64(3), "x"),
           "d": {"e": np.float64("nan")}, 4: True}
    text = jsonio.dumps(obj)
    assert strict_loads(text) == {"a": None, "b": [None, None, 1.5], "c": [3, "x"], "d": {"e": None},
                                  "4": True}
    with pytest.raises(TypeError):  # anything else json cannot write is still refused
        jsonio.dumps({"x": object()})


@pytest.mark.parametrize("text", ["NaN", "[Infinity]", '{"a": -Infinity}'])
def test_strict_loads_refuses_constants(text: str) -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        jsonio.loads(text)


def test_atomic_write_json_is_strict(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "m.json", {"miou": float("nan"), "iou": [0.5, float("inf")]})
    assert strict_loads((tmp_path / "m.json").read_text()) == {"miou": None, "iou": [0.5, None]}


def _maybe_bad(key: str):
    if key == "k1":
        raise SampleError(f"/data/{key}.png: broken")
    return encode_sample(key, b"\xff\xd8", np.zeros((3, 3), np.uint16), 3)


def test_every_conversion_file_is_strict_json(tmp_path: Path) -> None:
    run_conversion(tmp_path / "d", DatasetHeader("s", ["a", "b", "c"], options={"x": float("nan")}),
                   {"train": ["k0", "k1", "k2"]}, _maybe_bad, ConvertOptions(on_error="skip"))
    files = [p for p in (tmp_path / "d").iterdir() if p.suffix in (".json", ".jsonl")]
    assert {p.name for p in files} >= {"dataset.json", "skipped.jsonl", ".rankseg-shards.json",
                                       "train-00000-of-00001.h5.json"}
    for p in files:
        for line in (p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]):
            strict_loads(line)
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["options"]["x"] is None


# --- atomic writes -------------------------------------------------------------------------

@pytest.mark.parametrize("target, fragment", [
    ("/dev/full", "not a regular file"),
    ("/dev/null", "not a regular file"),
    ("{tmp}", "is a directory"),
    ("{tmp}/fifo", "not a regular file"),
])
def test_non_regular_targets_are_refused(tmp_path: Path, target: str, fragment: str) -> None:
    os.mkfifo(tmp_path / "fifo")
    path = Path(target.replace("{tmp}", str(tmp_path)))
    with pytest.raises(UserError, match=fragment) as info:
        atomic_write_bytes(path, b"x")
    assert str(path) in str(info.value)
    assert not path.with_name(path.name + ".tmp").exists()
    if path.name == "full":
        assert Path("/dev/full").is_char_device()  # the device node is still there


def _fail_with(code: int):
    def boom(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return boom


@pytest.mark.parametrize("code, reason", [
    (errno.ENOSPC, "no space left on device"),
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
])
def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           code: int, reason: str) -> None:
    target = tmp_path / "eval.json"
    target.write_text("old")
    monkeypatch.setattr(fsio.os, "fsync", _fail_with(code))  # the data did not reach the disk
    with pytest.raises(UserError) as info:
        atomic_write_json(target, {"new": 1})
    msg = str(info.value)
    assert str(target) in msg and reason in msg and "\n" not in msg
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_unwritable_location_is_one_line(tmp_path: Path) -> None:
    # /sys refuses new files even for root (EACCES), unlike a chmod-ed directory.
    with pytest.raises(UserError, match="permission denied|read-only file system|no such file"):
        atomic_write_bytes(Path("/sys/rankseg-test.json"), b"x")
    with pytest.raises(UserError, match="no such file or directory"):
        atomic_write_bytes(tmp_path / "missing" / "x.json", b"x")
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        atomic_write_bytes(tmp_path / "file" / "x.json", b"x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UserError, match="permission denied"):
            atomic_write_bytes(ro / "x.json", b"x")
    finally:
        ro.chmod(0o700)


def test_symlink_at_the_temp_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "out.json.tmp")
    with pytest.raises(UserError):
        atomic_write_bytes(tmp_path / "out.json", b"x")
    assert victim.read_text() == "keep"


def test_full_disk_during_a_shard_leaves_nothing_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while a shard is written: one line, no temp file, no shard; a re-run resumes."""
    import rankseg_core.shards.write as shards

    def maker(key: str):
        return encode_sample(key, b"\xff\xd8", np.zeros((3, 3), np.uint16), 3)

    header = lambda: DatasetHeader("s", ["a", "b", "c"])  # noqa: E731
    keys = {"train": [f"k{i}" for i in range(4)]}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the disk fills up while the shard's bytes are flushed
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".h5.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(shards.os, "fsync", fsync)
    with pytest.raises(UserError, match="train-00000-of-00001.h5.*no space left on device"):
        run_conversion(tmp_path / "d", header(), keys, maker, ConvertOptions())
    left = sorted(p.name for p in (tmp_path / "d").iterdir())
    assert left == [".rankseg-shards.json", "env.json"], left  # the claim and the environment record only
    monkeypatch.setattr(shards.os, "fsync", real_fsync)
    index = run_conversion(tmp_path / "d", header(), keys, maker, ConvertOptions())
    assert index["splits"]["train"]["num_samples"] == 4
