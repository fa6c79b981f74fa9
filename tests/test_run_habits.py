"""Runs people can trust (issue 22 items 1, 2, 4, 7): env.json, train.log, keep-last-N
checkpoints, progress lines with ETA, shell completion.

Each record is checked against an independent source: package versions against the modules'
own `__version__`, the git commit against a repository built by hand (and `dirty` against a
fake `git` that only answers when called without optional locks), the ETA against the
arithmetic of a fake clock, the kept checkpoints against a hand-made sequence with one damaged
file, a resume from the named checkpoint against the uninterrupted run's weights.
"""

from __future__ import annotations

import calendar
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core import __version__
from rankseg_core.engine import runs
from rankseg_core.errors import UserError
from rankseg_core.utils import environment, jsonio, progress, textlog
from rankseg_core.utils.textlog import STAMP

K = 40
STAMPED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \S")
ARGV = ["rankseg", "train", "--out", "RUN", "--set", "keep_last=2"]  # what sys.argv holds in the CLI


def cli(*args: object, **kw):
    return CliRunner().invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args], **kw)


@pytest.fixture(autouse=True)
def _not_this_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """rankseg as an installed package (no .git): these tests never run git on the checkout
    they test; the git tests below build their own repository."""
    installed = tmp_path / "site-packages"
    installed.mkdir()
    monkeypatch.setattr(environment, "checkout_root", lambda: installed)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("habits")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures come before the autouse one
        mp.setattr(environment, "checkout_root", lambda: root)
        return make_synthetic(root / "data", num_classes=K, images=4, val_images=2, size=32, seed=1)


TRAIN = ["--model", "segmenter-vitt", "--img-size", "32", "--batch-size", "2", "--iters", "4", "--device", "cpu",
         *[x for s in tiny_run(model=None) + ["ckpt_every=1", "keep_last=2", "log_seconds=0", "eval.batch_size=2"]
           for x in ("--set", s)]]


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step CLI run, checkpoint every step, keep_last 2, a progress line every step."""
    run = tmp_path_factory.mktemp("habits-run") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(environment, "checkout_root", lambda: run.parent)
    mp.setattr(sys, "argv", ARGV)
    try:
        res = cli("train", "--data", data, "--out", run, *TRAIN)
    finally:
        mp.undo()
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of `finished` (hard links become separate files, as a backup copy makes them)."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


# --------------------------------------------------------------------------- env.json


def test_record_matches_independent_sources() -> None:
    rec = jsonio.loads(jsonio.dumps(environment.collect(["rankseg", "env", os.fsdecode(b"caf\xe9")])))
    assert rec["format"] == "rankseg-env" and rec["version"] == 1
    # Versions: package metadata (the record) against each module's own attribute.
    assert rec["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert rec["packages"]["numpy"] == np.__version__
    assert rec["packages"]["h5py"] == h5py.__version__
    assert rec["packages"]["timm"] == timm.__version__
    assert rec["python"]["version"] == "{}.{}.{}".format(*sys.version_info[:3])
    assert rec["rankseg"]["git"] is None  # an installed package (the autouse fixture)
    # A non-UTF-8 argument is written as \xNN text, so strict JSON readers accept the record.
    assert rec["command"] == ["rankseg", "env", "caf\\xe9"]
    assert rec["host"]["hostname"] == socket.gethostname()
    assert rec["host"]["cpu_count"] == os.cpu_count() and 1 <= rec["host"]["cpus_usable"] <= os.cpu_count()
    assert rec["accelerators"]["cuda_available"] == torch.cuda.is_available()
    assert len(rec["accelerators"]["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    when = calendar.timegm(time.strptime(rec["time_utc"], "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(when - time.time()) < 120


def _repo(root: Path, sha: str, packed: bool) -> Path:
    """A git repository's files as git lays them out, written by hand."""
    git = root / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    if packed:
        (git / "packed-refs").write_text(f"# pack-refs with: peeled fully-peeled sorted\n{'0' * 40} refs/heads/other\n"
                                         f"{sha} refs/heads/main\n")
    else:
        (git / "refs" / "heads" / "main").write_text(sha + "\n")
    return root


def _fake_git(bin_dir: Path, sha: str, status: str) -> None:
    """A `git` that answers rev-parse and status, and fails unless GIT_OPTIONAL_LOCKS=0 (so a
    `git status` that could rewrite the checkout's index is a test failure)."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "git"
    script.write_text(f"""#!/bin/sh
[ "$GIT_OPTIONAL_LOCKS" = 0 ] || exit 3
case "$3" in
  rev-parse) echo {sha} ;;
  status) printf '%s' '{status}' ;;
  *) exit 1 ;;
esac
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def test_git_commit_and_dirty_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha, other = "3" * 40, "a1b2c3d4" * 5
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no git binary at all
    for packed in (False, True):
        root = _repo(tmp_path / f"repo-{packed}", sha, packed)
        assert environment.git_state(root) == {"commit": sha, "dirty": None}  # read from the files
    detached = _repo(tmp_path / "detached", sha, False)
    (detached / ".git" / "HEAD").write_text(other + "\n")
    assert environment.git_state(detached)["commit"] == other
    # A worktree: `.git` is a file naming its git dir, whose branches live in the common dir.
    main = _repo(tmp_path / "main", sha, True)
    wt_git = main / ".git" / "worktrees" / "wt"
    wt_git.mkdir(parents=True)
    (wt_git / "HEAD").write_text("ref: refs/heads/main\n")
    (wt_git / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {wt_git}\n")
    assert environment.git_state(tmp_path / "wt")["commit"] == sha
    assert environment.git_state(tmp_path / "empty-bin") is None  # not a checkout
    # With git: its answer wins for the commit, and `status` says whether tracked files changed.
    bin_dir = tmp_path / "bin"
    root = _repo(tmp_path / "with-git", sha, False)
    monkeypatch.setenv("PATH", str(bin_dir))
    _fake_git(bin_dir, other, " M rankseg_core/x.py\\n")
    assert environment.git_state(root) == {"commit": other, "dirty": True}
    _fake_git(bin_dir, other, "")
    assert environment.git_state(root) == {"commit": other, "dirty": False}


def test_records_keep_history_and_refuse_in_one_line(tmp_path: Path) -> None:
    d = tmp_path / "out"
    d.mkdir()
    names = [environment.write_record(d, what=f"s{i}").name for i in range(3)]
    assert names == ["env.json", "env-1.json", "env-2.json"]
    assert [json.loads(p.read_text())["session"] for p in environment.records(d)] == ["s0", "s1", "s2"]
    first = (d / "env.json").read_bytes()
    environment.write_record(d, replace=True, what="fresh")
    assert json.loads((d / "env.json").read_text())["session"] == "fresh" and (d / "env-2.json").exists()
    assert first != (d / "env.json").read_bytes() and not list(d.glob("*.tmp")) and not list(d.glob(".*tmp"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(UserError, match="afile/out/env.json: cannot write"):
        environment.write_record(afile / "out")
    assert_one_line_error(cli("env", "--out", afile / "env.json"), "afile/env.json", "not a directory")


def test_rankseg_env_prints_the_record(tmp_path: Path) -> None:
    res = cli("env", "--json", "--out", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    written = json.loads((tmp_path / "e.json").read_text())
    assert printed == written and printed["packages"]["torch"]
    res = cli("env")
    assert res.exit_code == 0, res.output
    assert "torch" in res.output and printed["host"]["hostname"] in res.output and "not a git checkout" in res.output


def test_prepare_and_eval_write_their_record(data: Path, run: Path, tmp_path: Path) -> None:
    env = json.loads((data / "env.json").read_text())
    assert env["session"] == "prepare"
    out = tmp_path / "again"
    make_synthetic(out, num_classes=K, images=2, val_images=1, size=32)
    make_synthetic(out, num_classes=K, images=2, val_images=1, size=32)  # a re-run (nothing left to do)
    assert [p.name for p in environment.records(out)] == ["env.json", "env-1.json"]
    res = cli("eval", run, "--json", tmp_path / "rep" / "e.json", "--device", "cpu", "--max-images", "1")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rep" / "e_env.json").read_text())["session"] == "eval"
    # Its record cannot be written: refused before evaluating, in one line.
    (tmp_path / "rep" / "f_env.json").mkdir()
    assert_one_line_error(cli("eval", run, "--json", tmp_path / "rep" / "f.json", "--device", "cpu"),
                          "f_env.json", "directory")
    assert not (tmp_path / "rep" / "f.json").exists()


def test_train_with_an_unwritable_env_json_is_one_line(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    (out / "env.json").mkdir(parents=True)
    assert_one_line_error(cli("train", "--data", data, "--out", out, *TRAIN), "env.json", "directory")
    assert not (out / "checkpoints").exists()


# --------------------------------------------------------------------------- a run: env, log, keep-last


def test_a_run_directory_holds_env_log_and_the_last_checkpoints(finished: Path) -> None:
    env = json.loads((finished / "env.json").read_text())
    assert env["session"] == "train" and env["command"] == ARGV and env["rankseg"]["git"] is None
    lines = (finished / "train.log").read_text().splitlines()
    assert all(STAMPED.match(line) for line in lines), lines
    stamps = [line[:20] for line in lines]
    assert stamps == sorted(stamps)
    text = [line[21:] for line in lines]
    assert text[0].startswith("training segmenter-vitt") and text[-1].startswith("done: val mIoU")
    assert f"rankseg {__version__} train: rankseg train --out RUN --set keep_last=2" in text
    prog = [t for t in text if t.startswith("train: ")]
    assert [int(t.split()[1].split("/")[0]) for t in prog[:4]] == [1, 2, 3, 4]
    assert all(re.search(r"it/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d\)", t) for t in prog)
    # keep_last 2: iter_3 and iter_4 (= last.pt, one file on disk), best.pt untouched.
    ckpts = finished / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best.pt", "iter_3.pt", "iter_4.pt", "last.pt"]
    assert os.path.samefile(ckpts / "iter_4.pt", ckpts / "last.pt")
    assert runs.load_checkpoint(ckpts / "iter_3.pt")["iteration"] == 3
    assert set(runs.load_checkpoint(ckpts / "iter_3.pt")) >= {"optimizer", "rng", "window"}  # resumable


def test_resume_appends_the_log_and_adds_a_record(run: Path) -> None:
    (run / "model.safetensors").unlink()  # crashed after the last checkpoint, before the final weights
    log = (run / "train.log").read_bytes()
    env = (run / "env.json").read_bytes()
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert (run / "env.json").read_bytes() == env
    assert json.loads((run / "env-1.json").read_text())["session"] == "resume"
    now = (run / "train.log").read_bytes()
    assert now.startswith(log)
    new = [line[21:] for line in now[len(log):].decode().splitlines()]
    assert new[0].startswith("resuming segmenter-vitt") and new[-1].startswith("done: val mIoU")


def test_a_refused_resume_names_the_newest_valid_checkpoint_and_it_resumes(run: Path, finished: Path) -> None:
    (run / "model.safetensors").unlink()
    ckpts = run / "checkpoints"
    shutil.copy(ckpts / "iter_3.pt", ckpts / "last.pt")
    (ckpts / "iter_4.pt").unlink()  # as if the run had crashed right after checkpoint 3
    flip_in_largest_record(ckpts / "last.pt")
    before = {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    res = cli("train", "--out", run, "--resume")
    assert_one_line_error(res, "last.pt is corrupt", "cannot resume from it", "newest valid checkpoint is",
                          "iter_3.pt (iteration 3)", "copy it over last.pt")
    assert {p.name: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written
    shutil.copy(ckpts / "iter_3.pt", ckpts / "last.pt")  # the advice
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    a, b = load_file(str(finished / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # as the uninterrupted run


def test_keep_last_negative_is_refused(data: Path, tmp_path: Path) -> None:
    assert_one_line_error(cli("train", "--data", data, "--out", tmp_path / "r", "--set", "keep_last=-1", "--dry-run"),
                          "keep_last=-1 must be >= 0")


# --------------------------------------------------------------------------- keep_checkpoints itself


def flip_in_largest_record(path: Path) -> None:
    """Flip one bit in the middle of the largest record of a torch zip checkpoint (a tensor's
    bytes: the digest no longer matches), in place, as a disk that damaged it would."""
    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    h = info.header_offset
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    raw[start + info.file_size // 2] ^= 0x10
    with open(path, "r+b") as f:  # the same file (and inode), as a disk that damaged it
        f.write(raw)


def _save(paths: runs.RunPaths, it: int, damage: bool = False) -> None:
    runs.save_checkpoint(paths.last, {"model": {"w": torch.full((4096,), float(it))}, "iteration": it})
    if damage:
        flip_in_largest_record(paths.last)


def _kept(paths: runs.RunPaths) -> list[int]:
    return sorted(runs.periodic_checkpoints(paths))


def _valid(path: Path) -> bool:
    """Independent of `checkpoint_is_valid`: the run's own reader accepts it."""
    try:
        runs.load_checkpoint(path)
    except UserError:
        return False
    return True


def test_keep_last_keeps_the_newest_valid_one(tmp_path: Path) -> None:
    paths = runs.run_paths(tmp_path / "run")
    runs.save_checkpoint(paths.best, {"model": {"w": torch.zeros(2)}, "iteration": 1})
    for it in (1, 2):
        _save(paths, it)
        runs.keep_checkpoints(paths, it, keep_last=1)
    assert _kept(paths) == [2]
    _save(paths, 3, damage=True)  # the newest is corrupt: it is not the one kept alone
    runs.keep_checkpoints(paths, 3, keep_last=1)
    assert _kept(paths) == [2, 3]
    assert [_valid(paths.periodic(k)) for k in (2, 3)] == [True, False]
    (paths.checkpoints / "iter_9.pt").write_bytes(b"left by an abandoned attempt")
    _save(paths, 4)
    runs.keep_checkpoints(paths, 4, keep_last=1)
    assert _kept(paths) == [4, 9]  # later iterations are not this run's past: left alone
    assert _valid(paths.best) and _valid(paths.periodic(4))
    # Nothing verifies: nothing is deleted.
    _save(paths, 5, damage=True)
    (paths.checkpoints / "iter_4.pt").write_bytes(b"damaged too")
    runs.keep_checkpoints(paths, 5, keep_last=1)
    assert _kept(paths) == [4, 5, 9]


def test_keep_last_zero_keeps_all_and_a_failed_link_deletes_nothing(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    paths = runs.run_paths(tmp_path / "run")
    for it in (1, 2, 3):
        _save(paths, it)
        runs.keep_checkpoints(paths, it, keep_last=0)
    assert _kept(paths) == [1, 2, 3]
    _save(paths, 4)
    real = os.replace

    def refuse(src, dst, *a, **kw):
        if Path(dst).name == "iter_4.pt":
            raise OSError(28, "No space left on device")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match="iter_4.pt: cannot write"):
        runs.keep_checkpoints(paths, 4, keep_last=1)
    assert _kept(paths) == [1, 2, 3] and not list(paths.checkpoints.glob("*.tmp"))


# --------------------------------------------------------------------------- progress lines and the text log


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_plain_progress_lines_have_time_rate_and_eta(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    clock = Clock()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=clock))
    with progress.Progress(10, "train", unit="it", log_every=0) as bar:
        bar.done = 4  # a resumed run: 4 steps were done by an earlier process
        for _ in range(2):
            clock.t += 2.0
            bar.advance(1, postfix="loss 1.0")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(STAMP.match(line) for line in lines)
    # 1 step per 2 s in this process (not 6 steps in 4 s): 4 left after step 6 -> 8 s.
    assert lines[1][21:] == "train: 6/10 it (0.50 it/s, elapsed 0:00:04, ETA 0:00:08) loss 1.0"
    assert lines[0][21:] == "train: 5/10 it (0.50 it/s, elapsed 0:00:02, ETA 0:00:10) loss 1.0"


def test_the_log_keeps_lines_not_bar_frames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from rankseg_core.utils.console import _StdStream

    # A terminal: the bar draws through sys.stderr, as `rankseg train` in a shell does.
    monkeypatch.setattr(progress, "console", Console(file=_StdStream("stderr"), force_terminal=True, width=100))
    log = tmp_path / "train.log"
    with textlog.capture():
        print("before the run is set up", file=sys.stderr)
        textlog.attach(log, "header")
        print("\x1b[1mbold\x1b[0m and \rredrawn", file=sys.stderr)
        with progress.Progress(3, "train", unit="it", log_every=0) as bar:
            for _ in range(3):
                bar.advance(1)
        sys.stdout.write("a partial ")
        sys.stdout.write("line\n")
    lines = [line[21:] for line in log.read_text().splitlines()]
    assert lines[:3] == ["before the run is set up", "header", "redrawn"]
    assert lines[-1] == "a partial line"
    bars = lines[3:-1]
    assert len(bars) == 4 and all(re.fullmatch(r"train: \d/3 it \(.*ETA .*\)", b) for b in bars), bars
    assert "\x1b" not in log.read_text() and "━" not in log.read_text()


def test_capture_logs_how_it_ended_and_restores_the_streams(tmp_path: Path) -> None:
    out, err = sys.stdout, sys.stderr
    log = tmp_path / "a.log"
    with pytest.raises(UserError):
        with textlog.capture():
            with textlog.capture():  # nested: joins the outer capture
                textlog.attach(log)
                print("working")
            raise UserError("--foo: bad; use --bar")
    assert sys.stdout is out and sys.stderr is err
    assert [line[21:] for line in log.read_text().splitlines()] == ["working", "error: --foo: bad; use --bar"]
    with textlog.capture():  # never attached: nothing written anywhere
        print("lost")
    assert log.read_text().count("\n") == 2


# --------------------------------------------------------------------------- shell completion


def test_shell_completion(tmp_path: Path) -> None:
    # The installed entry point in a fresh process, as a shell runs it (in-process, Typer's shell
    # detection depends on what earlier tests left in its completion state).
    exe = shutil.which("rankseg", path=str(Path(sys.executable).parent)) or shutil.which("rankseg")
    if exe is None:
        pytest.skip("the rankseg entry point is not installed")
    env = {**os.environ, "SHELL": "/bin/bash"}
    res = subprocess.run([exe, "--show-completion", "bash"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "_RANKSEG_COMPLETE=complete_bash" in res.stdout, res.stdout + res.stderr
    env.update({"_RANKSEG_COMPLETE": "complete_bash", "COMP_WORDS": "rankseg train --kap", "COMP_CWORD": "2"})
    done = subprocess.run([exe], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["--kappa"], done.stdout + done.stderr
    assert "--install-completion" in cli("--help").output
