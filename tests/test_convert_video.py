"""YouTube-VIS 2019 and VSPW converters: real annotation excerpts and generated trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner
from video_lvis_trees import read_samples, rect, rle_uncompressed, vspw_tree, write_json, write_mask, ytvis_frames

from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.vspw import prepare_vspw
from rankseg_core.convert.youtube_vis import prepare_youtube_vis
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.verify import verify_shards
from rankseg_core.utils.resources import load_json as load_dataset_json

OPTS = ConvertOptions(workers=0)


def cli(*args: object):
    from rankseg_cli import prepare_video_lvis  # noqa: F401  (registers the commands)
    from rankseg_cli.app import app

    return CliRunner().invoke(app, ["prepare", *map(str, args)])


def decode(inst: dict) -> np.ndarray:
    return mask_utils.decode(inst["rle"]).astype(bool)


# --------------------------------------------------------------------------- YouTube-VIS, real excerpt


@pytest.fixture
def ytvis_real(tmp_path: Path, shared_fixtures: Path) -> tuple[Path, dict]:
    """The real train.json excerpt (video 0043f083b5, 20 frames of 720x1280) with generated frames."""
    src = shared_fixtures / "youtube_vis_2019" / "annotations_tfds_excerpt" / "train.json"
    doc = json.loads(src.read_text())
    root = tmp_path / "ytvis_2019"
    (root / "train.json").parent.mkdir(parents=True)
    (root / "train.json").write_bytes(src.read_bytes())
    ytvis_frames(root, "train", doc)
    return root, doc


def test_ytvis_real_excerpt(tmp_path: Path, ytvis_real: tuple[Path, dict]) -> None:
    root, doc = ytvis_real
    out = tmp_path / "out"
    index = prepare_youtube_vis(root, out, splits=["train"], opts=OPTS)
    assert list(verify_shards(out)) == []
    assert index["name"] == "youtube_vis_2019" and index["num_classes"] == 40
    sedan = index["class_names"].index("sedan")
    assert sedan == 5  # category id 6
    assert index["splits"]["train"]["videos"] == {"0043f083b5": {"frames": 20, "classes": [sedan]}}
    samples = read_samples(out, "train")
    names = doc["videos"][0]["file_names"]
    assert sorted(samples) == sorted(f"0043f083b5/{Path(n).stem}" for n in names)
    tracks = {a["id"]: a for a in doc["annotations"]}
    checked = 0
    for t, name in enumerate(names):
        s = samples[f"0043f083b5/{Path(name).stem}"]
        assert s["video"] == "0043f083b5" and s["frame"] == t
        insts = json.loads(s["instances"])
        present = [a["id"] for a in doc["annotations"] if a["segmentations"][t] is not None]
        assert [i["track_id"] for i in insts] == present  # null frames give no instance
        union = np.zeros((720, 1280), bool)
        for inst in insts:
            m = decode(inst)
            a = tracks[inst["track_id"]]
            # the JSON's own area and bbox (x, y, w, h) of this frame
            assert int(m.sum()) == a["areas"][t]
            ys, xs = np.nonzero(m)
            bbox = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert [float(v) for v in bbox] == a["bboxes"][t]
            assert inst["category"] == sedan and inst["rle"]["size"] == [720, 1280]
            union |= m
            checked += 1
        assert s["classes"] == ([sedan] if present else [])
        assert np.array_equal(s["label"] == sedan, union)
        assert ((s["label"] == IGNORE) == ~union).all()
    assert checked == sum(a is not None for tr in tracks.values() for a in tr["segmentations"])


def test_ytvis_missing_frames(tmp_path: Path, ytvis_real: tuple[Path, dict]) -> None:
    root, doc = ytvis_real
    gone = root / "train" / "JPEGImages" / "0043f083b5" / "00045.jpg"
    gone.unlink()
    with pytest.raises(UserError, match=r"0043f083b5/00045\.jpg: frame is missing"):
        prepare_youtube_vis(root, tmp_path / "o1", opts=OPTS)
    index = prepare_youtube_vis(root, tmp_path / "o2", opts=ConvertOptions(workers=0, on_error="skip"))
    assert index["splits"]["train"]["num_samples"] == 19 and index["splits"]["train"]["num_skipped"] == 1
    res = cli("youtube-vis", "--root", root, "--out", tmp_path / "o3", "--workers", 0)
    assert_one_line_error(res, "00045.jpg", "frame is missing")


def test_ytvis_valid_excerpt_has_no_annotations(tmp_path: Path, shared_fixtures: Path) -> None:
    src = shared_fixtures / "youtube_vis_2019" / "annotations_tfds_excerpt" / "valid.json"
    doc = json.loads(src.read_text())
    root = tmp_path / "ytvis_2019"
    write_json(root / "valid.json", doc)
    ytvis_frames(root, "valid", doc)
    out = tmp_path / "out"
    index = prepare_youtube_vis(root, out, splits=["valid"], opts=ConvertOptions(workers=0, limit=4))
    assert list(verify_shards(out)) == []
    for s in read_samples(out, "valid").values():
        assert s["classes"] == [] and (s["label"] == IGNORE).all() and s["instances"] == "[]"
    assert index["splits"]["valid"]["videos"]["00f88c4f0a"]["classes"] == []


# --------------------------------------------------------------------------- YouTube-VIS, generated


def ytvis_generated(root: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """Video 'vid1' (2 frames 30x40): track 1 (dog, polygon), track 2 (cat, uncompressed RLE)
    overlapping it, track 3 (person, only in frame 1)."""
    h, w = 30, 40
    poly = [rect(5, 5, 25, 20)]
    m1 = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, h, w))).astype(bool)
    m2 = np.zeros((h, w), bool)
    m2[10:28, 15:35] = True
    m3 = np.zeros((h, w), bool)
    m3[0:4, 30:40] = True
    doc = {"videos": [{"id": 7, "height": h, "width": w, "length": 2,
                       "file_names": ["vid1/00000.jpg", "vid1/00005.jpg"]}],
           "categories": [{"id": c["id"], "name": c["name"]}
                          for c in load_dataset_json("youtube_vis_2019/classes.json")["classes"]],
           "annotations": [
               {"id": 1, "video_id": 7, "category_id": 8, "iscrowd": 0, "segmentations": [poly, poly]},
               {"id": 2, "video_id": 7, "category_id": 14, "iscrowd": 0,
                "segmentations": [rle_uncompressed(m2), rle_uncompressed(m2)]},
               {"id": 3, "video_id": 7, "category_id": 1, "iscrowd": 0,
                "segmentations": [None, rle_uncompressed(m3)]}]}
    write_json(root / "train.json", doc)
    ytvis_frames(root, "train", doc)
    return doc, m1, m2, m3


def test_ytvis_polygons_overlap_first_track_wins(tmp_path: Path) -> None:
    root = tmp_path / "yt"
    doc, m1, m2, m3 = ytvis_generated(root)
    out = tmp_path / "out"
    index = prepare_youtube_vis(root, out, opts=OPTS)
    assert list(verify_shards(out)) == []
    s = read_samples(out, "train")
    f0, f1 = s["vid1/00000"], s["vid1/00005"]
    dog, cat, person = 7, 13, 0
    expect = np.full(m1.shape, IGNORE)
    expect[m2] = cat
    expect[m1] = dog  # track 1 comes first in the JSON: it wins the overlap
    assert (m1 & m2).any() and np.array_equal(f0["label"], expect)
    expect[m3] = np.where(m1 | m2, expect, person)[m3]
    assert np.array_equal(f1["label"], expect)
    assert f0["classes"] == [dog, cat] and f1["classes"] == [person, dog, cat]
    insts = json.loads(f1["instances"])
    assert [(i["track_id"], i["category"]) for i in insts] == [(1, dog), (2, cat), (3, person)]
    assert np.array_equal(decode(insts[1]), m2)  # the covered part of track 2 is kept
    assert index["splits"]["train"]["videos"]["vid1"] == {"frames": 2, "classes": [person, dog, cat]}


def test_ytvis_bad_inputs(tmp_path: Path) -> None:
    root = tmp_path / "yt"
    doc, *_ = ytvis_generated(root)
    doc["annotations"][2]["category_id"] = 41
    bad = write_json(tmp_path / "bad.json", doc)
    with pytest.raises(UserError, match=r"bad\.json: annotation 3 has unknown category id 41"):
        prepare_youtube_vis(root, tmp_path / "o1", json_path=bad, opts=OPTS)
    assert_one_line_error(cli("youtube-vis", "--root", root, "--json", bad, "--out", tmp_path / "o2"),
                          "unknown category id 41")
    (tmp_path / "broken.json").write_text("[1, 2")
    assert_one_line_error(cli("youtube-vis", "--root", root, "--json", tmp_path / "broken.json",
                              "--out", tmp_path / "o3"), "broken.json is not valid JSON")
    assert_one_line_error(cli("youtube-vis", "--root", tmp_path / "nowhere", "--out", tmp_path / "o4"),
                          "nowhere: no such directory")
    assert_one_line_error(cli("youtube-vis", "--root", root, "--split", "valid", "--out", tmp_path / "o5"),
                          "valid.json: no such YouTube-VIS JSON file")
    assert "Example" in cli("youtube-vis", "--help").output
    res = cli("youtube-vis", "--root", root, "--out", tmp_path / "ok", "--workers", 0)
    assert res.exit_code == 0, res.output
    assert "train: 2 samples" in res.output


# --------------------------------------------------------------------------- VSPW


def test_vspw_generated_tree(tmp_path: Path) -> None:
    root = tmp_path / "VSPW_480p"
    layout = vspw_tree(root)
    out = tmp_path / "out"
    # --on-error fail: the release's known gaps are still skipped, never fatal
    index = prepare_vspw(root, out, opts=OPTS)
    assert list(verify_shards(out)) == []
    assert index["num_classes"] == 124 and index["class_names"][0] == "wall"
    assert index["class_names"][123] == "train"
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    reasons = {s["key"]: s["reason"] for s in skipped}
    assert set(reasons) == {"vidA/00000003", "vidB/00000011", "vidC/00000002", "vidC/00000003"}
    assert "has no mask" in reasons["vidA/00000003"]
    assert "0-byte frame" in reasons["vidB/00000011"]
    assert "corrupt" in reasons["vidC/00000002"]
    assert "corrupt" in reasons["vidC/00000003"]
    assert index["splits"]["train"]["num_skipped"] == 4

    for split, videos in layout.items():
        samples = read_samples(out, split)
        for video, frames in videos.items():
            order = sorted(frames)
            union: set[int] = set()
            for stem, (values, kind) in frames.items():
                key = f"{video}/{stem}"
                if values is None or kind != "ok":
                    assert key not in samples
                    continue
                s = samples[key]
                # independent reading of the PNG with PIL
                with Image.open(root / "data" / video / "mask" / f"{stem}.png") as im:
                    raw = np.array(im)
                expect = np.where((raw == 0) | (raw == 255), IGNORE, raw.astype(np.int64) - 1)
                assert np.array_equal(s["label"], expect), key
                assert s["video"] == video and s["frame"] == order.index(stem)
                present = sorted(set(np.unique(raw).tolist()) - {0, 255})
                assert s["classes"] == [v - 1 for v in present]
                union |= {v - 1 for v in present}
                assert s["image"] == (root / "data" / video / "origin" / f"{stem}.jpg").read_bytes()
            vids = index["splits"][split]["videos"]
            if union or video in vids:
                assert vids[video]["classes"] == sorted(union), video
    assert index["splits"]["val"]["videos"]["vidD"]["frames"] == 2
    assert index["splits"]["train"]["videos"]["vidA"] == {"frames": 2, "classes": [0, 4, 6, 123]}


def test_vspw_unexpected_problems_follow_on_error(tmp_path: Path) -> None:
    root = tmp_path / "VSPW_480p"
    vspw_tree(root)
    bad = np.full((24, 32), 3, np.uint8)
    bad[5, 5] = 200
    write_mask(root / "data" / "vidA" / "mask" / "00000002.png", bad)
    with pytest.raises(UserError, match=r"vidA/mask/00000002\.png: value 200 .*--on-error skip"):
        prepare_vspw(root, tmp_path / "o1", splits=["train"], opts=OPTS)
    index = prepare_vspw(root, tmp_path / "o2", splits=["train"],
                         opts=ConvertOptions(workers=0, on_error="skip"))
    assert index["splits"]["train"]["num_skipped"] == 5
    small = np.zeros((10, 10), np.uint8)
    write_mask(root / "data" / "vidA" / "mask" / "00000002.png", small)
    res = cli("vspw", "--root", root, "--split", "train", "--out", tmp_path / "o3", "--workers", 0)
    assert_one_line_error(res, "mask is 10x10, its frame 24x32")


def test_vspw_cli(tmp_path: Path) -> None:
    root = tmp_path / "VSPW_480p"
    vspw_tree(root)
    res = cli("vspw", "--root", root, "--out", tmp_path / "out", "--workers", 2)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "train: 4 samples" in text and "4 skipped" in text and "val: 2 samples" in text
    assert list(verify_shards(tmp_path / "out")) == []
    assert_one_line_error(cli("vspw", "--root", tmp_path / "none", "--out", tmp_path / "o"),
                          "none: no such directory")
    (root / "val.txt").unlink()
    assert_one_line_error(cli("vspw", "--root", root, "--out", tmp_path / "o"), "val.txt is missing")
    assert_one_line_error(cli("vspw", "--root", root, "--split", "test", "--out", tmp_path / "o"),
                          "no test masks")
    assert cli("vspw", "--help").exit_code == 0 and "Example" in cli("vspw", "--help").output
