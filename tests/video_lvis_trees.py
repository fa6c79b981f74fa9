"""Builders of small on-disk trees in the official COCO+LVIS, VSPW and YouTube-VIS layouts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from rankseg_core.shards.codec import decode_label
from rankseg_core.shards.read import ShardIndex
from rankseg_core.utils.resources import load_json as load_dataset_json

# --------------------------------------------------------------------------- generic


def write_json(path: Path, obj: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def write_jpeg(path: Path, h: int, w: int, seed: int = 0) -> bytes:
    """A JPEG of h x w (a cheap gradient that differs by seed) at `path`; returns its bytes."""
    ramp = (np.arange(w) * 3 + (seed * 17) % 200) % 200
    img = np.broadcast_to(np.stack([ramp, ramp // 2, 200 - ramp], -1).astype(np.uint8), (h, w, 3))
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img), [cv2.IMWRITE_JPEG_QUALITY, 70])
    assert ok
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())
    return buf.tobytes()


def rle_str(mask: np.ndarray) -> dict:
    """Compressed RLE (counts as str, the COCO-Stuff JSON form) of an H x W bool mask."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode()}


def rle_uncompressed(mask: np.ndarray) -> dict:
    """Uncompressed RLE (counts list, column-major; the YouTube-VIS form) of an H x W bool mask."""
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:  # counts start with a run of zeros
        runs = [0] + runs
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": runs}


def rect(x0: float, y0: float, x1: float, y1: float) -> list[float]:
    """Polygon of an axis-aligned rectangle."""
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def read_samples(root: Path, split: str) -> dict[str, dict]:
    """key -> {label (H x W uint16), image bytes, classes, video, frame, instances} of a split."""
    idx = ShardIndex(root)
    out = {}
    for path in idx.shard_paths(split):
        with h5py.File(path, "r") as f:
            keys = f["key"].asstr()[:]
            offs, cls = f["class_offsets"][:], f["classes"][:]
            videos, inst = f["video"].asstr()[:], f["instances"].asstr()[:]
            for i, k in enumerate(keys):
                out[k] = {"label": decode_label(f["label"][i].tobytes()),
                          "image": f["image"][i].tobytes(),
                          "classes": cls[offs[i]:offs[i + 1]].tolist(),
                          "video": videos[i], "frame": int(f["frame"][i]), "instances": inst[i]}
    return out


# --------------------------------------------------------------------------- COCO + LVIS


def v1_categories() -> list[dict]:
    """LVIS v1 categories (id, name, synset) as in lvis_v1_*.json."""
    table = load_dataset_json("coco_lvis/classes.json")["classes"][:1203]
    return [{"id": c["id"], "name": c["name"], "synset": c["synset"]} for c in table]


def coco_image(iid: int, h: int, w: int, folder: str) -> dict:
    """An LVIS v1 image entry (no file_name: the folder comes from coco_url)."""
    return {"id": iid, "height": h, "width": w,
            "coco_url": f"http://images.cocodataset.org/{folder}/{iid:012d}.jpg"}


def stuff_doc(images: list[dict], anns: list[tuple[int, int, np.ndarray]]) -> dict:
    """A COCO-Stuff stuff JSON: anns = (image id, stuff id, H x W mask)."""
    cats = [{"id": k, "name": f"stuff{k}", "supercategory": "x"} for k in range(92, 184)]
    return {"images": images, "categories": cats,
            "annotations": [{"id": i + 1, "image_id": iid, "category_id": k, "segmentation": rle_str(m),
                             "area": int(m.sum()), "iscrowd": 0}
                            for i, (iid, k, m) in enumerate(anns)]}


H, W = 16, 18  # image 2 of `lvis_tree`


def lvis_tree(root: Path) -> tuple[Path, dict, dict]:
    """Images 1 (20 x 24) and 2 (H x W), two LVIS annotations each (id 7 on image 2), stuff
    for both. Returns (coco root, LVIS doc, stuff doc); write them with `write_docs`."""
    coco = root / "coco"
    write_jpeg(coco / "val2017" / "000000000001.jpg", 20, 24)
    write_jpeg(coco / "val2017" / "000000000002.jpg", H, W, seed=1)
    imgs = [coco_image(1, 20, 24, "val2017"), coco_image(2, H, W, "val2017")]
    anns = [{"id": 5, "image_id": 1, "category_id": 3, "segmentation": [rect(2, 2, 16, 10)]},
            {"id": 6, "image_id": 2, "category_id": 9, "segmentation": [rect(1, 1, 8, 8)]},
            {"id": 7, "image_id": 2, "category_id": 11, "segmentation": [rect(4, 4, 14, 12), rect(0, 12, 3, 16)]},
            {"id": 8, "image_id": 1, "category_id": 12, "segmentation": [[-2.5, -1, 30, 3, 12, 25.5]]}]
    field1, field2 = np.zeros((20, 24), bool), np.zeros((H, W), bool)
    field1[:, 12:] = True
    field2[5:] = True
    stuff = [(1, 157, field1), (1, 165, ~field1), (2, 157, field2), (2, 183, ~field2)]
    return coco, {"images": imgs, "annotations": anns, "categories": v1_categories()}, stuff_doc(imgs, stuff)


def write_docs(root: Path, lvis: dict, stuff: dict) -> tuple[Path, Path]:
    return write_json(root / "lvis_v1_val.json", lvis), write_json(root / "stuff_val2017.json", stuff)


# --------------------------------------------------------------------------- VSPW


def write_mask(path: Path, values: np.ndarray, palette: bool = True) -> None:
    """An 8-bit class-index PNG (palette 'P' like the release, or greyscale 'L')."""
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.ascontiguousarray(values, np.uint8)
    img = Image.fromarray(values)  # mode L
    if palette:
        img = Image.frombytes("P", img.size, values.tobytes())
        img.putpalette([(i * k) % 256 for i in range(256) for k in (37, 91, 53)])
    img.save(path)


def vspw_tree(root: Path, h: int = 24, w: int = 32) -> dict:
    """A VSPW_480p tree; returns {split: {video: {stem: mask or None}}} of the frames written.

    train: video A (3 frames: 0/255/classes; the third without a mask), video B (2 frames, one
    0-byte), video C (a good frame and two damaged JPEGs); val: video D.
    """
    rng = np.random.default_rng(0)
    layout: dict = {"train": {}, "val": {}}

    def frame(video: str, stem: str, split: str, values: np.ndarray | None, kind: str = "ok") -> None:
        vdir = root / "data" / video
        img_path = vdir / "origin" / f"{stem}.jpg"
        data = write_jpeg(img_path, h, w, seed=hash((video, stem)) % 1000)
        if kind == "empty":
            img_path.write_bytes(b"")
        elif kind == "truncated":  # OpenCV refuses it
            img_path.write_bytes(data[: len(data) // 2])
        elif kind == "cut_tail":  # no end-of-image marker (some OpenCV builds decode it with grey)
            img_path.write_bytes(data[:-12])
        if values is not None:
            write_mask(vdir / "mask" / f"{stem}.png", values, palette=stem != "00000002")
        layout[split].setdefault(video, {})[stem] = (values, kind)

    def rand_mask(classes: list[int]) -> np.ndarray:
        m = rng.choice(np.array(classes), size=(h, w)).astype(np.uint8)
        m[:2] = 0  # "others"
        m[-2:] = 255  # void
        return m

    frame("vidA", "00000001", "train", rand_mask([1, 5, 124]))
    frame("vidA", "00000002", "train", rand_mask([7, 124]))
    frame("vidA", "00000003", "train", None)  # no mask
    frame("vidB", "00000010", "train", rand_mask([30, 31]))
    frame("vidB", "00000011", "train", rand_mask([32]), kind="empty")
    frame("vidC", "00000001", "train", rand_mask([2]))
    frame("vidC", "00000002", "train", rand_mask([3]), kind="truncated")
    frame("vidC", "00000003", "train", rand_mask([4]), kind="cut_tail")
    frame("vidD", "00000001", "val", rand_mask([100, 101]))
    frame("vidD", "00000002", "val", np.zeros((h, w), np.uint8))  # all "others"
    for split, vids in layout.items():
        (root / f"{split}.txt").write_text("".join(f"{v}\n" for v in vids))
    return layout


# --------------------------------------------------------------------------- YouTube-VIS


def ytvis_frames(root: Path, split: str, doc: dict, skip: set[str] = frozenset()) -> None:
    """Write a JPEG for every frame of `doc`'s videos (except the file names in `skip`)."""
    for v in doc["videos"]:
        for i, name in enumerate(v["file_names"]):
            if name not in skip:
                write_jpeg(root / split / "JPEGImages" / name, v["height"], v["width"], seed=i)
