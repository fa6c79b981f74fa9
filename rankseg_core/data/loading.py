"""Training data: clips, the deterministic batch stream, augmentation, the DataLoader.

Determinism and exact resume rest on one idea: the data stream is a pure function of
(seed, global sample position). Epoch e visits the clips in the permutation drawn from
(seed, e); the sample at global position g is augmented with a generator seeded by
(seed, g). Optimizer step s consumes positions [s*B, (s+1)*B) (B = global batch), split into
accumulation micro-batches and then across DDP ranks. So resuming at step s only needs s,
and the stream does not depend on the number of workers or processes.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from rankseg_core.config.train import TrainConfig
from rankseg_core.convert.geometry import GeometryError, compressed_rle
from rankseg_core.data.augment import TrainTransform, build_train_transform
from rankseg_core.data.weak_shot import hide_novel, novel_table
from rankseg_core.errors import UserError
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils import distributed as D
from rankseg_core.utils import jsonio


def clip_table(ds: ShardDataset, clip_len: int) -> np.ndarray:
    """Sample indices of every trainable clip: N_clips x T (T = 1: every image is a clip).

    A clip is T consecutive frames (by frame number) of one video.
    """
    n = len(ds)
    if clip_len == 1:
        return np.arange(n)[:, None]
    a = ds.arrays
    videos = np.asarray(a.video)
    if not np.all(videos != ""):
        raise UserError(f"{ds.index.root}: model.clip_len={clip_len} needs a video dataset (samples with "
                        "video/frame fields, e.g. VSPW); use --clip-len 1 for images")
    order = np.lexsort((a.frame, videos))  # by video, then frame
    v = videos[order]
    starts = np.arange(n - clip_len + 1)
    same = np.ones(starts.size, bool)
    for t in range(1, clip_len):
        same &= v[starts + t] == v[starts]
    if not same.any():
        raise UserError(f"{ds.index.root}: no video has {clip_len} frames; lower --clip-len")
    return order[starts[same][:, None] + np.arange(clip_len)[None, :]]


@dataclass
class BatchStream:
    """Yields this rank's micro-batches as lists of (global position, clip id).

    Step s, micro-batch m, rank r takes global positions
    s*B + m*(W*b) + r*b + [0, b), with b = B / (W * accum).
    """

    num_clips: int
    global_batch: int
    accum_steps: int
    world_size: int
    rank: int
    seed: int
    start_step: int = 0
    _perms: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def micro(self) -> int:
        return self.global_batch // (self.world_size * self.accum_steps)

    def clip_at(self, g: np.ndarray) -> np.ndarray:
        epoch, pos = np.divmod(g, self.num_clips)
        out = np.empty_like(g)
        for e in np.unique(epoch):  # at most two epochs per batch
            out[epoch == e] = self._permutation(int(e))[pos[epoch == e]]
        return out

    def _permutation(self, epoch: int) -> np.ndarray:
        """Epoch `epoch`'s visiting order, drawn once: redrawing it for every batch cost
        O(number of clips) per batch (~0.2 ms at ADE20K's 20k images, ~1 ms at COCO's 118k).
        The last two epochs are kept: a batch spans at most two."""
        perms = self._perms
        if epoch not in perms:
            if len(perms) >= 2:
                del perms[min(perms)]
            perms[epoch] = np.random.default_rng([self.seed, 7, epoch]).permutation(self.num_clips)
        return perms[epoch]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b, step = self.micro, self.start_step
        while True:
            for m in range(self.accum_steps):
                g0 = step * self.global_batch + m * self.world_size * b + self.rank * b
                g = np.arange(g0, g0 + b)
                yield [(int(x), int(c)) for x, c in zip(g, self.clip_at(g))]
            step += 1


def frame_instances(ds: ShardDataset, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample i's non-crowd instances: (n x H x W uint8 masks, n category train ids, n track
    ids), from the shard's per-frame `instances` JSON (YouTube-VIS shard form, docs/datasets.md).
    Crowd instances are left out, as the official YouTube-VIS training mapper does."""
    a = ds.arrays
    h, w = int(a.height[i]), int(a.width[i])
    where = f"{ds.paths[int(a.shard[i])]}: sample {a.keys[i]}"
    masks, cats, ids = [], [], []
    try:
        for inst in jsonio.loads(ds.instances_json(i) or "[]"):
            if int(inst["iscrowd"]):
                continue
            cat, tid = int(inst["category"]), int(inst["track_id"])
            if not 0 <= cat < ds.num_classes:
                raise ValueError(f"category {cat} outside 0..{ds.num_classes - 1}")
            masks.append(mask_utils.decode(compressed_rle(inst["rle"], h, w)))
            cats.append(cat)
            ids.append(tid)
    except (KeyError, TypeError, ValueError, OSError, GeometryError) as exc:
        raise UserError(f"{where}: instances do not read ({exc}); run `rankseg verify`") from None
    if len(set(ids)) != len(ids):
        raise UserError(f"{where}: a track id occurs twice in one frame; run `rankseg verify`")
    stack = np.stack(masks) if masks else np.zeros((0, h, w), np.uint8)
    return stack, np.asarray(cats, np.int64), np.asarray(ids, np.int64)


class AugmentedClips(torch.utils.data.Dataset):
    """(global position, clip id) -> augmented clip, unnormalised (data/device.py `to_device`
    normalises it where the model runs): image T x 3 x c x c uint8 (padding 0), label
    T x c x c uint16 (65535 = ignore, also the padding), extent T x 2 int32 (the (h, w) of
    the crop's real pixels at the top left; the rest is padding)
    (+ with `segments`: segments T x c x c uint16 segment indices and segments_info, T record lists;
    + with `instances`: instances, T dicts {"labels": n_t, "masks": n_t x c x c bool, "ids":
    n_t}, the frame's non-crowd instances that keep a pixel after the crop;
    + with `novel` (K booleans, a weak-shot run): image_labels T x K float, the classes present
    in the augmented crop, the label with every novel pixel set to ignore (data/weak_shot.py),
    and pad T x c x c bool, the crop's padding).

    Why uint8 / uint16: a worker hands its sample to the main process through shared memory;
    float32 images and int64 labels are 4x the bytes and were a large share of the loader's
    time (docs/training.md "The training loader")."""

    def __init__(self, ds: ShardDataset, clips: np.ndarray, transform: TrainTransform, seed: int,
                 segments: bool = False, instances: bool = False, novel: np.ndarray | None = None) -> None:
        self.ds, self.clips, self.transform, self.seed, self.segments = ds, clips, transform, seed, segments
        self.instances, self.novel = instances, novel

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Tensor | list]:
        g, clip = item
        frames = [self.ds.load(int(i)) for i in self.clips[clip]]
        rng = np.random.default_rng([self.seed, 1, g])  # augmentation depends on g only
        insts = [frame_instances(self.ds, int(f["index"])) for f in frames] if self.instances else None
        segs = [f["segments"] for f in frames] if self.segments else None
        try:
            raw = self.transform.crop_clip([f["image"] for f in frames], [f["label"] for f in frames], rng, segs)
            masks = None if insts is None else self.transform.crop_masks([m for m, _, _ in insts],
                                                                         frames[0]["label"].shape, raw.geometry)
        except ValueError as exc:
            raise UserError(f"{self.ds.index.root}: clip starting at {frames[0]['key']}: {exc}") from None
        t = len(frames)
        sample: dict[str, Tensor | list] = {
            "image": torch.from_numpy(raw.image), "label": torch.from_numpy(raw.label),
            "extent": torch.from_numpy(np.array([raw.extent] * t, np.int32))}
        if self.novel is not None:  # after augmentation: the image-level labels are the crop's
            label, present = hide_novel(raw.label, self.novel)
            # The complementary loss must not read the crop's padding as "not base" (the official
            # mapper's pad_region): padding is where the crop box did not reach.
            pad = torch.ones(label.shape, dtype=torch.bool)
            pad[:, : raw.extent[0], : raw.extent[1]] = False
            sample.update(label=torch.from_numpy(label), image_labels=torch.from_numpy(present), pad=pad)
        if raw.segments is not None:
            sample.update(segments=torch.from_numpy(raw.segments), segments_info=[f["segments_info"] for f in frames])
        if masks is not None and insts is not None:
            per_frame = []
            for m, (_, cats, ids) in zip(masks, insts):
                # An instance cropped out of a frame is absent there (a "null" frame of its track).
                keep = m.any(axis=(1, 2))  # (reshape(n, -1) fails for a frame without instances)
                per_frame.append({"labels": torch.from_numpy(cats[keep]), "masks": torch.from_numpy(m[keep]),
                                  "ids": torch.from_numpy(ids[keep])})
            sample["instances"] = per_frame
        return sample


# Byte alignment of each tensor inside a batch's shared block (a cache line; any dtype's size divides it).
_ALIGN = 64


def _cat_all(groups: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Each key's tensors concatenated along dim 0. In a DataLoader worker they are written
    straight into shared memory (as torch's default_collate does: the batch must reach it
    anyway to be handed to the main process, and sending it would otherwise copy it there
    once more), all keys into ONE block: every shared storage travels as its own file
    descriptor, a socket round trip through the worker's resource sharer that costs both
    processes more than copying a batch of crops; views of one block travel as one."""
    if torch.utils.data.get_worker_info() is None:
        return {k: torch.cat(parts) for k, parts in groups.items()}
    spans, end = {}, 0
    for k, parts in groups.items():
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        start = -(-end // _ALIGN) * _ALIGN
        end = start + parts[0].element_size() * math.prod(shape)
        spans[k] = (start, end, shape)
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(end, 1)))
    return {k: torch.cat(groups[k], out=block[start:stop].view(groups[k][0].dtype).view(shape))
            for k, (start, stop, shape) in spans.items()}


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """b clips of T frames -> (b*T) x 3 x c x c images, (b*T) x c x c labels, (b*T) x 2
    extents (clip-major); segment maps likewise, weak-shot image labels (b*T) x K, segment
    records and instances as one list entry per frame (their counts vary from frame to
    frame; instance masks stay bool at the crop size). Dtypes are kept (uint8 images). In a
    worker the tensors are views of one shared-memory block (`_cat_all`)."""
    out: dict[str, Any] = _cat_all({k: [i[k] for i in items]
                                    for k in ("image", "label", "extent", "segments", "image_labels", "pad")
                                    if k in items[0]})
    if "segments_info" in items[0]:
        out["segments_info"] = [info for i in items for info in i["segments_info"]]
    if "instances" in items[0]:
        out["instances"] = [inst for i in items for inst in i["instances"]]
    return out


def worker_init(worker_id: int) -> None:
    """Per-worker seeding and no nested threading (OpenCV / torch threads x workers)."""
    import cv2

    cv2.setNumThreads(0)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # the DataLoader derives it from its generator
    np.random.seed(seed)
    random.seed(seed)


def make_loader(cfg: TrainConfig, mean: list[float], std: list[float], info: D.DistInfo,
                start_step: int, segments: bool = False, instances: bool = False,
                pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """This rank's training batches from `start_step` on, unnormalised (`AugmentedClips`:
    pass each through data/device.py `to_device` with the same mean / std); with `segments`
    they carry the panoptic segment maps and records (the shards must be panoptic); with
    `instances` (a family that trains on tracks: `Family.instances`) each frame's instance
    masks and track ids (the shards must have tracks). `pin_memory` (for a CUDA device): the
    batches come in page-locked memory, so `to_device`'s non_blocking copy is asynchronous."""
    ds = ShardDataset(cfg.data.root, cfg.data.train_split)
    if ds.num_classes != cfg.model.num_classes:
        raise UserError(f"{cfg.data.root}: K={ds.num_classes} but the run was configured for "
                        f"K={cfg.model.num_classes}; use the same shards or a new run")
    if segments and not ds.index.is_panoptic:
        raise UserError(f"{cfg.data.root}: {ds.index.name} has no panoptic segments, which this model needs "
                        "(panoptic shards come from `rankseg prepare coco-panoptic | ade20k-panoptic | synthetic "
                        "--panoptic`); or train the semantic task (--set model.mask2former.task=semantic)")
    if instances and cfg.model.clip_len < 2:
        raise UserError(f"model.mask2former.task=instance trains clips of video tracks: model.clip_len="
                        f"{cfg.model.clip_len} must be >= 2 (e.g. --set model.clip_len=2)")
    novel = cfg.data.novel_classes
    if novel is not None and (cfg.model.clip_len > 1 or segments or instances):
        what = f"model.clip_len={cfg.model.clip_len}" if cfg.model.clip_len > 1 else "a panoptic / instance task"
        raise UserError(f"--weak-shot trains the semantic task on single images, not {what}: use --clip-len 1 and "
                        "the semantic task, or train without --weak-shot")
    clips = clip_table(ds, cfg.model.clip_len)
    if instances and not ds.has_instances():
        raise UserError(f"{cfg.data.root}: split {cfg.data.train_split!r} has no instances (per-frame tracks), which "
                        "model.mask2former.task=instance needs (YouTube-VIS shards: `rankseg prepare youtube-vis`, or "
                        "`rankseg prepare synthetic --video`); or train the semantic task")
    s = cfg.schedule
    if s.batch_size % (info.world_size * s.accum_steps):
        raise UserError(f"schedule.batch_size={s.batch_size} is not divisible by processes x accum_steps "
                        f"= {info.world_size} x {s.accum_steps}")
    stream = BatchStream(len(clips), s.batch_size, s.accum_steps, info.world_size, info.rank, cfg.seed, start_step)
    data = AugmentedClips(ds, clips, build_train_transform(cfg, mean, std), cfg.seed, segments, instances,
                          None if novel is None else novel_table(novel, ds.num_classes))
    workers = cfg.data.num_workers
    return torch.utils.data.DataLoader(
        data, batch_sampler=stream, num_workers=workers, collate_fn=collate_clips,
        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(cfg.seed + info.rank),
        persistent_workers=workers > 0, prefetch_factor=4 if workers else None, pin_memory=pin_memory)
