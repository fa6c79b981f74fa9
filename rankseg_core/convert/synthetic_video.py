"""Synthetic videos of the synthetic world (docs/video.md "Synthetic video data").

The same K classes, scenes and looks as `synthetic.py` (`make_world`), so the multi-label
ranking has the same structure: a video shows one scene, its background everywhere objects are
not, and a few of the scene's object classes (a class may show more than once). Each object is
a *track*: a wobbly blob with its class's colour x texture and its own shade that moves on a
straight line at a constant speed (a smooth path), slowly changing shape. Some tracks start
after the first frame and some end before the last (a track *appears* / *disappears*); a track
is also absent from a frame where it is fully occluded or has left the picture. Tracks have a
fixed depth order (the nearer one is on top where they overlap).

One shard set serves both video tasks:
- VSPW-like video semantic segmentation: every frame is a sample with `video` and `frame`, its
  label the class of the top-most track, else the scene background; the one-pixel boundaries
  between segments (also between two touching tracks of one class) are ignore, as in the
  image set. `assemble` records each video's union target in dataset.json.
- YouTube-VIS-like video instance segmentation: `instances` is, per frame, the JSON list of the
  tracks visible in it, `{"track_id", "category", "iscrowd": 0, "rle": {"size", "counts"}}`,
  each mask the track's visible pixels (boundaries left out), as compressed RLE that
  `pycocotools.mask.decode` reads. So the label equals each instance's category on its mask,
  and a track missing from a frame's list is absent there.

Everything is a function of (seed, split, video): a video's tracks come from the stream
(seed, 10 + split id, video), a frame's pixel noise from (seed, 10 + split id, video,
frame + 1), so any worker makes any frame without the others and the shards are byte-identical
for a seed whatever `--workers` is. The image set's streams (seed, split id, index) are apart.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.synthetic import (
    COLOURS,
    SPLIT_IDS,
    World,
    _edges,
    _scene_objects,
    _texture,
    make_world,
)
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE, encode_jpeg
from rankseg_core.shards.write import DatasetHeader, EncodedSample, encode_sample

VIDEO_STREAM = 10  # video streams are (seed, 10 + split id, ...): apart from the image set's
MAX_TRACKS = 8  # per video: with the background, at most 9 classes per video
APPEAR = 0.35  # chance that a track starts after the first frame
DISAPPEAR = 0.35  # chance that a track ends before the last frame
DEFAULT_FRAMES = 8
DEFAULT_SIZE = 64
MAX_FRAMES = 1000


@dataclass(frozen=True)
class Track:
    """One object's whole life in a video: what it is, where it is at frame t, when it lives."""

    track_id: int  # 1..n inside its video
    category: int  # train id (an object class of the video's scene)
    shade: float  # its own brightness, the same in every frame
    start: int  # first frame it may show in
    end: int  # one past its last frame
    depth: int  # 0 = farthest; a nearer track covers a farther one
    centre: tuple[float, float]  # (y, x) at frame 0 (may lie outside the picture)
    velocity: tuple[float, float]  # (dy, dx) pixels per frame
    radius: float
    aspect: float  # x radius / y radius
    lobes: int  # the outline's wobble: r(theta) = radius (1 + amp sin(lobes theta + phase))
    amp: float
    phase: float
    spin: float  # phase change per frame: the outline deforms slowly

    def mask(self, t: int, size: int) -> np.ndarray:
        """H x W bool: the pixels the track covers in frame t (before occlusion)."""
        if not self.start <= t < self.end:
            return np.zeros((size, size), bool)
        cy = self.centre[0] + self.velocity[0] * t
        cx = self.centre[1] + self.velocity[1] * t
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
        dy, dx = yy - cy, (xx - cx) / self.aspect
        theta = np.arctan2(dy, dx)
        edge = self.radius * (1 + self.amp * np.sin(self.lobes * theta + self.phase + self.spin * t))
        return np.hypot(dy, dx) <= edge

    def offset(self, t: int) -> tuple[int, int]:
        """The integer position its texture is anchored at in frame t (stripes move with it)."""
        return (int(np.floor(self.centre[0] + self.velocity[0] * t)),
                int(np.floor(self.centre[1] + self.velocity[1] * t)))


@dataclass(frozen=True)
class VideoPlan:
    scene: int
    background: int  # the scene's background class
    tracks: tuple[Track, ...]  # in track-id order


def _lifespan(rng: np.random.Generator, frames: int) -> tuple[int, int]:
    """[start, end) of a track: whole video, or starting late and / or ending early."""
    start, end = 0, frames
    if rng.random() < APPEAR:
        start = int(rng.integers(1, max(2, frames // 2 + 1)))
    if rng.random() < DISAPPEAR:
        lo = min(start + 2, frames)  # alive for >= 2 frames where the video allows
        end = int(rng.integers(lo, frames + 1))
    return min(start, frames - 1), end


def plan_video(world: World, seed: int, split: str, video: int, frames: int, size: int) -> VideoPlan:
    """The scene and tracks of one video, a function of (seed, split, video) only."""
    rng = np.random.default_rng([seed, VIDEO_STREAM + SPLIT_IDS[split], video])
    scene, objs = _scene_objects(world, rng)
    copies = 1 + rng.binomial(1, 0.25, len(objs))  # some classes show twice (several instances)
    cats = np.repeat(objs, copies)[:MAX_TRACKS]
    n = len(cats)
    depth = rng.permutation(n)
    scale = size / 64  # speeds and sizes in pixels of a 64 px frame
    tracks = []
    for i, cat in enumerate(cats.tolist()):
        start, end = _lifespan(rng, frames)
        speed = rng.uniform(0.8, 2.5) * scale  # >= 0.8 px per frame: every track visibly moves
        angle = rng.uniform(0, 2 * np.pi)
        vel = (speed * np.sin(angle), speed * np.cos(angle))
        # Where it is when it first shows: inside the picture, so a new track is seen.
        first = rng.uniform(0.15 * size, 0.85 * size, 2)
        tracks.append(Track(
            track_id=i + 1, category=int(cat), shade=float(rng.uniform(0.8, 1.1)), start=start, end=end,
            depth=int(depth[i]), centre=(float(first[0] - vel[0] * start), float(first[1] - vel[1] * start)),
            velocity=(float(vel[0]), float(vel[1])), radius=float(rng.uniform(0.1, 0.2) * size),
            aspect=float(rng.uniform(0.7, 1.4)), lobes=int(rng.integers(2, 5)), amp=float(rng.uniform(0.05, 0.2)),
            phase=float(rng.uniform(0, 2 * np.pi)), spin=float(rng.uniform(-0.15, 0.15))))
    return VideoPlan(int(scene), int(world.scenes_bg[scene]), tuple(tracks))


def render_frame(world: World, plan: VideoPlan, t: int, size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frame t: (H x W x 3 uint8 RGB, H x W uint16 label, H x W track map: 0 = none, i = track i).

    The track map holds each track's visible pixels: drawn far to near, boundaries removed.
    """
    ids = np.zeros((size, size), np.int64)
    for tr in sorted(plan.tracks, key=lambda tr: tr.depth):  # far to near: the nearest ends on top
        ids[tr.mask(t, size)] = tr.track_id
    image = np.empty((size, size, 3), np.float32)
    image[:] = world.background_colour[plan.background].astype(np.float32)
    period = max(2, size // 32)
    colours = list(COLOURS.values())
    for tr in plan.tracks:
        m = ids == tr.track_id
        if not m.any():
            continue
        a = world.appearance[tr.category]
        pattern = _texture(a // len(colours), size, size, period, tr.offset(t))
        image[m] = np.asarray(colours[a % len(colours)], np.float32) * (pattern[m, None] * tr.shade)
    image += rng.normal(0, 8, image.shape)
    cats = np.array([plan.background] + [tr.category for tr in plan.tracks], np.int64)
    label = cats[ids].astype(np.uint16)
    edge = _edges(ids)
    # As in the image sets: segment boundaries are unlabelled, and not part of any instance.
    label[edge] = IGNORE
    ids[edge] = 0
    return np.clip(image, 0, 255).astype(np.uint8), label, ids


def instances_json(plan: VideoPlan, ids: np.ndarray) -> str:
    """The frame's visible tracks in YouTube-VIS shard form (docs/datasets.md), track-id order."""
    h, w = ids.shape
    out = []
    for tr in plan.tracks:
        m = ids == tr.track_id
        if not m.any():  # absent here: not started, ended, fully covered or out of the picture
            continue
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        out.append({"track_id": tr.track_id, "category": tr.category, "iscrowd": 0,
                    "rle": {"size": [h, w], "counts": rle["counts"].decode()}})
    return json.dumps(out)


def video_name(split: str, video: int) -> str:
    return f"{split}_{video:06d}"


def frame_key(split: str, video: int, frame: int) -> str:
    """`<video>/<frame>`, as the VSPW converter names frames; sorted keys keep frame order."""
    return f"{video_name(split, video)}/{frame:04d}"


def make_frame(key: str, *, world: World, seed: int, size: int, frames: int) -> EncodedSample:
    """Frame `key` = '{split}_{video:06d}/{frame:04d}' as it is stored in the shards."""
    name, frame_text = key.split("/")
    split, video_text = name.rsplit("_", 1)
    video, t = int(video_text), int(frame_text)
    plan = plan_video(world, seed, split, video, frames, size)
    rng = np.random.default_rng([seed, VIDEO_STREAM + SPLIT_IDS[split], video, t + 1])
    image, label, ids = render_frame(world, plan, t, size, rng)
    return encode_sample(key, encode_jpeg(image), label, world.num_classes, video=name, frame=t,
                         instances=instances_json(plan, ids))


def split_frame_keys(split: str, videos: int, frames: int) -> list[str]:
    return [frame_key(split, v, t) for v in range(videos) for t in range(frames)]


def frame_maker(world: World, seed: int, size: int, frames: int) -> Callable[[str], EncodedSample]:
    return functools.partial(make_frame, world=world, seed=seed, size=size, frames=frames)


def prepare_synthetic_video(out: str | Path, *, num_classes: int = 1000, videos: int = 200, val_videos: int | None = None,
                            frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE, seed: int = 0,
                            opts: ConvertOptions | None = None) -> dict | None:
    """Write synthetic videos (train + val) to `out` and return its `dataset.json`.

    `videos` training videos of `frames` frames each, val a fifth as many unless `val_videos`
    is given; frames are `size` x `size`. One sample per frame (semantic label, `video`,
    `frame`, per-frame `instances`), written as v1 shards like VSPW / YouTube-VIS.
    """
    val_videos = max(1, videos // 5) if val_videos is None else val_videos
    if videos < 1 or val_videos < 1:
        raise UserError(f"--images (videos with --video) and --val-images must be >= 1, not {videos} / {val_videos}")
    if size < 32 or size % 16:
        raise UserError(f"--size must be a multiple of 16, >= 32, not {size}")
    if not 2 <= frames <= MAX_FRAMES:
        raise UserError(f"--frames must be in 2..{MAX_FRAMES} (a clip needs 2 frames), not {frames}")
    try:
        world = make_world(num_classes, seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # "video" keeps a video set's directory from being resumed as an image set and back.
    options = {"num_classes": num_classes, "video": True, "videos": videos, "val_videos": val_videos,
               "frames": frames, "size": size, "seed": seed}
    # Named "synthetic": the same world, so the same recipes (no photometric distortion:
    # colour is class identity); `videos` in dataset.json says it is video data.
    header = DatasetHeader(name="synthetic", class_names=list(world.names),
                           source="rankseg synthetic video generator", options=options)
    splits = {"train": split_frame_keys("train", videos, frames), "val": split_frame_keys("val", val_videos, frames)}
    return run_conversion(out, header, splits, frame_maker(world, seed, size, frames),
                          opts or ConvertOptions(samples_per_shard=500))
