"""Every `rankseg viz` command on a run of every model family (trained two iterations): it
draws its figure, or refuses in one line where the figure does not apply (a classifier has no
segmentation and no rank LayerNorm)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_MASK2FORMER_RUN, make_synthetic, tiny_run
from PIL import Image
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train

runner = CliRunner()

FAMILIES = {  # family -> (overrides of a two-iteration run, synthetic image size)
    "segmenter": (tiny_run(), 32),
    "mask2former": (TINY_MASK2FORMER_RUN, 64),
    "classifier": (tiny_run(model="classifier-vitt"), 32),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(family, run directory, its shards)."""
    name = request.param
    overrides, size = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    data = make_synthetic(root / "data", images=10, num_classes=40, size=size)
    run = root / "run"
    train(build_train_config(None, [*overrides, "schedule.iters=2"], data), run, progress=False)
    return name, run, data


def viz(*args) -> object:
    return runner.invoke(app, ["viz", *[str(a) for a in args]])


def assert_refused(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [line for line in res.output.splitlines() if line.strip()]
    text = " ".join(" ".join(lines).split())
    assert text.startswith("error:"), res.output
    for f in fragments:
        assert f in text, text


def assert_figure(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200, im.size


def test_viz_tau(family_run, tmp_path: Path) -> None:
    name, run, _ = family_run
    res = viz("tau", run, "--out", tmp_path / "tau.png")
    if name == "classifier":
        assert_refused(res, "multi-label classifier", "no rank LayerNorm")
        assert not (tmp_path / "tau.png").exists()
    else:
        assert res.exit_code == 0, res.output
        assert_figure(tmp_path / "tau.png")
        assert (tmp_path / "tau.csv").is_file()


def test_viz_false_positives(family_run, tmp_path: Path) -> None:
    name, run, data = family_run
    res = viz("false-positives", run, "--data", data, "--num", 1, "--stats-num", 2, "--out", tmp_path / "fp")
    if name == "classifier":
        assert_refused(res, "multi-label classifier", "without a class ranking")
    else:
        assert res.exit_code == 0, res.output
        assert_figure(tmp_path / "fp" / "fp_summary.png")
        assert len(list((tmp_path / "fp").glob("fp_val_*.png"))) == 1


def test_viz_predictions(family_run, tmp_path: Path) -> None:
    name, run, data = family_run
    res = viz("predictions", run, "--data", data, "--num", 2, "--out", tmp_path / "pred")
    if name == "classifier":
        assert_refused(res, "multi-label classifier", "no segmentation")
    else:
        assert res.exit_code == 0, res.output
        assert_figure(tmp_path / "pred" / "predictions.png")


def test_viz_samples(family_run, tmp_path: Path) -> None:
    _, run, data = family_run
    res = viz("samples", data, "--num", 2, "--out", tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert_figure(tmp_path / "s" / "samples.png")
    # A run directory where shards belong: one line naming what is missing.
    assert_refused(viz("samples", run, "--out", tmp_path / "s2"), "dataset.json")
