"""PASCAL-Context-459 / 59 / 60 from the release's trainval/*.mat label maps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import assert_one_line_error
from convert_trees import read_shards
from pascal_context_trees import pascal_context_release, table
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.pascal_context import prepare_pascal_context_mat
from rankseg_core.convert.png_datasets import prepare_pascal_context
from rankseg_core.errors import UserError

IGNORE = 65535
OPTS = ConvertOptions(samples_per_shard=2)


def test_table_59_names_are_the_459_names_at_the_59_ids() -> None:
    names, ids59 = table()
    pc59 = json.loads((Path(__file__).resolve().parents[1] / "datasets/pascal_context/classes.json").read_text())
    assert len(names) == 459 and len(set(names)) == 459 and len(ids59) == 59
    assert [names[i - 1] for i in ids59] == [c["name"] for c in pc59["classes"]]


def test_459_from_mat(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    src = pascal_context_release(root)
    index = prepare_pascal_context_mat(root, tmp_path / "pc459", 459, opts=OPTS)
    assert index["name"] == "pascal-context-459" and index["num_classes"] == 459
    assert {s: m["num_samples"] for s, m in index["splits"].items()} == {"train": 3, "val": 3}
    got = read_shards(tmp_path / "pc459")
    for key, s in src.items():
        # ODISE / FC-CLIP prepare_pascal_ctx_full_sem_seg.py: 0 -> 65535, then id - 1.
        want = s.values.astype(np.int64) - 1
        want[s.values == 0] = IGNORE
        assert np.array_equal(got[key]["label"], want), key
        assert got[key]["split"] == s.split and got[key]["image"] == s.image_path.read_bytes()
        assert got[key]["classes"] == sorted(set(want[want != IGNORE].tolist()))
    assert index["class_names"][0] == "accordion" and index["class_names"][458] == "wool"


@pytest.mark.parametrize("classes", [59, 60])
def test_59_and_60_from_mat_equal_the_mmseg_png_path(tmp_path: Path, classes: int) -> None:
    root = tmp_path / "VOC2010"
    src = pascal_context_release(root, seed=classes)
    # The mmseg path lists the same images (SegmentationContext lists = Main lists here).
    a = prepare_pascal_context_mat(root, tmp_path / "mat", classes, opts=OPTS)
    b = prepare_pascal_context(root, tmp_path / "png", classes, OPTS)
    assert a["class_names"] == b["class_names"]
    la, lb = read_shards(tmp_path / "mat"), read_shards(tmp_path / "png")
    assert set(la) == set(lb) == set(src)
    for key in src:
        assert np.array_equal(la[key]["label"], lb[key]["label"]), key
        assert la[key]["classes"] == lb[key]["classes"]
    # Hand check: a 459-only class (id 1, accordion) and 0 are background.
    key = next(iter(src))
    bg = np.isin(src[key].values, [0, 1])
    want_bg = IGNORE if classes == 59 else 0
    assert np.all(la[key]["label"][bg] == want_bg)


def test_one_short_list_and_damaged_files(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    pascal_context_release(root, extra_val=1)  # val.txt lists 2010_000000, whose .mat is missing
    with pytest.raises(UserError, match=r"2010_000000.mat: label map is missing \(.*val.txt lists it"):
        prepare_pascal_context_mat(root, tmp_path / "a", 459, opts=OPTS)
    index = prepare_pascal_context_mat(root, tmp_path / "b", 459,
                                       opts=ConvertOptions(samples_per_shard=2, on_error="skip"))
    assert index["splits"]["val"]["num_samples"] == 3 and index["splits"]["val"]["num_skipped"] == 1
    skipped = (tmp_path / "b" / "skipped.jsonl").read_text()
    assert "2010_000000" in skipped and "label map is missing" in skipped
    # A list can select the Detail-API split (here: without the missing image).
    index = prepare_pascal_context_mat(root, tmp_path / "c", 459, opts=OPTS,
                                       lists={"val": root / "ImageSets" / "SegmentationContext" / "val.txt"})
    assert index["splits"]["val"]["num_samples"] == 3


def test_bad_release_files(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    src = pascal_context_release(root, n_train=2, n_val=1)
    keys = sorted(src)
    scipy.io.savemat(root / "trainval" / f"{keys[0]}.mat", {"Other": np.zeros((2, 2), np.uint16)})
    (root / "trainval" / f"{keys[1]}.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    lab = src[keys[2]].values.copy()
    lab[0, 0] = 460  # not a PASCAL-Context label id
    scipy.io.savemat(root / "trainval" / f"{keys[2]}.mat", {"LabelMap": lab})
    index = prepare_pascal_context_mat(root, tmp_path / "o", 459,
                                       opts=ConvertOptions(samples_per_shard=2, on_error="skip"))
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    assert len(reasons) == 3 and index["splits"]["train"]["num_samples"] == 0
    assert any("no 2-D label map 'LabelMap'" in r for r in reasons)
    assert any("not a readable .mat file" in r for r in reasons)
    assert any("label value(s) 460" in r for r in reasons)


def test_cli_from_mat_and_errors(tmp_path: Path) -> None:
    root = tmp_path / "VOC2010"
    pascal_context_release(root, n_train=2, n_val=2)
    run = CliRunner().invoke
    res = run(app, ["prepare", "pascal-context", "--from-mat", "--classes", "459", "--root", str(root),
                    "--out", str(tmp_path / "ok"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "dataset.json").read_text())["num_classes"] == 459
    base = ["prepare", "pascal-context", "--root", str(root), "--workers", "0"]
    assert_one_line_error(run(app, base + ["--classes", "459", "--out", str(tmp_path / "x")]), "add --from-mat")
    assert_one_line_error(run(app, base + ["--from-mat", "--classes", "150", "--out", str(tmp_path / "y")]),
                          "459, 59 or 60")
    assert_one_line_error(run(app, base + ["--from-mat", "--mat-dir", str(tmp_path / "none"), "--out",
                                           str(tmp_path / "z")]), "none: no such directory")
    assert_one_line_error(run(app, base + ["--from-mat", "--val-list", str(tmp_path / "v.txt"), "--out",
                                           str(tmp_path / "w")]), "v.txt: missing split list")
    (root / "labels.txt").write_text((root / "labels.txt").read_text().replace("2: aeroplane", "2: airplane"))
    assert_one_line_error(run(app, base + ["--from-mat", "--out", str(tmp_path / "v")]),
                          "labels.txt: id 2 is 'airplane'")
    (root / "labels.txt").write_text("1: accordion\n")
    assert_one_line_error(run(app, base + ["--from-mat", "--out", str(tmp_path / "u")]), "expected 459 lines")
