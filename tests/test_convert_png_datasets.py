"""ADE20K-150, COCO-Stuff-164k and PASCAL-Context converters on generated official-layout trees.

Expected train ids come from the datasets' published rules written out here (not from the
converter's LUTs): ADE150 value-1, COCO-Stuff contiguous ids after dropping 11 unused ids,
PASCAL-Context value-1 (59) or value (60).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from convert_trees import (
    COCO_STUFF_UNUSED,
    ade150_tree,
    coco_stuff_tree,
    decode_rgb,
    pascal_context_tree,
    random_image,
    read_shards,
    write_mask_png,
)
from PIL import Image
from typer.testing import CliRunner

import rankseg_cli.prepare_images  # noqa: F401  (registers the commands on `prepare`)
from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.png_datasets import prepare_ade20k, prepare_coco_stuff, prepare_pascal_context
from rankseg_core.convert.source_io import decode_jpeg
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, decode_image
from rankseg_core.shards.verify import verify_shards

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
runner = CliRunner()


def ade150_rule(v: int) -> int:
    return IGNORE if v == 0 else v - 1


def coco_stuff_rule(v: int) -> int:
    if v == 255:
        return IGNORE
    coco_id = v + 1
    assert coco_id not in COCO_STUFF_UNUSED
    return coco_id - 1 - sum(u < coco_id for u in COCO_STUFF_UNUSED)


def pascal59_rule(v: int) -> int:
    return IGNORE if v in (0, 255) else v - 1


def pascal60_rule(v: int) -> int:
    return IGNORE if v == 255 else v


def apply(rule, values: np.ndarray) -> np.ndarray:
    out = np.empty(values.shape, np.uint16)
    for v in np.unique(values):
        out[values == v] = rule(int(v))
    return out


def check_tree(out: Path, tree: dict, rule) -> None:
    stored = read_shards(out)
    assert sorted(stored) == sorted(tree)
    for key, sample in tree.items():
        want = apply(rule, sample.values)
        s = stored[key]
        assert np.array_equal(s["label"], want), key
        assert s["classes"] == sorted(set(np.unique(want).tolist()) - {IGNORE})
        assert s["image"] == sample.image_path.read_bytes()  # no resize: source bytes kept
        assert s["split"] == sample.split
        assert s["size"] == s["orig_size"] == sample.values.shape
    assert list(verify_shards(out, decode_images=True)) == []


# --- class tables -------------------------------------------------------------------------

def test_class_tables(shared_fixtures: Path) -> None:
    ade = json.loads((DATASETS / "ade20k" / "classes.json").read_text())
    names = [c["name"] for c in ade["classes"]]
    assert ade["source"] and len(names) == len(set(names)) == 150
    assert names[:4] == ["wall", "building", "sky", "floor"] and names[-1] == "flag"
    assert [c["id"] for c in ade["classes"]] == list(range(1, 151))

    pc = json.loads((DATASETS / "pascal_context" / "classes.json").read_text())
    n59 = [c["name"] for c in pc["classes"]]
    assert len(n59) == 59 and n59 == sorted(n59) and n59[0] == "aeroplane" and n59[-1] == "wood"
    assert [c["name"] for c in pc["classes_60"]] == ["background"] + n59

    cs = json.loads((DATASETS / "coco_stuff" / "classes.json").read_text())
    assert len(cs["classes"]) == 171 and tuple(cs["unused_ids"]) == COCO_STUFF_UNUSED
    labels = shared_fixtures / "coco_stuff" / "meta" / "labels.txt"
    if labels.exists():
        official = dict(line.split(": ", 1) for line in labels.read_text().splitlines())
        for c in cs["classes"]:
            assert official[str(c["id"])] == c["name"]
            assert c["train_id"] == coco_stuff_rule(c["id"] - 1)


# --- ADE20K-150 ---------------------------------------------------------------------------

def test_ade150(tmp_path: Path) -> None:
    tree = ade150_tree(tmp_path / "root")
    index = prepare_ade20k(tmp_path / "root", tmp_path / "out", ConvertOptions(samples_per_shard=3))
    assert index["num_classes"] == 150 and index["name"] == "ade20k-150"
    assert index["splits"]["training"]["num_samples"] == 4 and len(index["splits"]["training"]["shards"]) == 2
    check_tree(tmp_path / "out", tree, ade150_rule)


def test_ade150_value_outside_domain(tmp_path: Path) -> None:
    tree = ade150_tree(tmp_path / "root", n_train=2, n_val=1)
    bad = tree[sorted(tree)[0]]
    values = bad.values.copy()
    values[3:5, 3:5] = 200
    write_mask_png(bad.mask_path, values)
    with pytest.raises(UserError) as exc:
        prepare_ade20k(tmp_path / "root", tmp_path / "out")
    msg = str(exc.value)
    assert str(bad.mask_path) in msg and "200" in msg and "\n" not in msg
    index = prepare_ade20k(tmp_path / "root", tmp_path / "out2", ConvertOptions(on_error="skip"))
    assert index["splits"]["training"]["num_skipped"] == 1
    assert list(verify_shards(tmp_path / "out2")) == []


def test_ade150_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such directory"):
        prepare_ade20k(tmp_path / "missing", tmp_path / "out")
    ade150_tree(tmp_path / "root", n_train=1, n_val=1)
    for p in (tmp_path / "root" / "annotations" / "validation").iterdir():
        p.unlink()
    (tmp_path / "root" / "annotations" / "validation").rmdir()
    with pytest.raises(UserError, match=r"annotations/validation.*expected layout"):
        prepare_ade20k(tmp_path / "root", tmp_path / "out")
    for p in (tmp_path / "root" / "images" / "training").iterdir():
        p.unlink()
    (tmp_path / "root" / "annotations" / "validation").mkdir()
    with pytest.raises(UserError, match=r"images/training: no \*.jpg images"):
        prepare_ade20k(tmp_path / "root", tmp_path / "out")


# --- COCO-Stuff-164k ----------------------------------------------------------------------

def test_coco_stuff(tmp_path: Path) -> None:
    tree = coco_stuff_tree(tmp_path / "root")
    index = prepare_coco_stuff(tmp_path / "root", tmp_path / "out")
    assert index["num_classes"] == 171 and list(index["splits"]) == ["train", "val"]
    assert index["class_names"][0] == "person" and index["class_names"][-1] == "wood"
    check_tree(tmp_path / "out", tree, coco_stuff_rule)


@pytest.mark.parametrize("value", [11, 182, 254])  # id 12 is unused; 183..255 do not exist
def test_coco_stuff_bad_values(tmp_path: Path, value: int) -> None:
    tree = coco_stuff_tree(tmp_path / "root", n_train=1, n_val=1)
    bad = tree[sorted(tree)[1]]
    values = bad.values.copy()
    values[0, 0] = value
    write_mask_png(bad.mask_path, values)
    index = prepare_coco_stuff(tmp_path / "root", tmp_path / "out", ConvertOptions(on_error="skip"))
    assert index["splits"]["val"]["num_skipped"] == 1 and index["splits"]["train"]["num_samples"] == 1
    reason = json.loads((tmp_path / "out" / "skipped.jsonl").read_text())["reason"]
    assert str(bad.mask_path) in reason and str(value) in reason
    assert list(verify_shards(tmp_path / "out")) == []


# --- PASCAL-Context -----------------------------------------------------------------------

@pytest.mark.parametrize("classes, rule, palette", [(59, pascal59_rule, False), (60, pascal60_rule, True)])
def test_pascal_context(tmp_path: Path, classes: int, rule, palette: bool) -> None:
    tree = pascal_context_tree(tmp_path / "root", palette=palette)
    sample = next(iter(tree.values()))
    assert Image.open(sample.mask_path).mode == ("P" if palette else "L")
    index = prepare_pascal_context(tmp_path / "root", tmp_path / "out", classes)
    assert index["num_classes"] == classes and index["name"] == f"pascal-context-{classes}"
    assert (index["class_names"][0] == "background") == (classes == 60)
    check_tree(tmp_path / "out", tree, rule)


def test_pascal_context_layout(tmp_path: Path) -> None:
    tree = pascal_context_tree(tmp_path / "root", n_train=3, n_val=1)
    with pytest.raises(UserError, match="59 or 60"):
        prepare_pascal_context(tmp_path / "root", tmp_path / "o", 21)
    (tmp_path / "root" / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    with pytest.raises(UserError, match=r"val.txt: missing list file"):
        prepare_pascal_context(tmp_path / "root", tmp_path / "o")
    (tmp_path / "root" / "ImageSets" / "SegmentationContext" / "val.txt").write_text(sorted(tree)[0] + "\n")
    with pytest.raises(UserError, match="listed twice"):
        prepare_pascal_context(tmp_path / "root", tmp_path / "o")


# --- bad samples shared by all three -----------------------------------------------------

def test_bad_images_and_sizes(tmp_path: Path) -> None:
    tree = pascal_context_tree(tmp_path / "root", n_train=5, n_val=1)
    keys = sorted(k for k in tree if tree[k].split == "train")
    tree[keys[0]].image_path.write_bytes(b"")
    tree[keys[1]].image_path.write_bytes(b"not a jpeg at all")
    write_mask_png(tree[keys[2]].mask_path, np.ones((7, 9), np.uint8))
    tree[keys[3]].mask_path.unlink()
    index = prepare_pascal_context(tmp_path / "root", tmp_path / "out", opts=ConvertOptions(on_error="skip"))
    assert index["splits"]["train"]["num_samples"] == 1
    reasons = {json.loads(x)["key"]: json.loads(x)["reason"]
               for x in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()}
    assert "0 bytes" in reasons[keys[0]] and "corrupt" in reasons[keys[1]]
    assert "9x7" in reasons[keys[2]] and "missing" in reasons[keys[3]]
    for k, path in zip(keys, (tree[keys[0]].image_path, tree[keys[1]].image_path,
                              tree[keys[2]].mask_path, tree[keys[3]].mask_path)):
        assert str(path) in reasons[k]
    assert list(verify_shards(tmp_path / "out")) == []


def test_truncated_jpeg_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(random_image(rng, 64, 64)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    assert decode_jpeg(data, "ok.jpg").shape == (64, 64, 3)
    decode_jpeg(data + b"\x00" * 16, "padded.jpg")  # trailing padding is harmless
    decode_jpeg(data + b"trailing bytes", "tail.jpg")  # so are other bytes after the end marker
    cut = data[: len(data) * 2 // 3]
    with pytest.raises(SampleError, match="cut.jpg: (truncated|corrupt)"):
        decode_jpeg(cut, "cut.jpg")
    # OpenCV 4 decodes a truncated JPEG with a mere warning (grey fill): the end-marker check
    # must then catch it.
    import cv2

    monkeypatch.setattr(cv2, "imdecode", lambda *a: np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(SampleError, match="cut.jpg: truncated"):
        decode_jpeg(cut, "cut.jpg")


def test_exif_rotated_jpeg_is_stored_unrotated(tmp_path: Path) -> None:
    """A JPEG with an EXIF rotation is re-encoded so every reader sees the mask's pixel grid."""
    tree = ade150_tree(tmp_path / "root", n_train=1, n_val=1, size=(24, 40))
    s = tree[sorted(tree)[0]]
    pixels = decode_rgb(s.image_path.read_bytes())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(s.image_path, "JPEG", quality=95, exif=exif)
    prepare_ade20k(tmp_path / "root", tmp_path / "out")
    stored = read_shards(tmp_path / "out")[s.key]
    assert stored["image"] != s.image_path.read_bytes()
    assert decode_image(stored["image"]).shape[:2] == stored["label"].shape == (24, 40)
    other = tree[sorted(tree)[1]]
    assert read_shards(tmp_path / "out")[other.key]["image"] == other.image_path.read_bytes()


# --- CLI ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command, make, extra, k", [
    ("ade20k", ade150_tree, [], 150),
    ("coco-stuff", coco_stuff_tree, [], 171),
    ("pascal-context", pascal_context_tree, ["--classes", "60"], 60),
])
def test_cli(tmp_path: Path, command: str, make, extra: list[str], k: int) -> None:
    make(tmp_path / "root", n_train=2, n_val=1)
    out = tmp_path / "out"
    res = runner.invoke(app, ["prepare", command, "--root", str(tmp_path / "root"), "--out", str(out),
                              "--workers", "0", *extra])
    assert res.exit_code == 0, res.output
    assert f"K={k}" in res.output
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    res = runner.invoke(app, ["prepare", command, "--root", str(tmp_path / "nope"), "--out",
                              str(tmp_path / "o2"), "--workers", "0"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    help_text = runner.invoke(app, ["prepare", command, "--help"]).output
    assert "Example" in help_text and "Layout" in help_text
