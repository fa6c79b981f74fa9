"""Operating-system errors through every command (issue 9 item 2).

Each command that writes is pointed at places the system refuses: a path under a regular file
(ENOTDIR), `/proc/rankseg-unwritable` (the before-stop hook's case), `/dev/full` where it writes
one file, and a full disk (ENOSPC raised by fsync, where a real full disk shows it). Each must
print one `error:` line naming the path and the reason, exit 2, never a traceback, and leave
nothing that `verify` or `--resume` takes as complete. A directory whose name is not UTF-8 is
not an error: the commands work there and print the name with `\\xNN` escapes.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from convert_trees import ade150_tree
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train as run_train
from rankseg_core.shards.write import shard_is_complete
from rankseg_core.utils.console import printable

runner = CliRunner()
PROC = "/proc/rankseg-unwritable"
TINY_TRAIN = ["--model", "segmenter-vitt", "--img-size", "32", "--batch-size", "2",
              "--set", "data.num_workers=0", "--set", "eval.num_workers=0", "--set", "eval.short_side=32",
              "--set", "eval.batch_size=2"]


def run(*args: object):
    return runner.invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


def error_line(res) -> str:
    """The single `error:` line of a failed command (asserting exit 2 and no traceback)."""
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if "error:" in line]
    assert len(lines) == 1, res.output
    return lines[0]


def assert_os_error(res, path: str | Path, *reasons: str) -> None:
    line = error_line(res)
    assert printable(os.fspath(path)) in line, line
    assert any(r in line.lower() for r in reasons), line


def non_utf8(parent: Path, name: bytes = b"out-\xff") -> Path:
    """A path whose last component is not valid UTF-8 (as Python hands it over: surrogate escapes)."""
    return Path(os.fsdecode(os.fsencode(parent) + b"/" + name))


@pytest.fixture
def afile(tmp_path: Path) -> Path:
    f = tmp_path / "afile"
    f.write_text("a regular file\n")
    return f


class FullDisk:
    """`arm(prefix, skip=0)`: fsync of files under `prefix` fails with ENOSPC (after `skip`
    successful ones), as on a disk that fills up while a command writes; `off()` frees it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch, self.real = monkeypatch, os.fsync

    def arm(self, prefix: Path, skip: int = 0) -> None:
        left, real = [skip], self.real

        def fsync(fd: int) -> None:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(os.fspath(prefix)) and not os.path.isdir(target):
                if left[0] == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                left[0] -= 1
            real(fd)

        self.monkeypatch.setattr(os, "fsync", fsync)

    def off(self) -> None:
        self.monkeypatch.setattr(os, "fsync", self.real)


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> FullDisk:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file an fsync is for")
    return FullDisk(monkeypatch)


@pytest.fixture
def dev_full():
    """/dev/full as an output file; afterwards it must still be the character device."""
    if not Path("/dev/full").exists() or not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full character device here")
    yield Path("/dev/full")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "/dev/full was replaced by a regular file"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, synth: Path) -> Path:
    """A tiny finished RankSeg run on the shared synthetic shards."""
    out = tmp_path_factory.mktemp("oserr") / "run"
    cfg = build_train_config(None, ["model.model=segmenter-vitt", "model.img_size=32", "model.kappa=5",
                                    "schedule.iters=1", "schedule.batch_size=2", "data.num_workers=0",
                                    "eval.num_workers=0", "eval.short_side=32", "eval.batch_size=2",
                                    "eval.max_images=2"], synth)
    run_train(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8))
    return path


# --------------------------------------------------------------------------- prepare


def prepare_synthetic(out: Path):
    return run("prepare", "synthetic", "--out", out, "--images", 4, "--size", 32, "--num-classes", 40,
               "--samples-per-shard", 2)


def assert_not_complete(out: Path) -> None:
    """What a failed prepare leaves is never taken for a finished dataset: no dataset.json, and
    every shard with a final name is whole (its sidecar matches), so a re-run may keep it."""
    assert not (out / "dataset.json").exists()
    assert all(shard_is_complete(p) for p in out.glob("*.h5"))
    res = run("verify", out)
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output


def test_prepare_out_under_a_file(afile: Path) -> None:
    assert_os_error(prepare_synthetic(afile / "out"), afile, "not a directory")


def test_prepare_out_in_proc() -> None:
    # The before-stop hook's case: /proc cannot hold new entries.
    res = run("prepare", "synthetic", "--out", PROC, "--images", 2, "--size", 64, "--workers", 0)
    assert_os_error(res, PROC, "no such file", "not permitted", "permission", "read-only")


def test_prepare_full_disk_leaves_nothing_complete_and_resumes(tmp_path: Path, full_disk) -> None:
    out = tmp_path / "data"
    for skip in (0, 3):  # the first shard fails; later, a shard after a finished one fails
        full_disk.arm(out, skip)
        assert_os_error(prepare_synthetic(out), out, "no space left")
        assert_not_complete(out)
        assert not list(out.glob("*.tmp")), "a failed write left its temp file behind"
    full_disk.off()
    res = prepare_synthetic(out)  # the re-run completes the conversion
    assert res.exit_code == 0, res.output
    assert run("verify", out).exit_code == 0


def test_real_converter_out_under_a_file_and_full_disk(tmp_path: Path, afile: Path, full_disk) -> None:
    root = tmp_path / "ADEChallengeData2016"
    ade150_tree(root, n_train=2, n_val=1)
    args = ("prepare", "ade20k", "--root", root, "--workers", 0, "--out")
    assert_os_error(run(*args, afile / "ade"), afile, "not a directory")
    assert_os_error(run(*args, PROC), PROC, "no such file", "not permitted", "permission")
    out = tmp_path / "ade"
    full_disk.arm(out)
    assert_os_error(run(*args, out), out, "no space left")
    assert_not_complete(out)


def test_prepare_inspect_verify_stats_in_a_non_utf8_directory(tmp_path: Path) -> None:
    out = non_utf8(tmp_path, b"d\xff[bold]x")  # also markup-like brackets: printed as they are
    assert prepare_synthetic(out).exit_code == 0
    shown = printable(os.fspath(out))
    assert "\\xff" in shown
    for res in (run("verify", out), run("inspect", out)):
        assert res.exit_code == 0, res.output
        assert shown in res.output, res.output
    res = run("stats", "class-cdf", out, "--json", out / "cdf.json", "--plot", out / "cdf.svg")
    assert res.exit_code == 0, res.output
    assert (out / "cdf.json").is_file() and (out / "cdf.svg").read_bytes().lstrip()[:5] in (b"<?xml", b"<svg ")


def test_a_non_utf8_input_file_name_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    ade150_tree(root, n_train=2, n_val=1)
    for sub, ext in (("images", ".jpg"), ("annotations", ".png")):
        first = sorted((root / sub / "training").iterdir())[0]
        first.rename(non_utf8(first.parent, b"ADE_train_\xff" + ext.encode()))
    line = error_line(run("prepare", "ade20k", "--root", root, "--workers", 0, "--out", tmp_path / "o"))
    assert "ADE_train_\\xff" in line and "UTF-8" in line, line


def test_inspect_and_verify_refuse_paths_under_a_file(afile: Path) -> None:
    for cmd in ("inspect", "verify"):
        line = error_line(run(cmd, afile / "shards"))
        assert os.fspath(afile) in line


# --------------------------------------------------------------------------- stats class-cdf


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_class_cdf_outputs(option: str, synth: Path, tmp_path: Path, afile: Path, full_disk, dev_full) -> None:
    name = "cdf.json" if option == "--json" else "cdf.png"
    assert_os_error(run("stats", "class-cdf", synth, option, afile / name), afile, "not a directory")
    assert_os_error(run("stats", "class-cdf", synth, option, f"{PROC}/{name}"), PROC,
                    "no such file", "not permitted", "permission")
    if option == "--json":  # the plot refuses /dev/full by its extension first
        assert_os_error(run("stats", "class-cdf", synth, option, dev_full), dev_full,
                        "not a regular file", "no space left")
    target = tmp_path / name
    full_disk.arm(tmp_path)
    assert_os_error(run("stats", "class-cdf", synth, option, target), target, "no space left")
    assert not target.exists() and not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------- train


def test_train_out_under_a_file_and_in_proc(synth: Path, afile: Path) -> None:
    base = ("train", "--data", synth, "--iters", 1, *TINY_TRAIN, "--out")
    assert_os_error(run(*base, afile / "run"), afile, "not a directory")
    assert_os_error(run(*base, PROC), PROC, "no such file", "not permitted", "permission")


def test_train_full_disk_keeps_the_last_good_checkpoint(synth: Path, tmp_path: Path, full_disk) -> None:
    out = tmp_path / "run"
    args = ("train", "--data", synth, "--out", out, "--iters", 3, "--set", "ckpt_every=1", "--set", "eval.max_images=2",
            *TINY_TRAIN)
    full_disk.arm(out / "checkpoints", skip=1)  # the first checkpoint is written, the second is not
    assert_os_error(run(*args), out / "checkpoints" / "last.pt", "no space left")
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert not (out / "model.safetensors").exists()
    assert int(runs.load_checkpoint(out / "checkpoints" / "last.pt")["iteration"]) == 1
    full_disk.off()  # the disk has room again
    res = run("train", "--out", out, "--resume")
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()


def test_train_full_disk_before_any_checkpoint(synth: Path, tmp_path: Path, full_disk) -> None:
    out = tmp_path / "run"
    full_disk.arm(out)
    res = run("train", "--data", synth, "--out", out, "--iters", 1, *TINY_TRAIN)
    assert_os_error(res, out, "no space left")
    full_disk.off()
    line = error_line(run("train", "--out", out, "--resume"))  # nothing to resume, said so
    assert os.fspath(out) in line


# --------------------------------------------------------------------------- eval, predict, viz


def test_eval_json(trained: Path, tmp_path: Path, afile: Path, full_disk, dev_full) -> None:
    assert_os_error(run("eval", trained, "--json", afile / "e.json"), afile, "not a directory")
    assert_os_error(run("eval", trained, "--json", f"{PROC}/e.json"), PROC, "no such file", "not permitted")
    assert_os_error(run("eval", trained, "--json", dev_full), dev_full, "not a regular file", "no space left")
    target = tmp_path / "e.json"
    full_disk.arm(tmp_path)
    assert_os_error(run("eval", trained, "--json", target), tmp_path, "no space left")
    assert not target.exists()


def test_eval_json_in_a_non_utf8_directory(trained: Path, tmp_path: Path) -> None:
    target = non_utf8(tmp_path) / "e.json"
    target.parent.mkdir()
    res = run("eval", trained, "--json", target)
    assert res.exit_code == 0, res.output
    assert target.is_file() and printable(os.fspath(target)) in " ".join(res.output.split())


def test_predict_out(trained: Path, image: Path, tmp_path: Path, afile: Path, full_disk) -> None:
    assert_os_error(run("predict", trained, image, "--out", afile / "p"), afile, "not a directory")
    assert_os_error(run("predict", trained, image, "--out", PROC), PROC, "no such file", "not permitted")
    out = tmp_path / "p"
    full_disk.arm(out)
    assert_os_error(run("predict", trained, image, "--out", out), out, "no space left")
    full_disk.off()
    res = run("predict", trained, image, "--out", non_utf8(tmp_path))
    assert res.exit_code == 0, res.output


def test_viz_outputs(trained: Path, synth: Path, tmp_path: Path, afile: Path, full_disk, dev_full) -> None:
    assert_os_error(run("viz", "tau", trained, "--out", afile / "tau.png"), afile, "not a directory")
    assert_os_error(run("viz", "samples", synth, "--num", 1, "--out", afile / "s"), afile, "not a directory")
    assert_os_error(run("viz", "samples", synth, "--num", 1, "--out", PROC), PROC, "no such file", "not permitted")
    # /dev/full has no figure extension: refused before anything is written
    error_line(run("viz", "tau", trained, "--out", dev_full))
    out = tmp_path / "tau.png"
    full_disk.arm(tmp_path)
    assert_os_error(run("viz", "tau", trained, "--out", out), tmp_path, "no space left")
    assert not out.exists()


def test_demo_out_under_a_file_and_in_proc(afile: Path) -> None:
    # Both fail while claiming the output directory, before any training.
    assert_os_error(run("demo", "--out", afile / "demo"), afile, "not a directory")
    assert_os_error(run("demo", "--out", PROC), PROC, "no such file", "not permitted", "permission")


# --------------------------------------------------------------------------- the wrapper itself


def test_oserror_without_a_file_name_and_h5py_style_messages() -> None:
    """What `user_errors` makes of OSErrors that lower layers did not turn into a UserError."""
    from rankseg_cli.common import os_error_message

    h5 = OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Thu,\n"
                 ", filename = '/data/x.h5.tmp', file descriptor = 3, errno = 28, error message = "
                 "'No space left on device')")
    assert os_error_message(h5).startswith("/data/x.h5.tmp: cannot write (no space left on device)")
    bare = os_error_message(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert "input/output error" in bare and "not named" in bare
    raw = os_error_message(PermissionError(errno.EACCES, "Permission denied", b"/x/\xff"))
    assert raw.startswith("/x/\udcff: cannot access (permission denied)")


# --------------------------------------------------------------------------- a real small disk


def in_small_fs(tmp_path: Path, mount_opts: str, *cmd: str) -> "subprocess.CompletedProcess[str]":
    """Run `python -m rankseg_cli CMD` with a fresh tmpfs (mount options `mount_opts`) at
    tmp_path/fs, in a private mount namespace (gone when the command ends). Skips where the
    machine does not allow it (no root, no unshare)."""
    import shlex
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs")
    fs = tmp_path / "fs"
    fs.mkdir()
    script = (f"mount -t tmpfs -o {mount_opts} rankseg-test {shlex.quote(str(fs))} || exit 99; "
              + shlex.join([sys.executable, "-m", "rankseg_cli", *cmd]))
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if res.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    return res


@pytest.mark.slow
@pytest.mark.parametrize("mount_opts, reason", [("size=96k", "no space left"), ("ro", "read-only")])
def test_prepare_on_a_real_full_or_read_only_disk(tmp_path: Path, mount_opts: str, reason: str) -> None:
    out = tmp_path / "fs" / "data"
    res = in_small_fs(tmp_path, mount_opts, "prepare", "synthetic", "--out", str(out), "--images", "60",
                      "--size", "64", "--samples-per-shard", "20", "--workers", "0")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(tmp_path / "fs") in lines[0] and reason in lines[0], lines[0]


@pytest.mark.slow
def test_train_on_a_real_full_disk(tmp_path: Path, synth: Path) -> None:
    # 1 MB holds config.yaml and metrics.jsonl but not a ViT-T checkpoint (~22 MB).
    out = tmp_path / "fs" / "run"
    res = in_small_fs(tmp_path, "size=1m", "train", "--data", str(synth), "--out", str(out), "--iters", "1",
                      *TINY_TRAIN)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(out) in lines[0] and "no space left" in lines[0], lines[0]
