"""The Python API (issue 22 item 6, docs/api.md).

`Run.predict` is checked against two other routes: the label PNG and JSON that `rankseg
predict` writes for the same image file, and the label maps `rankseg eval --save-predictions`
writes for shard images (its own loader and transform); its top-kappa scores against the
sigmoid of the model's own multi-label logits. Bad inputs are one-line UserErrors; the
example of docs/api.md runs as written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_synthetic, tiny_run
from typer.testing import CliRunner

import rankseg_core
from rankseg_cli.app import app
from rankseg_core import api
from rankseg_core.api import load_run, open_shards
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.model.selection import Selection

REPO = Path(__file__).resolve().parents[1]
K = 40
TINY = tiny_run(6) + ["schedule.iters=2", "eval.batch_size=2", "device=cpu"]


def cli(*args: object):
    return CliRunner().invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout of docs/api.md's example: data/synth (K=40, 48 px), a RankSeg run runs/tiny
    and a baseline run runs/base (no class ranking), two steps each."""
    root = tmp_path_factory.mktemp("api")
    make_synthetic(root / "data" / "synth", num_classes=K, images=6, val_images=3, size=48, seed=5)
    train(build_train_config(None, TINY, root / "data" / "synth"), root / "runs" / "tiny", progress=False)
    train(build_train_config(None, TINY + ["model.head=segmenter"], root / "data" / "synth"), root / "runs" / "base",
          progress=False)
    return root


@pytest.fixture(scope="module")
def run(root: Path) -> api.Run:
    return load_run(root / "runs" / "tiny")


def photo(seed: int, h: int = 30, w: int = 44) -> np.ndarray:
    """H x W x 3 uint8 RGB: smooth blobs plus noise, so the prediction is not one class."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.int16)
    return np.clip(big + rng.integers(-20, 21, big.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- the same as `rankseg predict`


@pytest.mark.parametrize("kappa", [None, 3])
def test_predict_equals_the_files_of_rankseg_predict(root: Path, run: api.Run, tmp_path: Path,
                                                     kappa: int | None) -> None:
    rgb = photo(1)
    cv2.imwrite(str(tmp_path / "x.png"), rgb[..., ::-1])  # a file holds BGR for cv2
    args = ["--kappa", kappa] if kappa else []
    res = cli("predict", root / "runs" / "tiny", tmp_path / "x.png", "--out", tmp_path / "out", "--device", "cpu",
              *args)
    assert res.exit_code == 0, res.output
    pred = run.predict(rgb, kappa=kappa)
    png = cv2.imread(str(tmp_path / "out" / "x.png"), cv2.IMREAD_UNCHANGED)
    assert pred.label.dtype == np.int64 and pred.label.shape == (30, 44)
    assert np.array_equal(pred.label, png.astype(np.int64))
    assert len(np.unique(pred.label)) > 1  # a map worth comparing
    top = json.loads((tmp_path / "out" / "x.json").read_text())["top_kappa"]
    assert pred.top_classes is not None and pred.top_scores is not None
    assert len(top) == (kappa or run.config.model.effective_kappa) == len(pred.top_classes)
    assert pred.top_classes.tolist() == [t["id"] for t in top]
    assert pred.top_scores.dtype == np.float32
    assert pred.top_scores.tolist() == [float(np.float32(t["probability"])) for t in top]


def test_top_scores_are_the_sigmoid_of_the_models_own_ml_logits(run: api.Run) -> None:
    # The tiny run's eval protocol is one whole pass at short side 32 without flip: the ml
    # branch sees the image resized to 32 px and normalised by the run's mean / std.
    cfg = run.config
    assert (cfg.eval.mode, tuple(cfg.eval.scales), cfg.eval.flip) == ("whole", (1.0,), False)
    rgb = photo(2, 32, 48)  # short side already 32: no resize
    dc = run.family.data_config(run.model)
    mean = np.asarray(cfg.aug.mean or dc["mean"], np.float32)
    std = np.asarray(cfg.aug.std or dc["std"], np.float32)
    x = torch.from_numpy(((rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        p = run.model(x, Selection()).ml_logits[0].sigmoid().numpy()
    want = np.argsort(-p, kind="stable")[:cfg.model.effective_kappa]
    pred = run.predict(rgb)
    assert pred.top_classes is not None and pred.top_scores is not None
    assert pred.top_classes.tolist() == want.tolist()
    assert np.allclose(pred.top_scores, p[want], atol=1e-6)
    assert np.all(np.diff(pred.top_scores) <= 0)  # most probable first


def test_predict_on_shards_equals_rankseg_eval_maps(root: Path, run: api.Run, tmp_path: Path) -> None:
    res = cli("eval", root / "runs" / "tiny", "--device", "cpu", "--json", tmp_path / "e.json",
              "--save-predictions", tmp_path / "maps")
    assert res.exit_code == 0, res.output
    val = open_shards(root / "data" / "synth")  # the validation split, as eval's default
    assert val.split == "val" and len(val) == 3
    for item in val:
        saved = cv2.imread(str(tmp_path / "maps" / f"{item['key']}.png"), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(run.predict(item["image"]).label, saved.astype(np.int64)), item["key"]


def test_a_baseline_run_has_no_top_classes(root: Path) -> None:
    base = load_run(root / "runs" / "base", weights="last")
    pred = base.predict(photo(3))
    assert pred.top_classes is None and pred.top_scores is None and pred.label.shape == (30, 44)


def test_run_fields(root: Path, run: api.Run) -> None:
    assert run.class_names == open_shards(root / "data" / "synth", "train").index.class_names
    assert len(run.class_names) == K and run.palette.shape == (K, 3) and run.palette.dtype == np.uint8
    assert run.device == torch.device("cpu") and not run.model.training
    assert run.family.name == "segmenter"


# --------------------------------------------------------------------------- one line per mistake


def one_line(exc: pytest.ExceptionInfo[UserError], *fragments: str) -> None:
    text = str(exc.value)
    assert "\n" not in text, text
    for f in fragments:
        assert f in text, text


def test_a_missing_run_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        load_run(tmp_path / "nope")
    one_line(e, "nope", "no such run directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as e:
        load_run(tmp_path / "empty")
    one_line(e, "config.yaml is missing", "not a rankseg run directory")


@pytest.mark.parametrize("image, fragments", [
    (np.zeros((8, 8, 3), np.float32), ["dtype float32", "uint8"]),
    (np.zeros((8, 8, 3), np.uint16), ["dtype uint16"]),
    (np.zeros((8, 8), np.uint8), ["grey image of shape (8, 8)", "H x W x 3"]),
    (np.zeros((8, 8, 1), np.uint8), ["grey image"]),
    (np.zeros((8, 8, 4), np.uint8), ["(8, 8, 4)", "RGBA"]),
    (np.zeros((3, 8, 8), np.uint8), ["(3, 8, 8)", "H x W x 3"]),
    (np.zeros((0, 8, 3), np.uint8), ["no pixels"]),
    ([[0, 0, 0]], ["a list, not a numpy array"]),
])
def test_bad_images_are_one_line(run: api.Run, image: object, fragments: list[str]) -> None:
    with pytest.raises(UserError) as e:
        run.predict(image)  # type: ignore[arg-type]
    one_line(e, "image:", *fragments)


@pytest.mark.parametrize("kw, fragments", [
    ({"kappa": 0}, ["kappa 0", "at least 1"]),
    ({"mode": "tiles"}, ["mode 'tiles'", "whole or slide"]),
])
def test_bad_options_are_one_line(run: api.Run, kw: dict, fragments: list[str]) -> None:
    with pytest.raises(UserError) as e:
        run.predict(photo(0), **kw)
    one_line(e, *fragments)


def test_kappa_on_a_baseline_is_refused(root: Path) -> None:
    with pytest.raises(UserError) as e:
        load_run(root / "runs" / "base", weights="last").predict(photo(0), kappa=3)
    one_line(e, "--kappa", "ranks no classes")


def test_a_missing_split_is_one_line(root: Path) -> None:
    with pytest.raises(UserError) as e:
        open_shards(root / "data" / "synth", "nosuch")
    one_line(e, "no split 'nosuch'", "val")


def test_slide_mode_predicts_at_the_image_size(run: api.Run) -> None:
    assert run.predict(photo(4, 40, 90), mode="slide").label.shape == (40, 90)


# --------------------------------------------------------------------------- the doc, the package


def doc_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_doc_example_runs(root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(root)
    rgb = photo(6, 36, 50)
    cv2.imwrite("photo.png", rgb[..., ::-1])
    exec(compile(doc_code(), "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith(f"segmenter-vitt {K} classes\n")
    assert len(re.findall(r"pixel accuracy \d\.\d\d", out)) == 3  # every validation image
    assert cv2.imread("photo_pred.png").shape == (36, 50, 3)


def test_importing_the_package_stays_cheap() -> None:
    assert {"load_run", "Run", "Prediction", "open_shards"} <= set(dir(api))
    code = "import sys, rankseg_core; print(rankseg_core.__version__, 'torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.stdout.split() == [rankseg_core.__version__, "False"], res.stderr


# setuptools warns, while finalizing, about the presets folder being package data: not ours.
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_py_typed_is_package_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the wheel's build_py step copies (tests/test_wheel.py builds the wheel itself)."""
    from setuptools import distutils  # type: ignore[attr-defined]  # setuptools' bundled copy

    assert (REPO / "rankseg_core" / "py.typed").is_file()
    monkeypatch.chdir(REPO)
    dist = distutils.core.run_setup("setup.py", stop_after="config")
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    files = {(pkg, name) for pkg, _, _, names in build_py.data_files for name in names}
    assert ("rankseg_core", "py.typed") in files
