"""VSPW (124 classes): `VSPW_480p/data/<video>/{origin,mask}` -> shards of frames.

Each annotated frame becomes one sample (`video`, `frame` set), so `assemble` also records the
per-video target (the union of the frames' classes). Masks are 8-bit: 0 "others" and 255 void
are ignored, train id = value - 1.

The release has frames without a mask and damaged or 0-byte frames (video 988_f_Xvy_DCPt8).
That is its documented state, not a user mistake, so such frames are always skipped and
recorded in skipped.jsonl with the reason, even under --on-error fail; anything else wrong with
a frame (size mismatch, values outside 0..124/255, a colour mask) follows --on-error.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.source_io import check_pixels, decode_jpeg, read_list, stored_image_bytes
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, MAX_FILE_BYTES
from rankseg_core.shards.write import DatasetHeader, EncodedSample, encode_sample
from rankseg_core.utils.fsio import read_regular
from rankseg_core.utils.resources import load_json as load_dataset_json

NUM_CLASSES = 124
VOID = 255


def class_names() -> list[str]:
    """The 124 VSPW class names in train-id order."""
    classes = load_dataset_json("vspw/classes.json")["classes"]
    return [c["name"] for c in sorted(classes, key=lambda c: c["train_id"])]


def _frame_order(stem: str) -> tuple:
    # numeric stems in numeric order (robust to unpadded names), others after, by name
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def plan_split(root: Path, split: str) -> dict[str, tuple[str, int, str, bool, bool]]:
    """key `<video>/<frame stem>` -> (video, frame index, stem, has image, has mask).

    The frame index is the position among the video's frames (images) in temporal order;
    a mask without its frame gets -1 (it is reported and skipped).
    """
    listing = root / f"{split}.txt"
    if not listing.is_file():
        raise UserError(f"{listing} is missing: --root must be the VSPW_480p folder (with "
                        "train.txt, val.txt and data/)")
    videos = [v.strip() for v in read_list(listing).splitlines() if v.strip()]
    if not videos:
        raise UserError(f"{listing} lists no videos")
    frames: dict[str, tuple[str, int, str, bool, bool]] = {}
    for video in videos:
        origin = root / "data" / video / "origin"
        if not origin.is_dir():
            raise UserError(f"{origin} is missing (video listed in {listing.name}): re-extract VSPW_480p")
        images = {p.stem for p in origin.glob("*.jpg")}
        masks = {p.stem for p in (root / "data" / video / "mask").glob("*.png")}
        if not images:
            raise UserError(f"{origin} holds no .jpg frames: re-extract VSPW_480p")
        order = {s: i for i, s in enumerate(sorted(images, key=_frame_order))}
        for stem in sorted(images | masks, key=_frame_order):
            frames[f"{video}/{stem}"] = (video, order.get(stem, -1), stem, stem in images, stem in masks)
    return frames


@dataclass
class VspwMaker:
    """Builds one frame's sample; picklable for spawned workers."""

    root: str
    frames: dict[str, tuple[str, int, str, bool, bool]]
    strict: bool  # --on-error fail: unexpected problems stop the run (UserError)

    def _problem(self, msg: str) -> Exception:
        return UserError(f"{msg} (fix it, or re-run with --on-error skip)") if self.strict else SampleError(msg)

    def __call__(self, key: str) -> EncodedSample:
        video, frame, stem, has_image, has_mask = self.frames[key]
        vdir = Path(self.root) / "data" / video
        img_path, mask_path = vdir / "origin" / f"{stem}.jpg", vdir / "mask" / f"{stem}.png"
        # The release's known gaps: always skipped (SampleError), never fatal.
        if not has_image:
            raise SampleError(f"{img_path}: mask without its frame")
        if not has_mask:
            raise SampleError(f"{mask_path}: frame has no mask (not annotated in the release)")
        data = _read(img_path, "frame")
        pixels = decode_jpeg(data, img_path)  # SampleError for damaged / truncated frames
        size = pixels.shape[:2]
        mdata = _read(mask_path, "mask")
        check_pixels(mdata, mask_path, "mask")
        try:
            with Image.open(io.BytesIO(mdata)) as mk:
                mode = mk.mode
                mask = np.asarray(mk) if mode in ("L", "P") else None
        except (OSError, ValueError, SyntaxError) as exc:
            raise SampleError(f"{mask_path}: damaged mask ({exc})") from None

        if mask is None:
            raise self._problem(f"{mask_path}: mask mode {mode}, expected an 8-bit class-index PNG (L or P)")
        if mask.shape != size:
            raise self._problem(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]}, its frame "
                                f"{size[0]}x{size[1]}")
        bad = (mask > NUM_CLASSES) & (mask != VOID)
        if bad.any():
            raise self._problem(f"{mask_path}: value {int(mask[bad][0])} is neither a class (1..124), "
                                "0 (others) nor 255 (void)")
        ignore = (mask == 0) | (mask == VOID)
        label = np.where(ignore, IGNORE, mask.astype(np.uint16) - 1).astype(np.uint16)
        return encode_sample(key, stored_image_bytes(data, pixels), label, NUM_CLASSES,
                             video=video, frame=frame)


def _read(path: Path, what: str) -> bytes:
    try:
        data = read_regular(path, what, MAX_FILE_BYTES, SampleError)
    except OSError as exc:
        raise SampleError(f"{path}: unreadable {what} ({exc.strerror or exc})") from None
    if not data:
        raise SampleError(f"{path}: 0-byte {what} (damaged in the release)")
    return data


def prepare_vspw(root: str | Path, out: str | Path, *, splits: Sequence[str] = ("train", "val"),
                 opts: ConvertOptions | None = None) -> dict | None:
    """Convert VSPW_480p splits into shards; returns `dataset.json` (None for one part)."""
    opts = opts or ConvertOptions()
    opts.validate()
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: --root must be the VSPW_480p folder")
    splits = list(dict.fromkeys(splits))
    for s in splits:
        if s not in ("train", "val", "test"):
            raise UserError(f"--split {s!r}: VSPW splits are train, val and test")
        if s == "test":
            raise UserError("--split test: VSPW publishes no test masks; convert train and val")
    plans = {s: plan_split(root, s) for s in splits}
    frames = {k: v for p in plans.values() for k, v in p.items()}
    if len(frames) != sum(map(len, plans.values())):
        raise UserError(f"a video is listed in more than one of {', '.join(f'{s}.txt' for s in splits)}")
    header = DatasetHeader(name="vspw", class_names=class_names(),
                           source=load_dataset_json("vspw/classes.json")["source"],
                           options={"splits": sorted(splits)})
    maker = VspwMaker(str(root), frames, strict=opts.on_error == "fail")
    # Known gaps are SampleErrors that must not stop the run: the writer always skips them;
    # the maker itself raises UserError for the rest when the user asked to fail.
    return run_conversion(out, header, {s: list(p) for s, p in plans.items()}, maker,
                          dataclasses.replace(opts, on_error="skip"))
