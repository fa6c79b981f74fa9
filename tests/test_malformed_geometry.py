"""Malformed geometry in LVIS / COCO-Stuff / YouTube-VIS JSONs is a per-sample error.

Each case breaks one annotation of one image (or frame): `--on-error skip` skips exactly that
sample (the others convert, and match a conversion of the same tree without the fault), `fail`
stops with one line naming the JSON, the image and the annotation. The case that used to
crash pycocotools (a 1e30 coordinate) runs in a subprocess, so a regression cannot kill pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner
from video_lvis_trees import (
    H,
    W,
    lvis_tree,
    read_samples,
    rect,
    rle_str,
    rle_uncompressed,
    write_docs,
    write_json,
    ytvis_frames,
)

from rankseg_core.convert.coco_lvis import prepare_coco_lvis
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.youtube_vis import prepare_youtube_vis
from rankseg_core.errors import UserError
from rankseg_core.shards.verify import verify_shards

SKIP = ConvertOptions(workers=0, on_error="skip")
FAIL = ConvertOptions(workers=0)
# (name, which JSON, how to break it); LVIS cases replace annotation 7's segmentation, stuff
# cases the segmentation of image 2's first stuff annotation (id 3).
ZIGZAG = [0, 0, W, H] * 300 + [0, 0]
LVIS_CASES = {
    "huge coordinate": [[0, 0, 1e30, 0, 1e30, 1e30]],
    "far outside": [[0, 0, 5e6, 0, 5e6, 5e6]],
    "odd length": [[0, 0, 5, 0, 5]],
    "two points": [[0, 0, 5, 5]],
    "no polygon": [],
    "empty polygon": [[]],
    "string value": [[0, 0, "5", 0, 5, 5]],
    "null value": [[0, 0, None, 0, 5, 5]],
    "boolean value": [[0, 0, True, 0, 5, 5]],
    "nested value": [[0, 0, [5], 0, 5, 5]],
    "long boundary": [ZIGZAG],
    "not a segmentation": "polygon",
    "number": 17,
    "missing": None,
}
STUFF_CASES = {
    "garbage string": {"size": [H, W], "counts": "garbage~~"},
    "unterminated string": {"size": [H, W], "counts": "11P"},
    "string of another size": rle_str(np.ones((H, W + 1), bool)) | {"size": [H, W]},
    "short string": {"size": [H, W], "counts": "1"},
    "counts list bad sum": {"size": [H, W], "counts": [3, 5]},
    "negative counts": {"size": [H, W], "counts": [-1, H * W + 1]},
    "float counts": {"size": [H, W], "counts": [3.0, H * W - 3]},
    "size mismatch": rle_str(np.ones((H, W + 1), bool)),
    "float size": {"size": [float(H), float(W)], "counts": [H * W]},
    "counts number": {"size": [H, W], "counts": 5},
}


def broken(root: Path, case: str) -> tuple[Path, Path, Path]:
    coco, lvis, stuff = lvis_tree(root)
    if case in LVIS_CASES:
        seg = LVIS_CASES[case]
        ann = lvis["annotations"][2]
        if seg is None:
            del ann["segmentation"]
        else:
            ann["segmentation"] = seg
    else:
        stuff["annotations"][2]["segmentation"] = STUFF_CASES[case]
    return (coco, *write_docs(root, lvis, stuff))


def cli(*args: object):
    from rankseg_cli import prepare_video_lvis  # noqa: F401  (registers the commands)
    from rankseg_cli.app import app

    return CliRunner().invoke(app, ["prepare", *map(str, args)])


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Image 1 as converted from the unbroken tree."""
    root = tmp_path_factory.mktemp("clean")
    coco, lvis, stuff = lvis_tree(root)
    lj, sj = write_docs(root, lvis, stuff)
    prepare_coco_lvis(coco, [lj], [sj], root / "out", opts=FAIL)
    samples = read_samples(root / "out", "val")
    assert len(samples) == 2 and samples["000000000002"]["classes"]
    return samples["000000000001"]


@pytest.mark.parametrize("case", [*LVIS_CASES, *STUFF_CASES])
def test_coco_lvis_case_skips_only_its_image(tmp_path: Path, case: str, clean: dict) -> None:
    coco, lj, sj = broken(tmp_path, case)
    json_name, ann = ("lvis_v1_val.json", "annotation 7") if case in LVIS_CASES else ("stuff_val2017.json", "annotation 3")
    where = ["image 2 (val2017/000000000002.jpg)", ann, json_name]

    out = tmp_path / "skip"
    index = prepare_coco_lvis(coco, [lj], [sj], out, opts=SKIP)
    assert index["splits"]["val"]["num_samples"] == 1 and index["splits"]["val"]["num_skipped"] == 1
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["key"] for s in skipped] == ["000000000002"]
    assert all(w in skipped[0]["reason"] for w in where), skipped[0]["reason"]
    assert list(verify_shards(out)) == []
    kept = read_samples(out, "val")["000000000001"]
    assert np.array_equal(kept["label"], clean["label"]) and kept["image"] == clean["image"]

    with pytest.raises(UserError) as exc:
        prepare_coco_lvis(coco, [lj], [sj], tmp_path / "fail", opts=FAIL)
    assert "\n" not in str(exc.value) and all(w in str(exc.value) for w in where)

    res = cli("coco-lvis", "--coco-root", coco, "--lvis-json", lj, "--stuff-json", sj,
              "--out", tmp_path / "cli_fail", "--workers", 0)
    assert_one_line_error(res, *where)
    res = cli("coco-lvis", "--coco-root", coco, "--lvis-json", lj, "--stuff-json", sj,
              "--out", tmp_path / "cli_skip", "--workers", 0, "--on-error", "skip")
    assert res.exit_code == 0, res.output
    assert "1 skipped" in " ".join(res.output.split())


@pytest.mark.parametrize("height", [0, "16", 16.5, 70000, -3])
def test_coco_lvis_bad_image_size(tmp_path: Path, height: object) -> None:
    coco, lvis, stuff = lvis_tree(tmp_path)
    lvis["images"][1]["height"] = height
    lj, sj = write_docs(tmp_path, lvis, stuff)
    index = prepare_coco_lvis(coco, [lj], [sj], tmp_path / "out", opts=SKIP)
    assert index["splits"]["val"]["num_skipped"] == 1
    reason = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())["reason"]
    assert "lvis_v1_val.json: image 2 (val2017/000000000002.jpg): image " in reason
    assert "height/width" in reason or "image size 18x" in reason


def test_segfault_case_in_subprocess(tmp_path: Path) -> None:
    """1e30 coordinates crashed pycocotools (SIGSEGV); now one line and exit 2, or a skip."""
    coco, lj, sj = broken(tmp_path, "huge coordinate")
    base = [sys.executable, "-m", "rankseg_cli", "prepare", "coco-lvis", "--coco-root", str(coco),
            "--lvis-json", str(lj), "--stuff-json", str(sj), "--workers", "0"]
    res = subprocess.run(base + ["--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    text = res.stdout + res.stderr
    assert "Traceback" not in text and "annotation 7" in text and "outside" in text
    res = subprocess.run(base + ["--out", str(tmp_path / "b"), "--on-error", "skip"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert list(verify_shards(tmp_path / "b")) == []


# --------------------------------------------------------------------------- YouTube-VIS

YTVIS_CASES = {
    "huge coordinate": [[0, 0, 1e30, 0, 1e30, 1e30]],
    "nan coordinate": [[0, 0, float("nan"), 0, 5, 5]],
    "odd polygon": [[0, 0, 5, 0, 5]],
    "counts bad sum": {"size": [H, W], "counts": [3, 5]},
    "negative counts": {"size": [H, W], "counts": [-1, H * W + 1]},
    "huge count": {"size": [H, W], "counts": [1 << 40]},
    "garbage string": {"size": [H, W], "counts": "zz~"},
    "short string": {"size": [H, W], "counts": "1"},
    "size mismatch": {"size": [H + 1, W], "counts": [(H + 1) * W]},
    "size not a pair": {"size": [H], "counts": [H * W]},
    "wrong type": "segmentation",
}


def ytvis_tree(root: Path, seg: object = None) -> tuple[dict, Path]:
    """One video of 3 frames (H x W), two tracks; `seg` replaces track 2's frame 1."""
    m = np.zeros((H, W), bool)
    m[2:9, 3:12] = True
    track2 = [rle_uncompressed(m), rle_uncompressed(~m), rle_uncompressed(m)]
    if seg is not None:
        track2[1] = seg
    doc = {"videos": [{"id": 3, "height": H, "width": W, "length": 3,
                       "file_names": ["v/00000.jpg", "v/00005.jpg", "v/00010.jpg"]}],
           "annotations": [{"id": 1, "video_id": 3, "category_id": 6, "iscrowd": 0,
                            "segmentations": [[rect(0, 0, 6, 6)], None, [rect(1, 1, 5, 9)]]},
                           {"id": 2, "video_id": 3, "category_id": 8, "iscrowd": 0, "segmentations": track2}]}
    ytvis_frames(root, "train", doc)
    return doc, write_json(root / "train.json", doc)


@pytest.mark.parametrize("case", list(YTVIS_CASES))
def test_youtube_vis_case_skips_only_its_frame(tmp_path: Path, case: str) -> None:
    clean_root, bad_root = tmp_path / "clean", tmp_path / "bad"
    ytvis_tree(clean_root)
    prepare_youtube_vis(clean_root, tmp_path / "clean_out", opts=FAIL)
    clean = read_samples(tmp_path / "clean_out", "train")
    ytvis_tree(bad_root, YTVIS_CASES[case])
    where = ["train.json: video 3 (v), frame 1, annotation 2"]

    out = tmp_path / "skip"
    index = prepare_youtube_vis(bad_root, out, opts=SKIP)
    assert index["splits"]["train"]["num_skipped"] == 1
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert [s["key"] for s in skipped] == ["v/00005"] and where[0] in skipped[0]["reason"]
    got = read_samples(out, "train")
    assert sorted(got) == ["v/00000", "v/00010"]
    for k, s in got.items():
        assert np.array_equal(s["label"], clean[k]["label"]) and s["instances"] == clean[k]["instances"]
    with pytest.raises(UserError, match="frame 1, annotation 2"):
        prepare_youtube_vis(bad_root, tmp_path / "fail", opts=FAIL)
    assert_one_line_error(cli("youtube-vis", "--root", bad_root, "--out", tmp_path / "cli", "--workers", 0), *where)


def test_youtube_vis_bad_video_size_fails_its_frames(tmp_path: Path) -> None:
    doc, path = ytvis_tree(tmp_path)
    doc["videos"][0]["width"] = 0
    write_json(path, doc)
    index = prepare_youtube_vis(tmp_path, tmp_path / "out", opts=SKIP)
    assert index["splits"]["train"]["num_skipped"] == 3
    res = cli("youtube-vis", "--root", tmp_path, "--out", tmp_path / "cli", "--workers", 0)
    assert_one_line_error(res, "train.json: video 3 (v): image size 0x16 (W x H)")


def test_files_that_are_not_annotation_json(tmp_path: Path) -> None:
    """Whole-file problems stop the run with one line naming the file (no per-sample skip)."""
    coco, lvis, stuff = lvis_tree(tmp_path)
    lj, sj = write_docs(tmp_path, lvis, stuff)
    text = lj.read_text()
    bad_lvis = {
        "[1, 2]": "not an LVIS annotation file",
        json.dumps(dict(lvis, images=[])): "not an LVIS annotation file",
        # strict JSON: NaN / Infinity tokens and numbers beyond a double are not JSON
        text.replace("[[4, 4, 14, 4", "[[NaN, 4, 14, 4"): "is not valid JSON (lexical error",
        text.replace("[[4, 4, 14, 4", "[[1e400, 4, 14, 4"): "is not valid JSON",
        text[:-40]: "is not valid JSON",
    }
    for i, (doc, message) in enumerate(bad_lvis.items()):
        bad = tmp_path / f"b{i}" / "lvis_v1_val.json"
        bad.parent.mkdir()
        bad.write_text(doc)
        assert_one_line_error(cli("coco-lvis", "--coco-root", coco, "--lvis-json", bad, "--stuff-json", sj,
                                  "--out", tmp_path / f"o{i}"), str(bad), message)
    (tmp_path / "s" / "stuff_val2017.json").parent.mkdir()
    (tmp_path / "s" / "stuff_val2017.json").write_text("{}")
    assert_one_line_error(cli("coco-lvis", "--coco-root", coco, "--lvis-json", lj, "--stuff-json",
                              tmp_path / "s" / "stuff_val2017.json", "--out", tmp_path / "os"),
                          "stuff_val2017.json: not a COCO annotation file")
