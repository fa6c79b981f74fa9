"""Evaluation on shards (`rankseg eval`), for every model family.

Test protocol (docs/method.md sec. 5 and 8): resize the image so that its short side is
`eval.short_side` (long side <= `eval.max_long`), predict (whole image, sliding window,
multi-scale / flip), resize the logits back to the ORIGINAL label size, argmax. Metrics: a K x K
confusion matrix (mIoU = nanmean over classes with union > 0, aAcc, per-class IoU, subsets),
and from the multi-label probabilities vs the image's GT classes: per-class AP averaged over
classes with positives ("mAP") and recall@kappa. Panoptic shards and a family that predicts
segments: PQ / SQ / RQ as panopticapi's pq_compute (panoptic.py). Video shards (VSPW) and a
family that segments: VSPW's video consistency VC_8 / VC_16 as well
(evaluation/video_consistency.py; docs/video.md). A video instance model (YouTube-VIS) is also
scored by the track AP of whole-video inference (engine/video_results.py `evaluate_tracks`).
`score` is what picks a run's best checkpoint: track AP for a video instance model, else PQ
when measured, else mIoU, else (a classifier) mAP.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.convert.coco_panoptic_format import CocoPanopticWriter, categories_of, image_id_of
from rankseg_core.data.augment import TestTransform, build_test_transform
from rankseg_core.data.loading import worker_init
from rankseg_core.data.weak_shot import WeakShotSplit, load_split
from rankseg_core.engine.video_results import check_results_target, evaluate_tracks, write_results
from rankseg_core.errors import UserError
from rankseg_core.evaluation.accumulators import EvalAccumulators, reduce_across_processes
from rankseg_core.evaluation.metrics import ConfusionMatrix
from rankseg_core.evaluation.panoptic_quality import gt_from_shard
from rankseg_core.evaluation.video_consistency import VSPW_WINDOWS, VideoConsistency
from rankseg_core.evaluation.video_instances import VisScores
from rankseg_core.evaluation.weak_shot import base_novel_scores
from rankseg_core.families import family_of
from rankseg_core.families.base import Family, InferenceProtocol, Predictions
from rankseg_core.model.selection import SelectionOptions, batch_selection
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.shards.splits import default_split
from rankseg_core.utils import distributed as D
from rankseg_core.utils import lock
from rankseg_core.utils.environment import sibling_record, write_record_file
from rankseg_core.utils.fsio import atomic_write_bytes, atomic_write_json, check_writable_target
from rankseg_core.utils.progress import Progress


@dataclass
class EvalOptions:
    """What `rankseg eval` can change; None = the run's config (`cfg.eval`)."""

    # None: the run's validation split (`data.val_split`); on other shards (`run_evaluation`
    # with data_root) their validation split by name (shards/splits.py).
    split: str | None = None
    data_root: str | None = None  # None = the run's data.root
    mode: str | None = None  # whole | slide
    scales: list[float] | None = None
    flip: bool | None = None
    selection: SelectionOptions = field(default_factory=SelectionOptions)  # --kappa, --oracle, ...
    max_images: int = 0  # 0 = the whole split
    save_predictions: Path | None = None  # 16-bit PNG of train ids per image
    save_panoptic: Path | None = None  # panoptic predictions in the COCO panoptic format (PNG + JSON)
    # Video instance runs: where results.json goes (None: `run_evaluation` puts it next to the report)
    save_results: Path | None = None
    progress: bool = True
    # Weak-shot metrics (BaseIoU / NovelIoU, evaluation/weak_shot.py) over these novel train ids;
    # None: the run's own split (data.novel_classes), if it is a weak-shot run.
    novel_classes: list[int] | None = None

    def check(self) -> None:
        """UserError naming the option for a value no evaluation can use."""
        if self.mode is not None and self.mode not in ("whole", "slide"):
            raise UserError(f"--mode {self.mode!r}: use whole or slide")
        self.selection.check()
        if self.scales is not None:
            bad = [s for s in self.scales if not 0 < s <= MAX_SCALE]  # NaN fails too
            if bad or not self.scales:
                raise UserError(f"--scales {','.join(f'{s:g}' for s in self.scales)}: every scale must be > 0 and "
                                f"at most {MAX_SCALE:g} (e.g. 0.75,1.0,1.25)")
        if self.max_images < 0:
            raise UserError(f"--max-images {self.max_images}: must be >= 0 (0 = the whole split)")

    def protocol(self, cfg: TrainConfig) -> InferenceProtocol:
        """The test protocol: these options over the run's `eval.*`."""
        return InferenceProtocol(self.mode or cfg.eval.mode, tuple(self.scales or cfg.eval.scales),
                            cfg.eval.flip if self.flip is None else self.flip)


# Test-time scales multiply the test size (eval.short_side); beyond 8x a 512 short side is a
# 4096 x 16384 input, more than any model here was meant for (and the memory to match).
MAX_SCALE = 8.0


def check_selection(family: Family, m: ModelConfig, opts: SelectionOptions) -> None:
    """UserError, before any work, for selection options this run's model cannot honour (the
    family says what its model can do: rank the classes, select among them)."""
    opts.check()
    what = f"this run ({m.model}: {family.describe(m)})"
    if (opts.oracle or opts.dynamic_kappa is not None) and not family.segments:
        flag = "--oracle" if opts.oracle else "--dynamic-kappa"
        raise UserError(f"{flag} changes which classes a segmentation model classifies pixels over; {what} segments "
                        "nothing: a classifier is scored by mAP and recall@kappa (use --kappa)")
    if opts.oracle_fill is not None and m.oracle:
        raise UserError(f"--oracle-fill: {what} always selects the GT classes (GT train + eval oracle)")
    ranked = family.ranks(m)
    if opts.oracle_fill == "ranked" and not ranked:
        raise UserError(f"--oracle-fill ranked fills from the model's class ranking; {what} has none "
                        "(use --oracle-fill random)")
    if opts.dynamic_kappa is not None and not (ranked and family.selects(m)):
        raise UserError(f"--dynamic-kappa selects the classes the model ranks above a threshold; {what} does not "
                        "select among ranked classes")
    if opts.kappa is not None and not ranked and opts.oracle_fill != "random":
        raise UserError(f"--kappa sets how many ranked classes are kept; {what} ranks no classes (with "
                        "--oracle --oracle-fill random it is the size the GT classes are filled up to)")


@dataclass
class EvalResult:
    # miou, aacc, map, recall_at_kappa, num_images, kappa, vc ({n: VC_n} or None), vis (YouTube-VIS
    # AP summary or None), score
    metrics: dict[str, Any]
    confusion: ConfusionMatrix
    ap: np.ndarray  # K, per-class AP (NaN without positives)
    vis: VisScores | None = None  # video instance runs: the track scores
    results: list[dict[str, Any]] | None = None  # their submission entries (evaluate_model want_results)

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]


# ---------------------------------------------------------------------------------------
# Data


def is_video(ds: ShardDataset) -> bool:
    """Whether every sample is a frame of a named video (VSPW-like shards)."""
    videos = np.asarray(ds.arrays.video)
    return bool(len(videos)) and bool(np.all(videos != ""))


def eval_clips(ds: ShardDataset, clip_len: int, max_images: int = 0) -> list[tuple[list[int], list[bool]]]:
    """Frames grouped as the model consumes them: ([sample ids], [is real frame]) per item.

    Images: one frame per item, in shard order. Video models: consecutive non-overlapping
    chunks of T frames per video; the last chunk repeats its final frame (padding frames are
    not scored). Video shards are walked video by video in frame order for T = 1 as well, so
    video consistency sees every video's frames in temporal order.
    """
    n = len(ds) if not max_images else min(max_images, len(ds))
    if clip_len == 1 and not is_video(ds):
        return [([i], [True]) for i in range(n)]
    a = ds.arrays
    order = np.lexsort((a.frame[:n], np.asarray(a.video[:n])))
    items, video = [], np.asarray(a.video)
    start = 0
    while start < n:
        v = video[order[start]]
        end = start
        while end < n and video[order[end]] == v and end - start < clip_len:
            end += 1
        ids = [int(i) for i in order[start:end]]
        real = [True] * len(ids) + [False] * (clip_len - len(ids))
        items.append((ids + [ids[-1]] * (clip_len - len(ids)), real))
        start = end
    return items


def rank_items(ds: ShardDataset, items: list[tuple[list[int], list[bool]]], rank: int,
               world: int) -> list[tuple[list[int], list[bool]]]:
    """The items process `rank` of `world` evaluates: every W-th item; on video shards every
    W-th video, whole and in order instead, because a video's consistency windows cannot be
    split between processes (VideoConsistency refuses a video fed to two processes)."""
    if world == 1 or not is_video(ds):
        return items[rank::world]
    video = ds.arrays.video
    names: dict[str, int] = {}  # video -> its order of first appearance (eval_clips groups videos)
    for ids, _ in items:
        names.setdefault(video[ids[0]], len(names))
    return [item for item in items if names[video[item[0][0]]] % world == rank]


class EvalData(torch.utils.data.Dataset):
    """Item -> {image T x 3 x H' x W', labels [T x (H x W)], classes, keys, real, videos,
    frames}."""

    def __init__(self, ds: ShardDataset, items: list[tuple[list[int], list[bool]]], transform: TestTransform) -> None:
        self.ds, self.items, self.transform = ds, items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, real = self.items[i]
        frames = [self.ds.load(j) for j in ids]
        images = [self.transform(f["image"]) for f in frames]
        if len({im.shape for im in images}) > 1:
            raise UserError(f"{self.ds.index.root}: frames of one video differ in size ({frames[0]['key']})")
        item = {"image": torch.from_numpy(np.stack(images)), "labels": [f["label"] for f in frames],
                "classes": [f["classes"] for f in frames], "keys": [f["key"] for f in frames], "real": real,
                "videos": [f["video"] for f in frames], "frames": [int(f["frame"]) for f in frames]}
        if "segments" in frames[0]:  # panoptic shards: the GT segments for PQ
            item["segments"] = [(f["segments"], f["segments_info"]) for f in frames]
        return item


def _collate(items: list[dict]) -> list[dict]:
    return items


# ---------------------------------------------------------------------------------------
# Evaluation


def _safe_name(key: str) -> str:
    """The file stem a sample's saved prediction gets (what `eval-predictions` matches)."""
    from rankseg_core.convert.detectron2_format import file_stem  # the one '/' -> '__' rule

    return file_stem(key)


def _check_unique_names(keys: list[str], option: str) -> None:
    """UserError when two sample keys give one file name ('a/b' and 'a__b'): one prediction
    would overwrite the other (--save-predictions) or be refused half-way (--save-panoptic)."""
    seen: dict[str, str] = {}
    for key in keys:
        name = _safe_name(key)
        if name in seen:
            raise UserError(f"{option}: samples {seen[name]!r} and {key!r} would both be saved as {name}.png "
                            "(keys are saved with '/' -> '__'); rename one of them in the shards")
        seen[name] = key


def write_label_png(path: Path, label: np.ndarray) -> None:
    """H x W train ids -> 16-bit PNG, atomically."""
    ok, buf = cv2.imencode(".png", label.astype(np.uint16))
    if not ok:  # pragma: no cover - uint16 2-D arrays always encode
        raise RuntimeError(f"PNG encoding failed for {path}")
    atomic_write_bytes(path, buf.tobytes())


@torch.no_grad()
def evaluate_model(model: nn.Module, cfg: TrainConfig, opts: EvalOptions, device: torch.device,
                   want_results: bool = False) -> EvalResult:
    """Evaluate `model` on a shard split; under DDP each process takes every W-th item and
    the accumulators are reduced (every process gets the result). want_results: a video
    instance model also returns its results.json entries (`EvalResult.results`)."""
    info, family = D.current(), family_of(cfg.model.model)
    if opts.split is None:
        opts = replace(opts, split=cfg.data.val_split or "val")
    ds = _open_split(cfg, opts)
    opts.check()
    check_selection(family, cfg.model, opts.selection)
    protocol = opts.protocol(cfg)
    kappa = opts.selection.kappa or cfg.model.effective_kappa
    items = eval_clips(ds, cfg.model.clip_len, opts.max_images)
    loader = _loader(ds, rank_items(ds, items, info.rank, info.world_size), cfg, family.data_config(model))
    acc = EvalAccumulators.create(cfg.model.num_classes, ignore_index=IGNORE, kappa=kappa,
                                  thing_classes=ds.index.thing_classes if ds.index.is_panoptic else None)
    segmented = family.segments
    vc = VideoConsistency(VSPW_WINDOWS) if segmented and is_video(ds) else None
    writers = _Writers(opts, ds, info)
    total = sum(sum(real) for _, real in items)
    clip_len = cfg.model.clip_len
    with Progress(total, f"eval {opts.split}", unit="img", enabled=opts.progress and info.is_main) as bar:
        for batch in loader:
            preds: dict[str, np.ndarray] = {}  # key -> predicted label map, for video consistency
            for frames in same_size_groups(batch):
                # One class list (and fill seed) per clip: the T frames share one selection, and
                # a random oracle fill drawn per frame would give a clip up to T x kappa classes.
                classes, keys = clip_classes(frames.classes, frames.keys, clip_len)
                sel = batch_selection(opts.selection, cfg.model, classes, device, keys)
                res = family.predict(model, cfg, frames.images.to(device), frames.sizes, protocol, sel)
                ml = res.ml.repeat_interleave(clip_len, dim=0) if res.ml is not None else None
                for j in (j for j, real in enumerate(frames.real) if real):
                    _score_frame(acc, writers, frames, j, res, ml)
                    if vc is not None and res.semantic is not None:
                        preds[frames.keys[j]] = res.semantic[j].cpu().numpy()
                bar.advance(sum(frames.real))
            if vc is not None:
                _feed_videos(vc, batch, preds)
    writers.close()
    m = acc.reduce(device).compute()
    vc_scores = reduce_across_processes(vc, device).compute() if vc is not None else None
    # A video instance model is also scored as its benchmark scores it: tracks of whole videos, AP.
    vis, results = evaluate_tracks(model, cfg, ds, opts.max_images, want_results, opts.progress, device) \
        if family.instances(cfg.model) else (None, None)
    score = (vis.ap if vis is not None else m["pq"]["all"]["pq"] if m["pq"] else m["miou"] if segmented
             else m["map"])
    metrics = {"miou": m["miou"], "aacc": m["aacc"], "map": m["map"], "recall_at_kappa": m["recall_at_kappa"],
               "num_images": total, "kappa": kappa, "pq": m["pq"], "segmentation": segmented,
               "vc": vc_scores, "vis": vis.summary() if vis is not None else None, "score": score}
    assert acc.confusion is not None  # EvalAccumulators.create always makes one
    novel = cfg.data.novel_classes if opts.novel_classes is None else opts.novel_classes
    if segmented and novel is not None:  # the selection score stays mIoU, as the official runs
        metrics["weak_shot"] = base_novel_scores(acc.confusion, novel)
    return EvalResult(metrics, acc.confusion, m["ap"], vis, results)


def clip_classes(classes: list[np.ndarray], keys: list[str], clip_len: int) -> tuple[list[np.ndarray], list[str]]:
    """Per-frame GT class lists and keys -> one per clip of `clip_len` frames: the union of the
    clip's classes and its first frame's key (what seeds a random oracle fill)."""
    if clip_len == 1:
        return classes, keys
    if len(classes) % clip_len or len(keys) != len(classes):
        raise ValueError(f"{len(classes)} frames do not make clips of {clip_len}")
    merged = [np.unique(np.concatenate([np.asarray(c, np.int64).reshape(-1) for c in classes[i:i + clip_len]]))
              for i in range(0, len(classes), clip_len)]
    return merged, keys[::clip_len]


def _feed_videos(vc: VideoConsistency, batch: list[dict], preds: dict[str, np.ndarray]) -> None:
    """Feed a batch's real frames to video consistency in item order (size groups may reorder
    items; items are in video and frame order, `eval_clips`), each with its GT label map."""
    for item in batch:
        for key, label, video, frame, real in zip(item["keys"], item["labels"], item["videos"], item["frames"],
                                                  item["real"]):
            if real and key in preds:
                vc.update(video, preds[key], label, frame)


def _open_split(cfg: TrainConfig, opts: EvalOptions) -> ShardDataset:
    root = opts.data_root or cfg.data.root
    assert opts.split is not None  # evaluate_model names it first
    ds = ShardDataset(root, opts.split)
    if ds.num_classes != cfg.model.num_classes:
        raise UserError(f"{root}: K={ds.num_classes} but the model was trained with K={cfg.model.num_classes}; "
                        "evaluate on shards of the same dataset")
    return ds


def _loader(ds: ShardDataset, items: list[tuple[list[int], list[bool]]], cfg: TrainConfig,
            dc: dict[str, Any]) -> torch.utils.data.DataLoader:
    data = EvalData(ds, items, build_test_transform(cfg, dc["mean"], dc["std"]))
    workers = cfg.eval.num_workers if len(items) > 8 else 0  # worker start-up costs more than tiny splits
    return torch.utils.data.DataLoader(data, batch_size=cfg.eval.batch_size, num_workers=workers,
                                       collate_fn=_collate, worker_init_fn=worker_init)


@dataclass
class _Frames:
    """Equally sized frames of a loader batch, stacked: images F x 3 x H' x W' and per frame its
    label (h x w), GT classes, key, whether it is real (not clip padding) and GT segments."""

    images: torch.Tensor
    labels: list[np.ndarray]
    classes: list[np.ndarray]
    keys: list[str]
    real: list[bool]
    segments: list[Any]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [(int(lab.shape[0]), int(lab.shape[1])) for lab in self.labels]


def same_size_groups(batch: list[dict]) -> list[_Frames]:
    """A batch's items grouped by image size (equal sizes are stacked; others go one by one)."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for item in batch:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return [_Frames(torch.cat([g["image"] for g in group]), [lab for g in group for lab in g["labels"]],
                    [c for g in group for c in g["classes"]], [k for g in group for k in g["keys"]],
                    [r for g in group for r in g["real"]],
                    [s for g in group for s in g.get("segments", [None] * len(g["real"]))])
            for group in groups.values()]


def _score_frame(acc: EvalAccumulators, writers: _Writers, frames: _Frames, j: int, res: Predictions,
                 ml: torch.Tensor | None) -> None:
    """Add frame j's predictions to the accumulators and to the requested output files."""
    pred = res.semantic[j] if res.semantic is not None else None
    if pred is not None and acc.confusion is not None:
        acc.confusion.update(pred, torch.from_numpy(frames.labels[j].astype(np.int64)).to(pred.device))
        writers.label_map(frames.keys[j], pred)
    if ml is not None and acc.multilabel is not None:
        acc.multilabel.update(ml[j:j + 1], [frames.classes[j]])
    if res.panoptic is not None and acc.panoptic is not None:
        pan_tensor, pan_info = res.panoptic[j]
        pan_ids = pan_tensor.cpu().numpy()
        acc.panoptic.update(pan_ids, pan_info, *gt_from_shard(*frames.segments[j]))
        writers.panoptic(frames.keys[j], pan_ids, pan_info)


class _Writers:
    """The optional outputs of an evaluation: --save-predictions and --save-panoptic."""

    def __init__(self, opts: EvalOptions, ds: ShardDataset, info: D.DistInfo) -> None:
        from rankseg_core.utils import fsio

        self.pred_dir = Path(opts.save_predictions) if opts.save_predictions is not None else None
        saving = [option for out, option in ((self.pred_dir, "--save-predictions"),
                                             (opts.save_panoptic, "--save-panoptic")) if out is not None]
        if saving:
            _check_unique_names(list(ds.arrays.keys), saving[0])
        if self.pred_dir is not None:
            # The rule `predict --out` follows: never over files this command did not write.
            fsio.claim_out_dir(self.pred_dir, "rankseg eval --save-predictions", "--save-predictions",
                               lock.is_lock_file)
            D.barrier()  # every process has checked the directory before any writes a prediction
        self.pan = _panoptic_writer(opts, ds, info)

    def label_map(self, key: str, pred: torch.Tensor) -> None:
        if self.pred_dir is not None:
            write_label_png(self.pred_dir / f"{_safe_name(key)}.png", pred.cpu().numpy())

    def panoptic(self, key: str, pan_ids: np.ndarray, pan_info: list[dict]) -> None:
        if self.pan is not None:
            self.pan.add(image_id_of(key), f"{_safe_name(key)}.png", pan_ids, pan_info)

    def close(self) -> None:
        if self.pan is not None:
            self.pan.close()


def _panoptic_writer(opts: EvalOptions, ds: ShardDataset, info: D.DistInfo) -> CocoPanopticWriter | None:
    """The COCO panoptic writer of `--save-panoptic` (one process only: it writes one JSON)."""
    if opts.save_panoptic is None:
        return None
    if not ds.index.is_panoptic:
        raise UserError(f"--save-panoptic: {ds.index.root} is not a panoptic dataset; panoptic predictions are "
                        "written for panoptic shards (rankseg prepare coco-panoptic / ade20k-panoptic)")
    if info.enabled:
        raise UserError("--save-panoptic writes one JSON: run `rankseg eval` in one process (not under torchrun)")
    return CocoPanopticWriter(opts.save_panoptic, categories_of(ds.index.meta))


# ---------------------------------------------------------------------------------------
# Reports


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def read_class_subsets(path: str | Path, class_names: list[str]) -> dict[str, list[int]]:
    """{"base": [ids or names], "novel": [...]} -> {subset: sorted ids} (UserError if bad)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: class subset file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, list) for v in data.values()):
        raise UserError(f'{path}: expected {{"base": [ids or names], "novel": [...]}}')
    by_name = {n: i for i, n in enumerate(class_names)}
    k = len(class_names)
    out = {}
    for name, values in data.items():
        ids = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise UserError(f"{path}: '{name}' holds {v!r}; use train ids (0..{k - 1}) or class names")
            if isinstance(v, str):
                if v not in by_name:
                    raise UserError(f"{path}: '{name}' names an unknown class {v!r} (not in the run's class names)")
                v = by_name[v]
            if not 0 <= v < k:
                raise UserError(f"{path}: '{name}' holds class id {v}, outside 0..{k - 1}")
            ids.append(int(v))
        out[str(name)] = sorted(set(ids))
    return out


def report(res: EvalResult, cfg: TrainConfig, subsets: dict[str, list[int]] | None = None,
           extra_config: dict | None = None) -> dict[str, Any]:
    """The JSON `rankseg eval` writes (no segmentation keys for a family that does not segment,
    no "pq" where PQ was not measured; "vc8" / "vc16" on video shards, null when no window of
    that many frames had GT-consistent pixels; "vis" for a video instance model: YouTube-VIS AP,
    AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l, per-class AP, `score` = its AP)."""
    names = cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)]
    iou = res.confusion.iou()
    seg = {
        "miou": _num(res["miou"]), "aacc": _num(res["aacc"]),
        "per_class": {n: _num(v) for n, v in zip(names, iou.tolist())},
        "subsets": {name: {"miou": _num(res.confusion.miou(ids)), "num_classes": len(ids)}
                    for name, ids in (subsets or {}).items()},
        **_weak_shot_keys(res.metrics.get("weak_shot")),
    } if res["segmentation"] else {}
    return {
        **seg, "map": _num(res["map"]), "recall_at_kappa": _num(res["recall_at_kappa"]),
        "score": _num(res["score"]), **({"pq": res["pq"]} if res["pq"] else {}),
        **{f"vc{n}": _num(v) for n, v in (res.metrics.get("vc") or {}).items()},
        **({"vis": {**{k: _num(v) for k, v in res.vis.summary().items()}, "num_videos": res.vis.num_videos,
                    "per_class_ap": {n: _num(v) for n, v in zip(names, res.vis.per_class_ap.tolist())}}}
           if res.vis is not None else {}),
        "num_images": res["num_images"],
        "config": {"model": cfg.model.model, "head": "oracle" if cfg.model.oracle else cfg.model.head,
                   "num_classes": cfg.model.num_classes, "kappa": res["kappa"], "dataset": cfg.data.name,
                   **(extra_config or {})},
    }


def _split_record(cfg: TrainConfig, split: WeakShotSplit | None) -> dict[str, Any]:
    """Which weak-shot split a report's base / novel means are over (the run's own, or
    `--novel-classes`): its name or file and SHA-256; nothing for other evaluations."""
    if split is not None:
        return {"novel_classes": split.spec, "novel_classes_sha256": split.sha256}
    if cfg.data.novel_classes is not None:
        return {"novel_classes": cfg.data.weak_shot or "data.novel_classes",
                "novel_classes_sha256": cfg.data.weak_shot_sha256 or None}
    return {}


def _weak_shot_keys(ws: dict[str, Any] | None) -> dict[str, Any]:
    """A weak-shot evaluation's report keys: base_iou, novel_iou, base_acc, novel_acc (the
    official means) and "weak_shot" {num_base, num_novel, base_averaged, novel_averaged}."""
    if ws is None:
        return {}
    means = ("base_iou", "novel_iou", "base_acc", "novel_acc")
    return {**{k: _num(ws[k]) for k in means}, "weak_shot": {k: v for k, v in ws.items() if k not in means}}


def per_class_csv(res: EvalResult, cfg: TrainConfig) -> str:
    """id,name,iou,acc,gt_pixels,pred_pixels,ap (empty = undefined)."""
    names = cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)]
    m = res.confusion.matrix
    iou, acc = res.confusion.iou(), res.confusion.acc()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "name", "iou", "acc", "gt_pixels", "pred_pixels", "ap"])
    def fmt(x):
        return (f"{x:.6f}" if math.isfinite(x) else "")
    for i, name in enumerate(names):
        w.writerow([i, name, fmt(iou[i]), fmt(acc[i]), int(m[i].sum()), int(m[:, i].sum()), fmt(res.ap[i])])
    return buf.getvalue()


def write_report(json_path: Path, res: EvalResult, cfg: TrainConfig, subsets: dict[str, list[int]] | None = None,
                 extra_config: dict | None = None) -> tuple[Path, Path]:
    """Write the JSON and `<stem>_per_class.csv` next to it; returns both paths."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, report(res, cfg, subsets, extra_config))
    csv_path = json_path.with_name(json_path.stem + "_per_class.csv")
    atomic_write_bytes(csv_path, per_class_csv(res, cfg).encode())
    return json_path, csv_path


# ---------------------------------------------------------------------------------------
# Run-level entry points (what the CLI calls)


def default_json(run_dir: str | Path, cfg: TrainConfig, data_root: Path, split: str) -> Path:
    """Where `rankseg eval` writes by default: RUN/eval/<split>.json for the run's own shards
    (as always), RUN/eval/<dataset>-<split>-<hash>.json for other shards (`--data`), where
    <hash> is 8 hex digits of the SHA-256 of their absolute path. So evaluating on other shards
    never replaces an earlier result, even of other shards with the same dataset name."""
    from rankseg_core.engine.runs import run_paths

    eval_dir = run_paths(run_dir).eval_dir
    if data_root == Path(cfg.data.root).resolve():
        return eval_dir / f"{_plain(split)}.json"
    tag = hashlib.sha256(str(data_root).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return eval_dir / f"{_plain(ShardIndex(data_root).name)}-{_plain(split)}-{tag}.json"


def _plain(name: str) -> str:
    """A dataset / split name (from an untrusted dataset.json or the command line) as a plain
    file name part: no separators, no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")[:80] or "_"


def _results_path(run_dir: str | Path, cfg: TrainConfig, opts: EvalOptions, report_path: Path,
                  data_root: Path) -> Path | None:
    """Where a video instance run's results.json goes (`--save-results`, else next to the report
    as `<report stem>_results.json`), checked before the evaluation; None for other runs."""
    from rankseg_core.engine.runs import run_paths

    family = family_of(cfg.model.model)
    if not family.instances(cfg.model):
        if opts.save_results is not None:
            raise UserError(f"--save-results: this run ({cfg.model.model}: {family.describe(cfg.model)}) predicts no "
                            "video instance tracks; YouTube-VIS results need an instance run "
                            "(model.mask2former.task=instance)")
        return None
    target = Path(opts.save_results) if opts.save_results else report_path.with_name(report_path.stem + "_results.json")
    run = run_paths(run_dir)
    index = ShardIndex(data_root)
    inputs = [data_root / "dataset.json", *index.shard_paths(opts.split or ""), report_path, run.config, run.metrics,
              run.last, run.best, run.weights]
    check_results_target(target, inputs)
    return target


def run_evaluation(run_dir: str | Path, opts: EvalOptions, json_path: str | Path | None = None,
                   classes_json: str | Path | None = None, device: str = "auto",
                   weights: str = "auto", novel_classes: str | None = None) -> tuple[dict[str, Any], Path, Path]:
    """Load a run, evaluate it, write the JSON (default: see `default_json`) and the per-class
    CSV and the environment record (`<stem>_env.json`) next to it. Returns (report, json
    path, csv path).

    Holds a lock on that JSON file name (not on RUN: evaluating while the run trains is fine),
    and on `opts.save_predictions`, so two evaluations never write the same files at once. A
    video instance run also writes its results.json (`_results_path`; lock: the report's).
    `novel_classes`: a weak-shot split (built-in name or JSON file) whose BaseIoU / NovelIoU to
    report, for any run (default: a weak-shot run's own split).
    """
    from rankseg_core.engine.runs import find_weights, load_run

    opts.check()
    dev = D.resolve_device(device)
    model, cfg = load_run(run_dir, dev, weights)
    subsets = read_class_subsets(classes_json, cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)]) \
        if classes_json else None
    ws_split = load_split(novel_classes, cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)],
                          cfg.data.name, "--novel-classes") if novel_classes else None
    if ws_split is not None:
        opts = replace(opts, novel_classes=list(ws_split.novel))
    data_root = Path(opts.data_root or cfg.data.root).resolve()
    split = opts.split
    if split is None:
        # The run's own shards: the split it validated on; other shards (or a run trained
        # without evaluation): their validation split by name.
        own = data_root == Path(cfg.data.root).resolve() and cfg.data.val_split
        split = cfg.data.val_split if own else default_split(data_root, ShardIndex(data_root).splits, "val",
                                                               "--split NAME")
        opts = replace(opts, split=split)
    path = Path(json_path) if json_path else default_json(run_dir, cfg, data_root, split)
    check_writable_target(path)  # /dev/full, a directory: refused before hours of evaluation
    check_writable_target(sibling_record(path))  # <stem>_env.json: what produced the report
    results = _results_path(run_dir, cfg, opts, path, data_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        held.enter_context(lock.dir_lock(path.parent, "eval", name=f"{lock.LOCK_NAME}.{path.name}"))
        for out_dir, what in ((opts.save_predictions, "--save-predictions"), (opts.save_panoptic, "--save-panoptic")):
            if out_dir is not None:
                Path(out_dir).mkdir(parents=True, exist_ok=True)
                held.enter_context(lock.dir_lock(out_dir, f"eval {what}"))
        res = evaluate_model(model, cfg, opts, dev, want_results=results is not None)
        if results is not None and res.results is not None:
            write_results(results, res.results)
        protocol = opts.protocol(cfg)
        extra = {"split": opts.split, "data": str(data_root),
                 "weights": str(find_weights(run_dir, weights)), "mode": protocol.mode,
                 "scales": list(protocol.scales), "flip": bool(protocol.flip),
                 "short_side": cfg.eval.short_side, "max_long": cfg.eval.max_long,
                 "crop": cfg.eval.crop, "stride": cfg.eval.stride,
                 "dynamic_kappa": opts.selection.dynamic_kappa,
                 "oracle": bool(opts.selection.oracle or cfg.model.oracle), "oracle_fill": opts.selection.oracle_fill,
                 **_split_record(cfg, ws_split),
                 **({"results": str(results)} if results is not None else {})}
        json_out, csv_out = write_report(path, res, cfg, subsets, extra)
        write_record_file(sibling_record(path), what="eval")
    return report(res, cfg, subsets, extra), json_out, csv_out
