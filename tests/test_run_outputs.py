"""What `eval`, `predict` and `viz` write next to a run (issue 9 items 6, 7, 8).

Options are checked where they enter (one line, nothing written); `eval` on other shards keeps
earlier results; `predict` never writes over an input or a file it did not write, and never
reads its own outputs back as images; every JSON file of a run directory is strict JSON.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.predict import MARKER
from rankseg_core.engine.train import train

K = 40
TINY = tiny_run(6) + ["schedule.iters=2", "eval.batch_size=2"]


def cli(*args: object):
    return CliRunner().invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/ (K=40), a RankSeg run rs/ and a baseline run base/ trained on it."""
    root = tmp_path_factory.mktemp("outputs")
    make_synthetic(root / "data", num_classes=K, images=6, val_images=3, size=48, seed=3)
    train(build_train_config(None, TINY, root / "data"), root / "rs", progress=False)
    train(build_train_config(None, TINY + ["model.head=segmenter"], root / "data"), root / "base", progress=False)
    return root


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x.png", "y.jpg"):
        cv2.imwrite(str(d / name), rng.integers(0, 256, (30, 44, 3)).astype(np.uint8))
    return d


def contents(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


# --------------------------------------------------------------------------- values checked at the door


@pytest.mark.parametrize("args, fragments", [
    (["--kappa", "0"], ["--kappa 0: must be at least 1"]),
    (["--scales", "0,-1"], ["--scales 0,-1: every scale must be > 0"]),
    (["--scales", "1,nan"], ["--scales 1,nan: every scale must be > 0"]),
    (["--scales", "1,100"], ["at most 8"]),
    (["--max-images", "-1"], ["--max-images -1: must be >= 0"]),
    (["--mode", "tiles"], ["--mode 'tiles': use whole or slide"]),
])
def test_eval_refuses_bad_values_before_writing(root: Path, tmp_path: Path, args: list[str],
                                                fragments: list[str]) -> None:
    out = tmp_path / "e.json"
    assert_one_line_error(cli("eval", root / "rs", "--json", out, "--device", "cpu", *args), *fragments)
    assert not out.exists()


@pytest.mark.parametrize("kappa", ["0", "-3"])
def test_predict_refuses_kappa_below_one(root: Path, images: Path, tmp_path: Path, kappa: str) -> None:
    assert_one_line_error(cli("predict", root / "rs", images, "--out", tmp_path / "p", "--kappa", kappa),
                          f"--kappa {kappa}: must be at least 1")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- eval output names


def test_eval_on_other_shards_keeps_both_results(root: Path, tmp_path: Path) -> None:
    run = root / "rs"
    res = cli("eval", run, "--device", "cpu", "--max-images", "2")
    assert res.exit_code == 0, res.output
    own = run / "eval" / "val.json"
    before = own.read_bytes()
    # Two other shard sets with the run's dataset name ("synthetic") and K.
    results = []
    for i, name in enumerate(("other", "again")):
        other = tmp_path / name
        make_synthetic(other, num_classes=K, images=3, val_images=2, size=48, seed=10 + i)
        res = cli("eval", run, "--data", other, "--device", "cpu")
        assert res.exit_code == 0, res.output
        tag = hashlib.sha256(str(other.resolve()).encode()).hexdigest()[:8]
        path = run / "eval" / f"synthetic-val-{tag}.json"
        rep = json.loads(path.read_text())
        assert rep["config"]["data"] == str(other.resolve()) and rep["num_images"] == 2
        assert (run / "eval" / f"synthetic-val-{tag}_per_class.csv").is_file()
        results.append(path)
    assert own.read_bytes() == before  # the run's own result is still there
    assert results[0] != results[1] and all(p.is_file() for p in results)
    assert json.loads(before)["num_images"] == 2


def test_an_evaluation_in_progress_locks_its_output(root: Path, tmp_path: Path) -> None:
    from rankseg_core.utils import lock

    out = tmp_path / "e.json"
    with lock.dir_lock(tmp_path, "eval", name=f"{lock.LOCK_NAME}.e.json"):
        assert_one_line_error(cli("eval", root / "rs", "--json", out, "--device", "cpu"),
                              "being written by another rankseg process (eval")
    assert not out.exists()
    res = cli("eval", root / "rs", "--json", tmp_path / "other.json", "--device", "cpu", "--max-images", "1")
    assert res.exit_code == 0, res.output  # a different output file is not locked


# --------------------------------------------------------------------------- predict never overwrites


def test_predict_out_equal_to_the_input_directory_is_refused(root: Path, images: Path) -> None:
    before = contents(images)
    assert_one_line_error(cli("predict", root / "rs", images, "--out", images), "is also an input directory")
    # Given as a file, x.png's label map would be imgs/x.png itself.
    assert_one_line_error(cli("predict", root / "rs", images / "x.png", "--out", images),
                          f"{images / 'x.png'} would overwrite the input {images / 'x.png'}")
    assert contents(images) == before


def test_predict_refuses_an_input_linked_to_an_output(root: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    out.mkdir()
    (out / MARKER).write_text("{}")  # an earlier predict's directory...
    os.link(images / "x.png", out / "x.png")  # ...holding a hard link to an input
    assert_one_line_error(cli("predict", root / "rs", images / "x.png", "--out", out), "would overwrite the input")
    assert (images / "x.png").read_bytes() == (out / "x.png").read_bytes()


def test_predict_never_reads_its_outputs(root: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    res = cli("predict", root / "rs", images, "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "x.png", "x_overlay.png", "x.json", "y.png",
                                                             "y_overlay.png", "y.json"])
    before = contents(out)
    for given in (out, out / "x_overlay.png"):
        assert_one_line_error(cli("predict", root / "rs", given, "--out", tmp_path / "q"),
                              "holds `rankseg predict` outputs", "not images")
    res = cli("predict", root / "rs", images, "--out", out)  # re-running into its own --out is fine
    assert res.exit_code == 0, res.output
    assert set(contents(out)) == set(before)


def test_predict_refuses_a_directory_of_other_files(root: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels"
    out.mkdir()
    (out / "x.png").write_bytes(b"hand-made label map")
    assert_one_line_error(cli("predict", root / "rs", images, "--out", out), "already holds files",
                          "e.g. x.png", "new or empty --out")
    assert contents(out) == {"x.png": b"hand-made label map"}


def test_predict_output_names_never_collide(root: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    inputs = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "x-1.png",
              tmp_path / "d" / "x_overlay.png"]
    for p in inputs:
        p.parent.mkdir()
        cv2.imwrite(str(p), rng.integers(0, 256, (20, 24, 3)).astype(np.uint8))
    out = tmp_path / "out"
    res = cli("predict", root / "rs", *inputs, "--out", out)
    assert res.exit_code == 0, res.output
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != MARKER]
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in inputs)  # four results, none lost
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 8 and len(set(pngs)) == 8


# --------------------------------------------------------------------------- strict JSON everywhere


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_every_json_file_of_a_run_is_strict(root: Path, images: Path) -> None:
    """Train (baseline: its mAP is undefined), eval, predict and every viz into the run
    directories, then parse every JSON / JSONL with a parser that refuses NaN and Infinity."""
    rs, base, data = root / "rs", root / "base", root / "data"
    for args in (["eval", rs], ["eval", base], ["predict", rs, images, "--out", rs / "pred"],
                 ["predict", base, images, "--out", base / "pred"],
                 ["viz", "tau", rs, "--out", rs / "viz" / "tau.png"],
                 ["viz", "predictions", rs, "--baseline", base, "--data", data, "--num", 2, "--out", rs / "viz" / "pred"],
                 ["viz", "false-positives", rs, "--baseline", base, "--data", data, "--num", 1, "--stats-num", 2,
                  "--out", rs / "viz" / "fp"],
                 ["viz", "samples", data, "--num", 2, "--out", rs / "viz" / "samples"]):
        res = cli(*args, *(["--device", "cpu"] if args[0] == "eval" else []))
        assert res.exit_code == 0, (args, res.output)
    seen = {".json": 0, ".jsonl": 0, ".csv": 0}
    for run in (rs, base):
        for path in sorted(run.rglob("*")):
            if path.suffix == ".json":
                _strict(path.read_text())
            elif path.suffix == ".jsonl":
                lines = path.read_text().splitlines()
                assert lines and all(isinstance(_strict(line), dict) for line in lines), path
            elif path.suffix == ".csv":
                for row in csv.reader(path.open()):
                    assert not {c.strip().lower() for c in row} & {"nan", "inf", "-inf", "infinity"}, (path, row)
            else:
                continue
            seen[path.suffix] += 1
    assert seen[".jsonl"] == 2 and seen[".json"] >= 12 and seen[".csv"] >= 6, seen
    # The undefined values are there, as null: the baseline has no multi-label branch.
    rep = _strict((base / "eval" / "val.json").read_text())
    assert rep["map"] is None and rep["recall_at_kappa"] is None
    final = [_strict(line) for line in (base / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["final"] and final["map"] is None
