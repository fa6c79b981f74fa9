"""COCO panoptic (real val2017 fixture files + generated trees) and ADE20K panoptic (generated
trees vs. an independent re-implementation of MaskFormer's prepare_ade20k_pan_seg.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import assert_one_line_error
from panoptic_trees import (
    ade_panoptic_tree,
    ade_things,
    bbox,
    coco_categories,
    coco_tree,
    coco_tree_from_fixtures,
    read_png_ids,
    write_ade_instance,
)
from PIL import Image
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.ade20k_panoptic import prepare_ade20k_panoptic
from rankseg_core.convert.coco_panoptic import prepare_coco_panoptic
from rankseg_core.convert.coco_panoptic_format import categories_of, image_id_of, write_coco_panoptic
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.errors import UserError
from rankseg_core.evaluation.panoptic_quality import PanopticQuality, gt_from_shard
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.verify import verify_shards

runner = CliRunner()


def read_panoptic(out: Path) -> dict[str, dict]:
    """key -> label, segment index map, records, image bytes; read with h5py + PIL only."""
    index = json.loads((out / "dataset.json").read_text())
    samples = {}
    for split, meta in index["splits"].items():
        for sh in meta["shards"]:
            with h5py.File(out / sh["file"], "r") as f:
                assert f.attrs["version"] == 2
                offs, cls = f["class_offsets"][:], f["classes"][:]
                for i, key in enumerate(f["key"].asstr()[:]):
                    def png(name):
                        return (np.asarray(Image.open(io.BytesIO(f[name][i].tobytes()))).astype(np.int64))
                    samples[key] = {"split": split, "label": png("label"), "segments": png("segments"),
                                    "info": json.loads(f["segments_info"].asstr()[i]),
                                    "image": f["image"][i].tobytes(),
                                    "classes": cls[offs[i]:offs[i + 1]].tolist()}
    return samples


def skipped_reasons(out: Path) -> dict[str, str]:
    path = out / "skipped.jsonl"
    if not path.exists():
        return {}
    return {json.loads(x)["key"]: json.loads(x)["reason"] for x in path.read_text().splitlines()}


def train_id_of() -> dict[int, int]:
    """COCO category id -> position in the official category list."""
    return {c["id"]: i for i, c in enumerate(coco_categories())}


# --- class tables ----------------------------------------------------------------------------

def test_class_tables(shared_fixtures: Path) -> None:
    cats = coco_categories()
    official = json.loads((shared_fixtures / "coco_panoptic_sample" / "annotations" /
                           "panoptic_coco_categories.json").read_text())
    assert [(c["id"], c["name"], c["isthing"]) for c in cats] == \
        [(c["id"], c["name"], c["isthing"]) for c in official]
    assert len(cats) == 133 and sum(c["isthing"] for c in cats) == 80
    assert [c["train_id"] for c in cats] == list(range(133))


def test_ade_thing_table() -> None:
    things = ade_things()
    assert sorted(things) == list(range(1, 101)) and len(set(things.values())) == 100
    # spot checks against Mask2Former's ade20k_instance_catid_mapping.txt
    assert (things[1], things[4], things[9], things[59], things[100]) == (8, 13, 21, 91, 150)
    stuff = set(range(1, 151)) - set(things.values())
    assert {1, 2, 3, 4, 5, 6, 7, 10} <= stuff and len(stuff) == 50  # wall, building, sky, floor, ...


# --- COCO panoptic: the real val2017 files ------------------------------------------------------

@pytest.mark.parametrize("under_annotations", [False, True])
def test_coco_real_fixtures(tmp_path: Path, shared_fixtures: Path, under_annotations: bool) -> None:
    root = tmp_path / "coco"
    doc = coco_tree_from_fixtures(root, shared_fixtures, png_under_annotations=under_annotations)
    index = prepare_coco_panoptic(root, tmp_path / "out", split="val")
    assert index["version"] == 2 and index["panoptic"] is True and index["num_classes"] == 133
    to_train = train_id_of()
    cats = coco_categories()
    assert index["thing_classes"] == [to_train[c["id"]] for c in cats if c["isthing"]] == list(range(80))
    assert index["options"]["category_ids"] == [c["id"] for c in cats]
    stored = read_panoptic(tmp_path / "out")
    assert sorted(stored) == ["000000142238", "000000439180"]
    crowd = 0
    for ann in doc["annotations"]:
        key = Path(ann["file_name"]).stem
        s = stored[key]
        ids = read_png_ids(root / ("annotations" if under_annotations else "") / "panoptic_val2017" / ann["file_name"])
        assert s["image"] == (root / "val2017" / f"{key}.jpg").read_bytes()
        assert len(s["info"]) == len(ann["segments_info"])
        want_label = np.full(ids.shape, IGNORE)
        for i, (rec, src) in enumerate(zip(s["info"], ann["segments_info"]), 1):
            mask = ids == src["id"]
            # the official JSON's own area and bbox, against the stored map
            assert (s["segments"] == i).sum() == src["area"] == rec["area"]
            assert np.array_equal(s["segments"] == i, mask)
            assert bbox(s["segments"] == i) == src["bbox"]
            assert rec == {"id": src["id"], "category": to_train[src["category_id"]],
                           "iscrowd": src["iscrowd"], "area": src["area"]}
            want_label[mask] = to_train[src["category_id"]]
            crowd += src["iscrowd"]
        assert np.array_equal(s["segments"] == 0, ids == 0)  # unlabelled pixels stay void
        assert np.array_equal(s["label"], want_label)  # crowd pixels keep their category
        assert s["classes"] == sorted({to_train[x["category_id"]] for x in ann["segments_info"]})
    assert crowd == 3  # the fixture has crowd segments (people, and class 19 in 439180)
    assert list(verify_shards(tmp_path / "out", decode_images=True)) == []


def test_coco_export_round_trip_and_perfect_pq(tmp_path: Path, shared_fixtures: Path) -> None:
    """Shards -> COCO panoptic export reproduces the official PNGs and segments_info."""
    from rankseg_core.shards.read import ShardDataset

    root = tmp_path / "coco"
    doc = coco_tree_from_fixtures(root, shared_fixtures)
    index = prepare_coco_panoptic(root, tmp_path / "out", split="val")
    ds = ShardDataset(tmp_path / "out", "val")
    categories = categories_of(index)
    pq = PanopticQuality(index["num_classes"], index["thing_classes"])
    exported = []
    for i in range(len(ds)):
        item = ds.load(i)
        seg, info = item["segments"].astype(np.int64), item["segments_info"]
        ids = np.zeros(seg.shape, np.int64)  # back to the dataset's own segment ids
        for j, r in enumerate(info, 1):
            ids[seg == j] = r["id"]
        exported.append((image_id_of(item["key"]), f"{item['key']}.png", ids, info))
        pq.update(*gt_from_shard(seg, info), *gt_from_shard(seg, info))
    path = write_coco_panoptic(tmp_path / "export", exported, categories, name="gt")
    back = json.loads(path.read_text())
    assert {c["id"] for c in back["categories"]} == {c["id"] for c in doc["categories"]}
    src = {a["image_id"]: a for a in doc["annotations"]}
    for ann in back["annotations"]:
        orig = src[ann["image_id"]]
        assert np.array_equal(read_png_ids(tmp_path / "export" / "gt" / ann["file_name"]),
                              read_png_ids(root / "panoptic_val2017" / orig["file_name"]))
        isthing = {c["id"]: c["isthing"] for c in doc["categories"]}
        assert ann["segments_info"] == [dict(s, isthing=isthing[s["category_id"]]) for s in orig["segments_info"]]
    r = pq.compute()
    assert r["all"]["pq"] == r["all"]["sq"] == r["all"]["rq"] == 1.0
    assert r["all"]["n"] == len({s["category_id"] for a in doc["annotations"] for s in a["segments_info"]
                                 if not s["iscrowd"]})


# --- COCO panoptic: generated trees and their pitfalls ------------------------------------------

def test_coco_generated_both_splits(tmp_path: Path) -> None:
    tree = coco_tree(tmp_path / "coco")
    index = prepare_coco_panoptic(tmp_path / "coco", tmp_path / "out", opts=ConvertOptions(samples_per_shard=2))
    assert list(index["splits"]) == ["train", "val"] and index["splits"]["train"]["num_samples"] == 3
    stored = read_panoptic(tmp_path / "out")
    to_train = train_id_of()
    for key, img in tree.images.items():
        s = stored[key]
        assert s["split"] == img.split
        for i, src in enumerate(img.segments, 1):
            assert np.array_equal(s["segments"] == i, img.ids == src["id"])
            assert s["info"][i - 1]["category"] == to_train[src["category_id"]]
    assert list(verify_shards(tmp_path / "out")) == []


def _break(tree, how: str) -> str:
    """Damage one val image of a generated tree in one way; returns its key."""
    key = sorted(k for k, v in tree.images.items() if v.split == "val")[0]
    img = tree.images[key]
    ann = next(a for a in tree.docs["val"]["annotations"] if a["file_name"] == f"{key}.png")
    if how == "missing png":
        img.png_path.unlink()
    elif how == "png size":
        Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(img.png_path)
    elif how == "grey png":
        Image.fromarray(np.zeros(img.ids.shape, np.uint8)).save(img.png_path)
    elif how == "stray id":
        ann["segments_info"] = ann["segments_info"][1:]
    elif how == "empty record":
        ann["segments_info"].append({"id": 77, "category_id": 1, "iscrowd": 0, "area": 5, "bbox": [0, 0, 1, 1]})
    elif how == "unknown category":
        ann["segments_info"][0]["category_id"] = 12  # not a COCO panoptic category
    elif how == "area":
        ann["segments_info"][0]["area"] += 1
    elif how == "bad record":
        ann["segments_info"][0] = {"id": "x"}
    elif how == "image size":
        next(i for i in tree.docs["val"]["images"] if i["file_name"] == f"{key}.jpg")["height"] += 1
    tree.save()
    return key


@pytest.mark.parametrize("how, fragment", [
    ("missing png", "panoptic PNG is missing"), ("png size", "7x5"), ("grey png", "8-bit RGB"),
    ("stray id", "have no record"), ("empty record", "segment 77 has a record but no pixel"),
    ("unknown category", "category_id 12"), ("area", "in the JSON but"),
    ("bad record", "needs integer id"), ("image size", "the JSON says"),
])
def test_coco_bad_samples(tmp_path: Path, how: str, fragment: str) -> None:
    tree = coco_tree(tmp_path / "coco", n_train=1, n_val=2)
    key = _break(tree, how)
    with pytest.raises(UserError) as exc:  # --on-error fail: the run stops, naming the file
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "out")
    assert fragment in str(exc.value) and "\n" not in str(exc.value)
    index = prepare_coco_panoptic(tmp_path / "coco", tmp_path / "out2", opts=ConvertOptions(on_error="skip"))
    assert index["splits"]["val"]["num_samples"] == 1 and index["splits"]["val"]["num_skipped"] == 1
    reason = skipped_reasons(tmp_path / "out2")[key]
    assert fragment in reason and key in reason
    assert list(verify_shards(tmp_path / "out2")) == []


def test_coco_bad_json_and_layout(tmp_path: Path) -> None:
    tree = coco_tree(tmp_path / "coco", n_train=1, n_val=1)
    val_json = tmp_path / "coco" / "annotations" / "panoptic_val2017.json"
    with pytest.raises(UserError, match="no such directory"):
        prepare_coco_panoptic(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(UserError, match="--split must be"):
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o", split="test")
    val_json.write_text('{"images": [')
    with pytest.raises(UserError, match="is not valid JSON"):
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o")
    # the train split alone still converts
    assert prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o", split="train")["splits"]["train"]["num_samples"] == 1
    doc = tree.docs["val"]
    doc["categories"] = doc["categories"][:10]
    tree.save()
    with pytest.raises(UserError, match="not the 133 COCO panoptic"):
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o2")
    doc["categories"] = None
    doc["annotations"][0]["image_id"] = 99
    tree.save()
    with pytest.raises(UserError, match="refers to image 99"):
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o2")
    val_json.unlink()
    with pytest.raises(UserError, match=r"panoptic_val2017.json: no such file.*--split train"):
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o2")
    import shutil

    shutil.rmtree(tmp_path / "coco" / "panoptic_train2017")
    with pytest.raises(UserError, match="no panoptic_train2017/ folder"):
        prepare_coco_panoptic(tmp_path / "coco", tmp_path / "o2", split="train")


# --- ADE20K panoptic ------------------------------------------------------------------------------

def reference_ade_panoptic(semantic: np.ndarray, instance: np.ndarray, things: dict[int, int]):
    """MaskFormer's prepare_ade20k_pan_seg.py algorithm, re-written: (segment id map, records).

    Stuff first (one segment per stuff class of the semantic PNG, ascending), then every
    instance number of the G channel (ascending), its class from the R channel; later
    segments overwrite earlier ones. Records: (id, ADE20K-150 train id).
    """
    pan = np.zeros(semantic.shape, np.int64)
    records = []
    thing_values = set(things.values())
    for v in sorted(set(np.unique(semantic).tolist()) - {0}):
        if v in thing_values:
            continue
        records.append((len(records) + 1, v - 1))
        pan[semantic == v] = len(records)
    for num in sorted(set(np.unique(instance[..., 1]).tolist()) - {0}):
        mask = instance[..., 1] == num
        cats = np.unique(instance[..., 0][mask])
        assert len(cats) == 1
        records.append((len(records) + 1, things[int(cats[0])] - 1))
        pan[mask] = len(records)
    return pan, records


def test_ade_panoptic(tmp_path: Path) -> None:
    tree = ade_panoptic_tree(tmp_path / "ADEChallengeData2016")
    index = prepare_ade20k_panoptic(tmp_path / "ADEChallengeData2016", tmp_path / "out",
                                    ConvertOptions(samples_per_shard=3))
    things = ade_things()
    assert index["name"] == "ade20k-panoptic" and index["num_classes"] == 150
    assert index["thing_classes"] == sorted(v - 1 for v in things.values())
    assert len(index["thing_classes"]) == 100 and index["options"]["category_ids"] == list(range(150))
    assert list(index["splits"]) == ["training", "validation"]
    stored = read_panoptic(tmp_path / "out")
    empty = overlapped = 0
    for key, img in tree.items():
        pan, records = reference_ade_panoptic(img.semantic, img.instance, things)
        s = stored[key]
        # Every record of the official JSON is kept, even a stuff one fully covered by instances
        # (panopticapi counts it: docs/panoptic.md).
        empty += sum(not (pan == sid).any() for sid, _ in records)
        assert [r["category"] for r in s["info"]] == [cat for _, cat in records]
        for i, (sid, cat) in enumerate(records, 1):
            assert np.array_equal(s["segments"] == i, pan == sid), key
            assert s["info"][i - 1]["area"] == int((pan == sid).sum()) and s["info"][i - 1]["iscrowd"] == 0
        assert np.array_equal(s["segments"] == 0, pan == 0)
        cats = np.array([IGNORE] + [cat for _, cat in records])
        assert np.array_equal(s["label"], cats[pan])
        # the two annotations overlap: instances override the semantic class somewhere
        overlapped += int(((img.instance[..., 1] > 0) & (img.semantic > 0)).sum())
        assert s["image"] == img.paths["image"].read_bytes()
    assert empty >= 1 and overlapped > 0
    assert list(verify_shards(tmp_path / "out", decode_images=True)) == []


@pytest.mark.parametrize("how, fragment", [
    ("two categories", "several categories"), ("unknown category", "R=101"),
    ("semantic value", "not ADE20K-150 classes"), ("missing instance", "instance annotation is missing"),
    ("instance size", "mask is 9x8"), ("grey instance", "8-bit RGB instance PNG"),
])
def test_ade_panoptic_bad_samples(tmp_path: Path, how: str, fragment: str) -> None:
    root = tmp_path / "ADEChallengeData2016"
    tree = ade_panoptic_tree(root, n_train=2, n_val=1)
    img = tree[sorted(tree)[0]]
    inst = img.instance.copy()
    if how == "two categories":
        num = int(inst[..., 1].max())
        ys, xs = np.nonzero(inst[..., 1] == num)
        inst[ys[0], xs[0], 0] = (inst[ys[0], xs[0], 0] % 100) + 1
        write_ade_instance(img.paths["instance"], inst)
    elif how == "unknown category":
        inst[inst[..., 1] > 0, 0] = 101
        write_ade_instance(img.paths["instance"], inst)
    elif how == "semantic value":
        sem = img.semantic.copy()
        sem[0, 0] = 151
        Image.fromarray(sem).save(img.paths["semantic"])
    elif how == "missing instance":
        img.paths["instance"].unlink()
    elif how == "instance size":
        write_ade_instance(img.paths["instance"], np.zeros((8, 9, 3), np.uint8))
    elif how == "grey instance":
        Image.fromarray(img.semantic).save(img.paths["instance"])
    index = prepare_ade20k_panoptic(root, tmp_path / "out", ConvertOptions(on_error="skip"))
    assert index["splits"]["training"]["num_skipped"] == 1 and index["splits"]["training"]["num_samples"] == 1
    reason = skipped_reasons(tmp_path / "out")[img.key]
    assert fragment in reason and img.key in reason and "\n" not in reason


def test_ade_panoptic_layout(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    with pytest.raises(UserError, match="no such directory"):
        prepare_ade20k_panoptic(root, tmp_path / "o")
    ade_panoptic_tree(root, n_train=1, n_val=1)
    import shutil

    shutil.rmtree(root / "annotations_instance" / "validation")
    with pytest.raises(UserError, match=r"annotations_instance/validation: no such directory.*annotations_instance.tar"):
        prepare_ade20k_panoptic(root, tmp_path / "o")


# --- CLI ------------------------------------------------------------------------------------------

def test_cli(tmp_path: Path) -> None:
    coco_tree(tmp_path / "coco", n_train=1, n_val=1)
    ade_panoptic_tree(tmp_path / "ade", n_train=1, n_val=1)
    for cmd, root, k in (("coco-panoptic", "coco", 133), ("ade20k-panoptic", "ade", 150)):
        out = tmp_path / f"out-{cmd}"
        res = runner.invoke(app, ["prepare", cmd, "--root", str(tmp_path / root), "--out", str(out), "--workers", "0"])
        assert res.exit_code == 0, res.output
        assert f"K={k}" in res.output
        assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
        help_text = runner.invoke(app, ["prepare", cmd, "--help"]).output
        assert "Example" in help_text and "Layout" in help_text
        res = runner.invoke(app, ["prepare", cmd, "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
        assert_one_line_error(res, "nope", "no such directory")
    (tmp_path / "coco" / "annotations" / "panoptic_val2017.json").write_text("{not json")
    res = runner.invoke(app, ["prepare", "coco-panoptic", "--root", str(tmp_path / "coco"), "--out",
                              str(tmp_path / "o3"), "--workers", "0"])
    assert_one_line_error(res, "panoptic_val2017.json", "not valid JSON")
    res = runner.invoke(app, ["prepare", "coco-panoptic", "--root", str(tmp_path / "coco"), "--out",
                              str(tmp_path / "o3"), "--split", "bogus"])
    assert_one_line_error(res, "--split must be train, val or all")
