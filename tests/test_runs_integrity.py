"""Run directories that cannot be damaged silently (issue 9 items 4, 5, 6, 9).

Checkpoints and model.safetensors carry a checksum of their content and are refused when it
does not match (bit flip, truncation, foreign or unsafe file); a resume from a bad checkpoint
changes nothing; one writer per run directory (a lock that a crash releases); resuming a
finished run does nothing; Ctrl-C in the middle of training leaves a checkpoint that resumes
exactly.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.utils import integrity, lock

REPO = Path(__file__).resolve().parents[1]
K = 40
TINY = tiny_run() + ["eval.batch_size=2"]
FAST = ["schedule.iters=4", "ckpt_every=2", "data.val_split="]  # evaluation is not under test there


def cli(*args: object):
    return CliRunner().invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


def config(data: Path, *extra: str):
    return build_train_config(None, TINY + list(extra), data)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "data"
    make_synthetic(out, num_classes=K, images=8, val_images=2, size=48, seed=0)
    return out


@pytest.fixture(scope="module")
def finished(data: Path) -> Path:
    """A finished 2-step run: config, metrics, last.pt, best.pt, model.safetensors."""
    run = data.parent / "finished"
    train(config(data, "schedule.iters=2", "ckpt_every=1"), run, progress=False)
    return run


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    """A copy of `finished` that a test may damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert set(wa) == set(wb)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- corruptions


def flip_in_largest_record(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor record of a torch zip checkpoint
    (located with the standard zipfile module: records are stored uncompressed)."""
    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    h = info.header_offset
    start = h + 30 + int.from_bytes(raw[h + 26:h + 28], "little") + int.from_bytes(raw[h + 28:h + 30], "little")
    raw[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def flip_in_safetensors_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")  # 8-byte header length, JSON header, then data
    raw[(start + len(raw)) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


class Evil:
    """A pickle that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def damage(path: Path, how: str, tmp_path: Path) -> None:
    if how == "flip":
        flip_in_largest_record(path)
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "foreign":
        path.write_bytes(os.urandom(4096))
    elif how == "pickle":
        buf = io.BytesIO()
        torch.save({"model": Evil(tmp_path / "pwned")}, buf)
        path.write_bytes(buf.getvalue())
    elif how == "edited":  # readable, but its content no longer matches its checksum
        state = torch.load(path, weights_only=True)
        next(iter(state["model"].values())).view(-1)[0] += 1
        torch.save(state, path)


# --------------------------------------------------------------------------- the checksum itself


def _put(kind: bytes, payload: bytes) -> bytes:
    return kind + len(payload).to_bytes(8, "little") + payload


def test_content_digest_format_by_hand() -> None:
    # {"b": 1, "a": uint8 [1, 2]}: a dict of 2, keys sorted, each item (kind, 8-byte length, bytes)
    want = hashlib.sha256(_put(b"D", b"2") + _put(b"S", b"a") + _put(b"T", b"torch.uint8(2,)") + _put(b"B", b"\x01\x02")
                          + _put(b"S", b"b") + _put(b"i", b"1")).hexdigest()
    assert integrity.content_digest({"b": 1, "a": torch.tensor([1, 2], dtype=torch.uint8)}) == want


def test_content_digest_sees_every_change() -> None:
    t = torch.arange(6, dtype=torch.float32)
    base = {"w": t, "n": 1, "v": [0.5, "x", None]}
    d = integrity.content_digest(base)
    assert integrity.content_digest({"v": [0.5, "x", None], "n": 1, "w": t.clone()}) == d  # order, copies
    flipped = t.clone()
    flipped.view(torch.int32)[3] ^= 1  # one bit of one element
    variants = [{**base, "w": flipped}, {**base, "w": t.reshape(2, 3)}, {**base, "w": t.view(torch.int32)},
                {**base, "n": 1.0}, {**base, "n": True}, {**base, "v": [0.5, "x"]}, {**base, "v": [[0.5, "x", None]]},
                {"W": t, "n": 1, "v": [0.5, "x", None]}]
    digests = {integrity.content_digest(v) for v in variants}
    assert len(digests) == len(variants) and d not in digests
    with pytest.raises(TypeError):
        integrity.content_digest({"x": object()})


def test_run_files_carry_their_checksum(finished: Path) -> None:
    from safetensors import safe_open

    for name in ("checkpoints/last.pt", "checkpoints/best.pt"):
        state = torch.load(finished / name, weights_only=True)  # still a plain torch file
        assert len(state["sha256"]) == 64
    with safe_open(str(finished / "model.safetensors"), "pt") as f:  # still a plain safetensors file
        assert len(f.metadata()["sha256"]) == 64
    assert "sha256" not in runs.load_checkpoint(finished / "checkpoints" / "last.pt")


# --------------------------------------------------------------------------- corrupt files are refused


@pytest.mark.parametrize("how", ["flip", "truncate", "foreign", "pickle", "edited"])
def test_corrupt_checkpoint_is_refused(run: Path, tmp_path: Path, how: str) -> None:
    last = run / "checkpoints" / "last.pt"
    damage(last, how, tmp_path)
    with pytest.raises(UserError, match=r"last\.pt is corrupt"):
        runs.load_checkpoint(last)
    assert_one_line_error(cli("eval", run, "--weights", "last", "--device", "cpu"), "last.pt is corrupt",
                          "--weights final or --weights best")
    assert not (tmp_path / "pwned").exists()  # the pickle's command never ran


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corrupt_final_weights_are_refused(run: Path, how: str) -> None:
    weights = run / "model.safetensors"
    if how == "flip":
        flip_in_safetensors_data(weights)
    else:
        weights.write_bytes(weights.read_bytes()[:-1000])
    assert_one_line_error(cli("eval", run, "--device", "cpu"), "model.safetensors is corrupt", "--weights best")
    res = cli("eval", run, "--weights", "best", "--device", "cpu")  # the advice works
    assert res.exit_code == 0, res.output


def test_resume_from_a_corrupt_checkpoint_changes_nothing(run: Path, tmp_path: Path) -> None:
    # Crashed after its last checkpoint, before the final weights: a resume would finish it.
    (run / "model.safetensors").unlink()
    flip_in_largest_record(run / "checkpoints" / "last.pt")
    before = snapshot(run)
    assert_one_line_error(cli("train", "--out", run, "--resume"), "last.pt is corrupt", "cannot resume from it",
                          "--weights best")
    assert snapshot(run) == before


def test_finished_run_with_a_corrupt_checkpoint_keeps_its_weights(run: Path) -> None:
    # Before: --resume re-ran the end of training from the damaged last.pt and replaced the
    # good model.safetensors with its weights.
    flip_in_largest_record(run / "checkpoints" / "last.pt")
    before = snapshot(run)
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert snapshot(run) == before


def test_a_checkpoint_without_resume_state_is_refused(run: Path) -> None:
    (run / "model.safetensors").unlink()
    shutil.copy(run / "checkpoints" / "best.pt", run / "checkpoints" / "last.pt")  # valid, but weights only
    before = snapshot(run)
    assert_one_line_error(cli("train", "--out", run, "--resume"), "last.pt is not a resumable checkpoint",
                          "optimizer")
    assert snapshot(run) == before


def test_files_without_checksum_are_used_with_a_note(run: Path) -> None:
    """Runs written before checksums existed keep working (unverified, said so)."""
    from safetensors.torch import save_file

    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["sha256"]
    torch.save(state, last)
    weights = final_weights(run)
    save_file(weights, str(run / "model.safetensors"))  # no metadata
    res = cli("eval", run, "--device", "cpu", "--json", run / "e.json")
    assert res.exit_code == 0, res.output
    assert "model.safetensors carries no checksum" in " ".join(res.output.split())
    res = cli("eval", run, "--weights", "last", "--device", "cpu", "--json", run / "e.json")
    assert res.exit_code == 0 and "last.pt carries no checksum" in " ".join(res.output.split())
    # Resuming it (after a crash before the final weights) writes checksummed files again.
    (run / "model.safetensors").unlink()
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert "sha256" in integrity.safetensors_metadata((run / "model.safetensors").read_bytes())


# --------------------------------------------------------------------------- crash windows


def test_interrupt_while_writing_a_checkpoint_keeps_the_previous_one(data: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C at the worst moment of a checkpoint write (its temp file complete, the rename not
    done): last.pt stays the previous, verified checkpoint and resumes exactly."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(config(data, *FAST), full, progress=False)
    real_replace, writes = os.replace, []

    def replace(src, dst, *a, **kw):
        if Path(dst).name == "last.pt":
            writes.append(dst)
            if len(writes) == 2:
                raise KeyboardInterrupt
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train(config(data, *FAST), cut, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(cut.rglob("*.tmp"))
    assert runs.load_checkpoint(cut / "checkpoints" / "last.pt")["iteration"] == 2
    train(config(data, *FAST), cut, resume=True, progress=False)
    assert_same_weights(full, cut)
    assert [r["loss"] for r in runs.read_metrics(cut)] == [r["loss"] for r in runs.read_metrics(full)]


@pytest.mark.slow
def test_ctrl_c_during_train_then_the_hinted_command_resumes_exactly(data: Path, tmp_path: Path) -> None:
    """A real `rankseg train` process gets SIGINT (as from Ctrl-C: the whole process group,
    DataLoader worker included) after its first checkpoint; the command its hint names then
    finishes the run with the weights of an uninterrupted one."""
    sets = TINY + ["schedule.iters=12", "ckpt_every=2", "data.val_split=", "data.num_workers=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(build_train_config(None, sets, data), full, progress=False)
    script = tmp_path / "slow_cli.py"
    script.write_text(SLOW_CLI)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), "train", "--data", str(data), "--out", str(cut),
                             *sum((["--set", s] for s in sets), [])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (cut / "checkpoints" / "last.pt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        # While it trains: a second writer is refused, a reader is fine.
        assert_one_line_error(cli("train", "--out", cut, "--resume"), "is being written by another rankseg process",
                              "train, pid")
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert not (cut / "model.safetensors").exists(), "finished before the interrupt: nothing was tested"
    hint = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(hint) == 1 and "resume with: rankseg train --out" in hint[0], stderr
    command = shlex.split(hint[0].split("resume with: ", 1)[1])
    assert command[:2] == ["rankseg", "train"]
    runs.load_checkpoint(cut / "checkpoints" / "last.pt")  # intact and verified
    res = cli(*command[1:])
    assert res.exit_code == 0, res.output
    assert_same_weights(full, cut)


# A `rankseg train` whose steps take 0.3 s longer, so that a signal lands mid-run.
SLOW_CLI = """
import time
import rankseg_core.engine.train as T
from rankseg_cli.common import new_app
from rankseg_cli.train_cmds import train, stats_model

real = T._optimizer_step
def slow(*args, **kwargs):
    real(*args, **kwargs)
    time.sleep(0.3)
T._optimizer_step = slow
app = new_app("slow train")
app.command("train")(train)
app.command("stats")(stats_model)
app()
"""


# --------------------------------------------------------------------------- one writer per run


def test_a_second_writer_is_refused(run: Path, data: Path, tmp_path: Path) -> None:
    held = lock.acquire(run, "train")  # as a `rankseg train` in progress holds it
    try:
        (run / "model.safetensors").unlink()  # crashed before the end: a resume has work to do
        before = snapshot(run)
        assert_one_line_error(cli("train", "--out", run, "--resume"), f"{run} is being written by another rankseg "
                              f"process (train, pid {os.getpid()}")
        with pytest.raises(UserError, match="being written by another rankseg process"):
            train(config(data, "schedule.iters=2"), tmp_path / "run", progress=False)
        assert snapshot(run) == before
        # Reading the run meanwhile is fine: eval writes into RUN/eval/, not the training's files.
        res = cli("eval", run, "--weights", "last", "--device", "cpu")
        assert res.exit_code == 0, res.output
    finally:
        held.release()
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert (run / "model.safetensors").is_file() and not (run / lock.LOCK_NAME).exists()


def test_the_lock_of_a_killed_train_does_not_block(run: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rankseg_core.utils import lock; "
                               "lock.acquire(sys.argv[1], 'train'); print('held', flush=True); time.sleep(120)",
                               str(run)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert_one_line_error(cli("train", "--out", run, "--resume"), "being written by another rankseg process")
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the lock
        holder.wait()
    assert (run / lock.LOCK_NAME).exists()  # left behind, and harmless
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0 and "already finished" in res.output, res.output


DDP_CLI = """
from rankseg_cli.common import new_app
from rankseg_cli.train_cmds import train, stats_model
app = new_app("ddp test")
app.command("train")(train)
app.command("stats")(stats_model)
app()
"""


@pytest.mark.slow
def test_torchrun_ranks_all_stop_when_rank0_is_refused(data: Path, tmp_path: Path) -> None:
    """Only rank 0 takes the lock; when it is refused, rank 1 must not wait for it forever."""
    run = tmp_path / "run"
    run.mkdir()
    script = tmp_path / "cli.py"
    script.write_text(DDP_CLI)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "train", "--data", str(data), "--out", str(run), *sum((["--set", s] for s in TINY + FAST), [])]
    held = lock.acquire(run, "train")
    try:
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=240)
    finally:
        held.release()
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line and "being written by another" in line]
    assert len(errors) == 2, proc.stderr[-3000:]  # one line from each rank
    assert not (run / "config.yaml").exists()


# --------------------------------------------------------------------------- finished runs


def test_resume_of_a_finished_run_does_nothing(run: Path) -> None:
    before = snapshot(run)
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert "is already finished (2 iterations): nothing to resume" in " ".join(res.output.split())
    assert snapshot(run) == before  # metrics.jsonl included: no second final evaluation appended


def test_a_finished_schedule_is_not_extended(run: Path) -> None:
    before = snapshot(run)
    assert_one_line_error(cli("train", "--out", run, "--resume", "--iters", 5), "is finished (2 iterations)",
                          "cannot be extended to 5", "poly learning rate")
    assert snapshot(run) == before


def test_a_crash_after_the_final_evaluation_logs_it_once(run: Path) -> None:
    """Killed between the final evaluation's log line and model.safetensors: the resume redoes
    the evaluation, and metrics.jsonl holds one final record, not two."""
    (run / "model.safetensors").unlink()
    assert [r.get("final") for r in runs.read_metrics(run)].count(True) == 1
    res = cli("train", "--out", run, "--resume")
    assert res.exit_code == 0, res.output
    assert [r.get("final") for r in runs.read_metrics(run)].count(True) == 1


# --------------------------------------------------------------------------- metrics.jsonl


def test_metrics_are_strict_json_and_old_nan_reads_as_none(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    runs.append_metrics(run, {"type": "train", "iter": 1, "loss": 1.5, "recall": float("nan"), "x": float("inf")})
    line = (run / "metrics.jsonl").read_text()
    assert "NaN" not in line and "Infinity" not in line
    with (run / "metrics.jsonl").open("a") as f:  # a line as older versions wrote it, then a torn one
        f.write('{"type": "train", "iter": 2, "loss": 1.0, "recall": NaN}\n{"type": "tr')
    assert runs.read_metrics(run) == [{"type": "train", "iter": 1, "loss": 1.5, "recall": None, "x": None},
                                      {"type": "train", "iter": 2, "loss": 1.0, "recall": None}]
