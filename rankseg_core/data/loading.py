"""Training data: clips, the deterministic batch stream, augmentation, the DataLoader.

Determinism and exact resume rest on one idea: the data stream is a pure function of
(seed, global sample position). Epoch e visits the clips in the permutation drawn from
(seed, e); the sample at global position g is augmented with a generator seeded by
(seed, g). Optimizer step s consumes positions [s*B, (s+1)*B) (B = global batch), split into
accumulation micro-batches and then across DDP ranks. So resuming at step s only needs s,
and the stream does not depend on the number of workers or processes.
"""

from __future__ import annotations

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
from rankseg_core.data.slots import BatchSlots, SlotBatch, cat_into, layout, make_slots
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
        ids = [int(i) for i in self.clips[clip]]
        images, labels = zip(*(self.ds.pixels(i) for i in ids))  # (not `load`'s whole item: per-sample time)
        rng = np.random.default_rng([self.seed, 1, g])  # augmentation depends on g only
        insts = [frame_instances(self.ds, i) for i in ids] if self.instances else None
        panoptic = [self.ds.segments(i) for i in ids] if self.segments else None  # (map, records) per frame
        try:
            raw = self.transform.crop_clip(list(images), list(labels), rng, None if panoptic is None else
                                           [s for s, _ in panoptic])
            masks = None if insts is None else self.transform.crop_masks([m for m, _, _ in insts],
                                                                         labels[0].shape, raw.geometry)
        except ValueError as exc:
            raise UserError(f"{self.ds.index.root}: clip starting at {self.ds.arrays.keys[ids[0]]}: {exc}") from None
        t = len(ids)
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
        if raw.segments is not None and panoptic is not None:
            sample.update(segments=torch.from_numpy(raw.segments), segments_info=[info for _, info in panoptic])
        if masks is not None and insts is not None:
            per_frame = []
            for m, (_, cats, tracks) in zip(masks, insts):
                # An instance cropped out of a frame is absent there (a "null" frame of its track).
                keep = m.any(axis=(1, 2))  # (reshape(n, -1) fails for a frame without instances)
                per_frame.append({"labels": torch.from_numpy(cats[keep]), "masks": torch.from_numpy(m[keep]),
                                  "ids": torch.from_numpy(tracks[keep])})
            sample["instances"] = per_frame
        return sample


def batch_bytes(frames: int, crop: int, num_classes: int, segments: bool, weak_shot: bool) -> int:
    """Bytes of the tensors of a batch of `frames` frames from `AugmentedClips` (its keys,
    dtypes and shapes; the lists of segment records and instances are sent apart), laid out
    as `collate_clips` lays them out: the size of a shared-memory slot (data/slots.py)."""
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "image": ((3, crop, crop), torch.uint8), "label": ((crop, crop), torch.uint16), "extent": ((2,), torch.int32)}
    if segments:
        shapes["segments"] = ((crop, crop), torch.uint16)
    if weak_shot:
        shapes.update(image_labels=((num_classes,), torch.float32), pad=((crop, crop), torch.bool))
    return layout({k: [torch.empty((frames, *shape), dtype=dt, device="meta")] for k, (shape, dt) in shapes.items()})[1]


_TENSOR_KEYS = ("image", "label", "extent", "segments", "image_labels", "pad")


def _cat_all(groups: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """Each key's tensors concatenated along dim 0. In a DataLoader worker (torch's path,
    when no slot of data/slots.py is free) they are written straight into shared memory (as
    torch's default_collate does: the batch must reach it anyway to be handed to the main
    process, and sending it would otherwise copy it there once more), all keys into ONE block:
    every shared storage travels as its own file descriptor, a socket round trip through the
    worker's resource sharer that costs both processes more than copying a batch of crops;
    views of one block travel as one."""
    if torch.utils.data.get_worker_info() is None:
        return {k: torch.cat(parts) for k, parts in groups.items()}
    spans, end = layout(groups)
    block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(end, 1)))
    return cat_into(block, groups, spans)


def _lists(items: list[dict[str, Any]]) -> dict[str, list]:
    """The per-frame lists of a batch: segment records and instances, one entry per frame."""
    out: dict[str, list] = {}
    for k in ("segments_info", "instances"):
        if k in items[0]:
            out[k] = [x for i in items for x in i[k]]
    return out


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Any]:
    """b clips of T frames -> (b*T) x 3 x c x c images, (b*T) x c x c labels, (b*T) x 2
    extents (clip-major); segment maps likewise, weak-shot image labels (b*T) x K, segment
    records and instances as one list entry per frame (their counts vary from frame to
    frame; instance masks stay bool at the crop size). Dtypes are kept (uint8 images). In a
    worker the tensors are views of one shared-memory block (`_cat_all`)."""
    out: dict[str, Any] = _cat_all({k: [i[k] for i in items] for k in _TENSOR_KEYS if k in items[0]})
    out.update(_lists(items))
    return out


class CollateClips:
    """`collate_clips` that, in a DataLoader worker, writes the batch into a free slot of
    `slots` and sends only a `SlotBatch` (data/slots.py); `TrainLoader` turns it back into the
    batch in the training process. Without a free slot (or without slots) it is `collate_clips`."""

    def __init__(self, slots: BatchSlots | None) -> None:
        self.slots = slots

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any] | SlotBatch:
        info = torch.utils.data.get_worker_info()
        if self.slots is not None and info is not None:
            sent = self.slots.write(info.id, {k: [i[k] for i in items] for k in _TENSOR_KEYS if k in items[0]},
                                    _lists(items))
            if sent is not None:
                return sent
        return collate_clips(items)


class _Batches:
    """A `TrainLoader`'s iterator: the DataLoader's batches, a `SlotBatch` turned into its
    tensors (views of the slot) in this process; with pinned memory the DataLoader's pin
    thread has already done that (`SlotBatch.pin_memory`)."""

    def __init__(self, it: Iterator[Any]) -> None:
        self.it = it

    def __iter__(self) -> "_Batches":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.it)
        return batch.tensors() if isinstance(batch, SlotBatch) else batch

    def worker_pids(self) -> list[int]:
        """The process ids of the DataLoader's workers (none in-process)."""
        return [w.pid for w in getattr(self.it, "_workers", [])]


class TrainLoader(torch.utils.data.DataLoader):
    """The training DataLoader (`make_loader`): batches from its workers arrive through
    shared-memory slots (`CollateClips`); iterating it yields the batch dicts."""

    def __iter__(self) -> _Batches:  # type: ignore[override]
        return _Batches(super().__iter__())


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
                pin_memory: bool = False) -> TrainLoader:
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
    workers, prefetch = cfg.data.num_workers, 4
    # Slots per worker: its prefetched batches, the batch in the training step and the one before it.
    slots = make_slots(workers, prefetch + 2, batch_bytes(stream.micro * cfg.model.clip_len, cfg.model.img_size,
                                                          ds.num_classes, segments, novel is not None))
    return TrainLoader(
        data, batch_sampler=stream, num_workers=workers, collate_fn=CollateClips(slots),
        worker_init_fn=worker_init, generator=torch.Generator().manual_seed(cfg.seed + info.rank),
        persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None, pin_memory=pin_memory)
