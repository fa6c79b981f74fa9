"""YouTube-VIS 2019 (40 classes): `{split}/JPEGImages/<video>/*.jpg` + `{split}.json` -> shards.

One sample per listed frame. Its label is the per-pixel category (train id = category id - 1)
of the tracks present in that frame; where tracks overlap the first track in the JSON wins;
pixels of no track are IGNORE (YouTube-VIS has no background class and does not annotate
everything, so "no track" is "unknown", not a class). Every track present in the frame is also
kept as an instance (compressed RLE) in the sample's `instances` JSON:
`[{"track_id", "category", "iscrowd", "rle": {"size": [h, w], "counts": str}}]`; the `rle` dict
decodes directly with `pycocotools.mask.decode`.

valid/test have no annotations: their frames are stored (for inference) with all-IGNORE
labels, empty targets and `instances` = "[]".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.geometry import GeometryError, check_image_size, compressed_rle
from rankseg_core.convert.source_io import decode_jpeg, load_json, read_bytes, stored_image_bytes
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.write import DatasetHeader, EncodedSample, encode_sample
from rankseg_core.utils.resources import load_json as load_dataset_json

SPLITS = ("train", "valid", "test")


def builtin_categories() -> list[tuple[int, str]]:
    """The 40 YouTube-VIS 2019 categories as (id, name), ids 1..40."""
    return [(c["id"], c["name"]) for c in load_dataset_json("youtube_vis_2019/classes.json")["classes"]]


def categories_of(doc: dict, path: Path) -> list[tuple[int, str]]:
    """(id, name) sorted by id: the JSON's `categories`, or the built-in 40 when it has none."""
    cats = doc.get("categories")
    if not cats:
        return builtin_categories()
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: 'categories' entries need an integer 'id' and a 'name'") from None
    if len({i for i, _ in pairs}) != len(pairs):
        raise UserError(f"{path}: duplicate category ids in 'categories'")
    return pairs


# (track id, train id, iscrowd, compressed RLE counts)
Track = tuple[int, int, int, str]


@dataclass
class YtvisMaker:
    """Builds one frame's sample; picklable for spawned workers."""

    # key -> (video, path, t, h, w, tracks, error or ""): the error of malformed geometry
    frames: dict[str, tuple[str, str, int, int, int, list[Track], str]]
    num_classes: int

    def __call__(self, key: str) -> EncodedSample:
        video, path, t, h, w, tracks, error = self.frames[key]
        if error:  # malformed geometry was never handed to pycocotools
            raise SampleError(error)
        data = read_bytes(path, "frame")
        pixels = decode_jpeg(data, path)  # SampleError for corrupt / truncated frames
        if pixels.shape[:2] != (h, w):
            raise SampleError(f"{path}: frame is {pixels.shape[0]}x{pixels.shape[1]} (H x W), the JSON "
                              f"says {h}x{w}")
        label = np.full((h, w), IGNORE, np.uint16)
        # reverse order: the first track ends on top where tracks overlap
        for _, cat, _, counts in reversed(tracks):
            label[mask_utils.decode({"size": [h, w], "counts": counts.encode()}).view(bool)] = cat
        instances = json.dumps([{"track_id": tid, "category": cat, "iscrowd": crowd,
                                 "rle": {"size": [h, w], "counts": counts}}
                                for tid, cat, crowd, counts in tracks])
        return encode_sample(key, stored_image_bytes(data, pixels), label, self.num_classes,
                             video=video, frame=t,
                             instances=instances)


def index_split(doc: dict, path: Path, frames_dir: Path, cat_ids: dict[int, int],
                frames: dict[str, tuple]) -> list[str]:
    """Add one split's frames (with the tracks present in each) to `frames`; return its keys."""
    videos = doc.get("videos")
    anns = doc.get("annotations", [])
    if not isinstance(videos, list) or not isinstance(anns, list):
        raise UserError(f"{path}: not a YouTube-VIS JSON (needs a 'videos' list)")
    per_video: dict[int, tuple[str, int, int, list[str]]] = {}
    errors: dict[tuple[int, int], str] = {}  # (video, frame) -> first geometry problem
    for v in videos:
        try:
            vid, h, w, names = int(v["id"]), v["height"], v["width"], list(v["file_names"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: video entry {str(v)[:80]} lacks id/height/width/file_names") from None
        if not names:
            raise UserError(f"{path}: video {vid} has no file_names")
        video = Path(names[0]).parent.name
        try:
            h, w = check_image_size(h, w)
        except GeometryError as exc:
            errors.update({(vid, t): f"{path}: video {vid} ({video}): {exc}" for t in range(len(names))})
            h, w = 0, 0
        per_video[vid] = (video, h, w, names)
    tracks: dict[int, list[list[Track]]] = {vid: [[] for _ in per_video[vid][3]] for vid in per_video}
    for a in anns:
        try:
            vid, cat, tid = int(a["video_id"]), int(a["category_id"]), int(a["id"])
            segs, crowd = a["segmentations"], int(a.get("iscrowd", 0) or 0)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UserError(f"{path}: annotation {str(a.get('id') if isinstance(a, dict) else a)[:40]} lacks "
                            "id/video_id/category_id/segmentations (or has a non-integer iscrowd)") from None
        if cat not in cat_ids:
            raise UserError(f"{path}: annotation {tid} has unknown category id {cat} (known: "
                            f"{min(cat_ids)}..{max(cat_ids)}): fix the file or pass the official JSON")
        if vid not in per_video:
            raise UserError(f"{path}: annotation {tid} refers to video {vid}, which is not in 'videos'")
        video, h, w, names = per_video[vid]
        if not isinstance(segs, list) or len(segs) != len(names):
            raise UserError(f"{path}: annotation {tid} has {len(segs) if isinstance(segs, list) else 'no'} "
                            f"segmentations for the {len(names)} frames of video {vid}")
        for t, seg in enumerate(segs):
            if seg is None or (vid, t) in errors:
                continue
            try:
                counts = compressed_rle(seg, h, w)["counts"].decode()
            except GeometryError as exc:  # this frame's sample fails, the others convert
                errors[(vid, t)] = f"{path}: video {vid} ({video}), frame {t}, annotation {tid}: {exc}"
                continue
            tracks[vid][t].append((tid, cat_ids[cat], crowd, counts))
    keys = []
    for vid, (video, h, w, names) in per_video.items():
        for t, name in enumerate(names):
            key = f"{video}/{Path(name).stem}"
            if key in frames:
                raise UserError(f"{path}: frame {name} is listed twice")
            frames[key] = (video, str(frames_dir / name), t, h, w, tracks[vid][t], errors.get((vid, t), ""))
            keys.append(key)
    return keys


def prepare_youtube_vis(root: str | Path, out: str | Path, *, splits: Sequence[str] = ("train",),
                        json_path: str | Path | None = None, opts: ConvertOptions | None = None,
                        note: Callable[[str], None] = lambda s: None) -> dict | None:
    """Convert YouTube-VIS 2019 splits into shards; returns `dataset.json` (None for one part)."""
    opts = opts or ConvertOptions()
    opts.validate()
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: --root must hold train/, valid/ and train.json, valid.json")
    splits = list(dict.fromkeys(splits))
    for s in splits:
        if s not in SPLITS:
            raise UserError(f"--split {s!r}: YouTube-VIS splits are {', '.join(SPLITS)}")
    if json_path is not None and len(splits) != 1:
        raise UserError("--json replaces the annotation file of a single --split")
    frames: dict[str, tuple] = {}
    keys: dict[str, list[str]] = {}
    cats: list[tuple[int, str]] | None = None
    for s in splits:
        path = Path(json_path) if json_path is not None else root / f"{s}.json"
        note(f"reading {path}")
        doc = load_json(path, "YouTube-VIS JSON")
        c = categories_of(doc, path)
        if cats is None:
            cats = c
        elif c != cats:
            raise UserError(f"{path}: its categories differ from the other split's: convert them separately")
        frames_dir = root / s / "JPEGImages"
        if not frames_dir.is_dir():
            raise UserError(f"{frames_dir} is missing: --root must hold {s}/JPEGImages/<video>/")
        keys[s] = index_split(doc, path, frames_dir, {i: r for r, (i, _) in enumerate(cats)}, frames)
    assert cats is not None
    builtin = cats == builtin_categories()
    header = DatasetHeader(
        name="youtube_vis_2019" if builtin else "youtube_vis",
        class_names=[n for _, n in cats],
        source=load_dataset_json("youtube_vis_2019/classes.json")["source"] if builtin
        else "categories of the YouTube-VIS JSON (train id = rank of the category id)",
        options={"splits": sorted(splits)})
    return run_conversion(out, header, keys, YtvisMaker(frames, len(cats)), opts)
