"""Faults and untrusted files (issue 17 items 4, 13, 14 and part of 15).

- A disk that fills up while HDF5 writes a shard: one `error:` line, no traceback, no crash.
- FIFOs and links to devices where a file is read (predictions, source images and JSONs,
  --init-from weights, predict's images): refused in one line, never opened for a read that
  blocks or never ends; whole-file reads are bounded.
- Sizes are checked on the header before decoding: a prediction of the wrong size is refused
  without being decoded.
- Outputs never replace inputs or files the command did not write: `eval-predictions --json`,
  `eval --save-predictions` (the rule `predict --out` follows); sample keys that give one file
  name are refused before anything is written.
- An out-of-range `--pred-offset` is one line.

Calls that hung before the fix run in a thread with a generous join: a hang fails the test
instead of stalling the suite (nothing here measures time).
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from score_helpers import make_shards
from typer.testing import CliRunner

from rankseg_cli.common import new_app
from rankseg_cli.score_cmds import register
from rankseg_core.convert import source_io
from rankseg_core.engine import evaluate, predict, warm_start
from rankseg_core.errors import SampleError, UserError
from rankseg_core.evaluation import score_files
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils import distributed as D
from rankseg_core.utils import fsio

K = 5
HANG_GUARD_S = 120  # far above any of these calls; only reached when a call blocks for good


def cli(*args: object):
    app = new_app("test")
    register(app)
    app.callback()(lambda: None)
    return CliRunner().invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


def returns(fn: Callable[[], Any]) -> Any:
    """fn()'s result or exception, failing the test if fn does not return (a blocked open)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(HANG_GUARD_S)
    assert not t.is_alive(), "the call blocked (it opened a FIFO for reading)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    p = tmp_path / "fifo"
    os.mkfifo(p)
    return p


def zero_link(path: Path) -> Path:
    """`path` as a symlink to /dev/zero (a file that never ends)."""
    if not Path("/dev/zero").exists() or not stat.S_ISCHR(os.stat("/dev/zero").st_mode):
        pytest.skip("no /dev/zero character device here")
    path.symlink_to("/dev/zero")
    return path


# --------------------------------------------------------------------------- item 4: full disk in HDF5


def _prepare_with_file_size_limit(out: Path, limit: int) -> subprocess.CompletedProcess[str]:
    """`rankseg prepare synthetic` where no file may grow past `limit` bytes: HDF5's writes fail
    (EFBIG) as on a full disk, without root or a small file system."""
    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing

    return subprocess.run([sys.executable, "-m", "rankseg_cli", "prepare", "synthetic", "--out", str(out),
                           "--images", "40", "--size", "64", "--workers", "0"],
                          capture_output=True, text=True, preexec_fn=limit_files,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_hdf5_write_failure_is_one_line(tmp_path: Path) -> None:
    # Before the fix: RuntimeError "Can't decrement id ref count" from h5py's close (a traceback),
    # then a segmentation fault at exit.
    out = tmp_path / "data"
    res = _prepare_with_file_size_limit(out, 64 * 1024)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert str(out) in lines[0] and "file too large" in lines[0], lines[0]
    assert not list(out.glob("*.h5*")), "a shard or its temp file was left behind"


@pytest.mark.slow
def test_hdf5_write_on_a_real_full_disk(tmp_path: Path) -> None:
    from test_os_errors import in_small_fs

    out = tmp_path / "fs" / "data"
    res = in_small_fs(tmp_path, "size=1m", "prepare", "synthetic", "--out", str(out), "--workers", "0")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert str(out) in lines[0] and "no space left" in lines[0], lines[0]


# --------------------------------------------------------------------------- item 14: the one helper


def test_read_regular_refuses_fifos_devices_and_large_files(tmp_path: Path, fifo: Path) -> None:
    for p in (fifo, zero_link(tmp_path / "zero.png"), tmp_path):
        with pytest.raises(UserError, match="not a regular file|is a directory"):
            returns(lambda p=p: fsio.read_regular(p, "image", 1 << 20))
    big = tmp_path / "big.bin"
    big.write_bytes(b"x" * 1001)
    with pytest.raises(SampleError, match="1,001 bytes, over rankseg's limit of 1,000"):
        fsio.read_regular(big, "image", 1000, SampleError)
    assert fsio.read_regular(big, "image", 1001) == b"x" * 1001
    with pytest.raises(FileNotFoundError):
        fsio.read_regular(tmp_path / "missing", "image", 10)


# --------------------------------------------------------------------------- item 14: every reader


def test_converters_refuse_fifos_and_device_links(tmp_path: Path, fifo: Path) -> None:
    zero = zero_link(tmp_path / "x.jpg")
    for p in (fifo, zero):
        with pytest.raises(SampleError, match="not a regular file") as exc:
            returns(lambda p=p: source_io.read_bytes(p, "image"))
        assert str(p) in str(exc.value)
    json_fifo = tmp_path / "ann.json"
    os.mkfifo(json_fifo)
    with pytest.raises(UserError, match="not a regular file"):
        returns(lambda: source_io.load_json(json_fifo, "COCO panoptic JSON"))
    with pytest.raises(UserError, match="not a regular file"):
        returns(lambda: list(source_io.stream_items(json_fifo, "images.item", "LVIS JSON")))
    with pytest.raises(UserError, match="no such LVIS JSON file"):
        list(source_io.stream_items(tmp_path / "nope.json", "images.item", "LVIS JSON"))


def test_converters_compare_sizes_on_the_headers(tmp_path: Path) -> None:
    image = cv2.imencode(".jpg", np.zeros((20, 30, 3), np.uint8))[1].tobytes()
    mask = cv2.imencode(".png", np.zeros((20, 31), np.uint8))[1].tobytes()
    with pytest.raises(SampleError, match="mask is 31x20 but its image is 30x20"):
        source_io.check_header_sizes(image, mask, "m.png")
    same = cv2.imencode(".png", np.zeros((20, 30), np.uint8))[1].tobytes()
    source_io.check_header_sizes(image, same, "m.png")


def test_init_from_refuses_fifos_and_device_links(tmp_path: Path) -> None:
    pt = tmp_path / "w.pt"
    os.mkfifo(pt)
    zero = zero_link(tmp_path / "z.safetensors")
    for p in (pt, zero):
        with pytest.raises(UserError, match="--init-from .* not a regular file"):
            returns(lambda p=p: warm_start.read_source(p))
    real = tmp_path / "ok.pt"
    torch.save({"w": torch.zeros(2)}, real)
    assert list(warm_start.read_source(real)[1]) == ["w"]


def test_predict_refuses_a_fifo_image(fifo: Path) -> None:
    assert predict.list_images([fifo]) == [fifo]  # listed, then refused when read: one line
    with pytest.raises(UserError, match="not a regular file"):
        returns(lambda: predict.read_image(fifo))


# --------------------------------------------------------------------------- eval-predictions


@pytest.fixture(scope="module")
def gt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    labels = {f"img_{i}": np.full((20, 28), i % K, np.uint16) for i in range(3)}
    return make_shards(tmp_path_factory.mktemp("untrusted") / "data", {"val": labels}, [f"c{i}" for i in range(K)])


def predictions(out: Path, shape: tuple[int, int] = (20, 28)) -> Path:
    out.mkdir()
    for i in range(3):
        cv2.imwrite(str(out / f"img_{i}.png"), np.full(shape, i % K, np.uint16))
    return out


def test_eval_predictions_refuses_a_fifo_prediction(gt: Path, tmp_path: Path) -> None:
    preds = predictions(tmp_path / "p")
    (preds / "img_1.png").unlink()
    os.mkfifo(preds / "img_1.png")
    res = returns(lambda: cli("eval-predictions", preds, "--data", gt, "--json", tmp_path / "r.json"))
    assert_one_line_error(res, str(preds / "img_1.png"), "not a regular file")


def test_a_prediction_of_the_wrong_size_is_not_decoded(gt: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    preds = predictions(tmp_path / "p", (20, 29))
    real = cv2.imdecode
    decoded: list[int] = []

    def imdecode(buf: np.ndarray, flags: int) -> Any:
        decoded.append(len(buf))
        return real(buf, flags)

    monkeypatch.setattr(score_files.cv2, "imdecode", imdecode)
    label = np.zeros((20, 28), np.uint16)
    with pytest.raises(UserError, match="prediction is 29x20 but the label of img_0 is 28x20"):
        score_files.read_prediction(preds / "img_0.png", K, 0, label.shape, " of img_0")
    assert decoded == [], "the prediction was decoded before its size was checked"
    res = cli("eval-predictions", preds, "--data", gt, "--json", tmp_path / "r.json")
    assert_one_line_error(res, "prediction is 29x20 but the label of img_0 is 28x20")


@pytest.mark.parametrize("offset", ["65536", str(2 ** 64)])
def test_pred_offset_out_of_range_is_one_line(gt: Path, tmp_path: Path, offset: str) -> None:
    preds = predictions(tmp_path / "p")
    res = cli("eval-predictions", preds, "--data", gt, "--pred-offset", offset, "--json", tmp_path / "r.json")
    assert_one_line_error(res, f"--pred-offset {offset}", "must be 0..65535")


def test_eval_predictions_json_never_replaces_an_input(gt: Path, tmp_path: Path) -> None:
    preds = predictions(tmp_path / "p")
    user = tmp_path / "notes.json"
    user.write_text('{"mine": 1}\n')
    shard = next(gt.glob("val-*.h5"))
    targets = [gt / "dataset.json", shard, shard.with_name(shard.name + ".json"), preds / "img_0.png", user,
               tmp_path / "notes_per_class.json"]  # the last: its notes_per_class.csv sibling is user's
    (tmp_path / "notes_per_class_per_class.csv").write_text("my table\n")
    for target in targets:
        before = {p: p.read_bytes() for p in (gt / "dataset.json", shard, preds / "img_0.png", user,
                                              tmp_path / "notes_per_class_per_class.csv")}
        res = cli("eval-predictions", preds, "--data", gt, "--json", target)
        assert_one_line_error(res, "is not an `eval-predictions` report", "choose another --json")
        assert {p: p.read_bytes() for p in before} == before
    # Its own earlier report is replaced, as a re-run should.
    report = tmp_path / "scores.json"
    for _ in range(2):
        res = cli("eval-predictions", preds, "--data", gt, "--json", report)
        assert res.exit_code == 0, res.output
    assert report.with_suffix(".csv").read_text().startswith("metric,value\n")


# --------------------------------------------------------------------------- eval --save-predictions


def _writers(save: Path, data: Path) -> evaluate._Writers:
    opts = evaluate.EvalOptions(save_predictions=save)
    return evaluate._Writers(opts, ShardDataset(data, "val"), D.current())


def test_save_predictions_never_writes_over_other_files(gt: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    out.mkdir()
    (out / "img_0.png").write_bytes(b"hand-made label map")
    with pytest.raises(UserError, match=r"--save-predictions .* already holds files .* \(e.g. img_0.png\)"):
        _writers(out, gt)
    assert sorted(p.name for p in out.iterdir()) == ["img_0.png"]
    # A directory `predict` wrote is not this command's either.
    predicted = tmp_path / "predicted"
    predict.claim_out_dir(predicted)
    (predicted / "img_0.png").write_bytes(b"a predict output")
    with pytest.raises(UserError, match="already holds files"):
        _writers(predicted, gt)
    # Its own directory is reused; a new one is claimed.
    fresh = tmp_path / "fresh"
    w = _writers(fresh, gt)
    w.label_map("img_0", torch.zeros((20, 28), dtype=torch.int64))
    _writers(fresh, gt)
    assert (fresh / "img_0.png").is_file()


def test_colliding_sample_keys_are_refused_before_writing(tmp_path: Path) -> None:
    labels = {"a/b": np.zeros((8, 8), np.uint16), "a__b": np.ones((8, 8), np.uint16)}
    data = make_shards(tmp_path / "data", {"val": labels}, [f"c{i}" for i in range(K)])
    out = tmp_path / "preds"
    with pytest.raises(UserError, match="'a/b' and 'a__b' would both be saved as a__b.png"):
        _writers(out, data)
    assert not out.exists() or not any(out.iterdir())
