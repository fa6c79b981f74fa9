"""YouTube-VIS 2019 scoring: AP / AR of video instance tracks with the spatio-temporal mask IoU.

Written from the definition in the official API (youtubevos/cocoapi, PythonAPI/pycocotools/
ytvoseval.py), not from its code:

- a track is one mask (RLE) or None per frame of its video; the IoU of a predicted track d
  and a ground-truth track g is  sum_t |d_t ∩ g_t| / sum_t |d_t ∪ g_t|  over the frames (a
  frame where one is None adds the other's area to the union; None in both adds nothing;
  an empty union gives 0);
- per video and category the predictions are sorted by score (stable: file order breaks
  ties), the top 100 kept, and matched greedily to ground truth as COCO does, at the IoU
  thresholds .50:.05:.95; crowd tracks (`iscrowd`) are "ignore" ground truth that may absorb
  any number of predictions. Unlike COCO, the crowd IoU is the plain IoU above (the API
  never passes `iscrowd` to its IoU);
- a track's area is the mean of its non-zero per-frame areas ("avg_area"); area ranges
  small / medium / large are [0, 128²], [128², 256²], [256², 1e10] (not COCO's 32² / 96²);
- precision at 101 recall thresholds and recall per category, area range and maxDets
  (1, 10, 100) accumulate over videos in video-id order; AP averages precision over IoU
  thresholds, recall thresholds and the categories that have non-crowd ground truth.

`VideoInstanceEval` is an accumulator (evaluation/accumulators.py `Accumulator`): `update`
takes one whole video, computes its IoU matrices at once and keeps only those (D x G floats
per video and category), scores, areas and crowd flags, never a mask; `state` / `merge` let
processes reduce it; `compute` does the matching and accumulation.

The submission format (`results.json`, what the challenge server takes): a JSON list of
{"video_id": int, "category_id": int, "score": float, "segmentations": [RLE or null per
frame]} with compressed RLE {"size": [h, w], "counts": str}. `category_id` = train id + 1
(the 2019 release's ids 1..40). Video ids: `video_ids` below.
"""

from __future__ import annotations

from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_utils

from rankseg_core.convert.geometry import GeometryError, check_counts_string, check_rle_dict
from rankseg_core.errors import UserError
from rankseg_core.shards.read import ShardIndex, open_shard
from rankseg_core.utils import jsonio
from rankseg_core.utils.fsio import atomic_write_json, read_regular

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # linspace, not arange: .5 + 9 * .05 must be exactly .95
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)
MAX_DETS = (1, 10, 100)
# The YouTube-VIS API's ranges (COCO's are 32² / 96²): label -> [lo, hi], both inclusive.
AREA_RANGES: dict[str, tuple[float, float]] = {
    "all": (0.0, 1e10), "small": (0.0, 128.0 ** 2), "medium": (128.0 ** 2, 256.0 ** 2),
    "large": (256.0 ** 2, 1e10)}
MAX_RESULTS_BYTES = 8 << 30  # a full valid-set submission is some hundred MB

Rle = dict[str, Any]  # {"size": [h, w], "counts": bytes | str}, compressed


@dataclass(frozen=True)
class Track:
    """A ground-truth track: train id, one compressed RLE or None per frame, crowd flag."""

    category: int
    masks: Sequence[Rle | None]
    iscrowd: bool = False


@dataclass(frozen=True)
class PredictedTrack:
    """A predicted track: train id, confidence, one compressed RLE or None per frame."""

    category: int
    score: float
    masks: Sequence[Rle | None]


class VisScores(NamedTuple):
    """`VideoInstanceEval.compute()`: fractions in [0, 1]; NaN where the API prints -1."""

    ap: float
    ap50: float
    ap75: float
    aps: float
    apm: float
    apl: float
    ar1: float
    ar10: float
    ar100: float
    ars: float
    arm: float
    arl: float
    per_class_ap: np.ndarray  # (K,) AP at all areas, 100 detections; NaN: no non-crowd GT
    precision: np.ndarray  # T x R x K x A x M, -1 where undefined (the API's `precision`)
    recall: np.ndarray  # T x K x A x M, -1 where undefined
    num_videos: int

    def summary(self) -> dict[str, float]:
        """The twelve numbers of the API's summary, by name."""
        return {k: getattr(self, k) for k in ("ap", "ap50", "ap75", "aps", "apm", "apl", "ar1", "ar10",
                                              "ar100", "ars", "arm", "arl")}


# One (video, category) cell: what matching needs, no masks.
# (scores D, dt_area D, gt_crowd G, gt_area G, ious D x G); D <= 100, sorted by score.
Cell = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _area(masks: Sequence[Rle | None]) -> tuple[np.ndarray, float]:
    """Per-frame areas (0 for None) and the API's avg_area: mean of the non-zero ones."""
    areas = np.array([0 if m is None else int(mask_utils.area(m)) for m in masks], np.int64)
    nz = areas[areas > 0]
    return areas, float(nz.mean()) if nz.size else 0.0


def spatio_temporal_iou(dts: Sequence[Sequence[Rle | None]], gts: Sequence[Sequence[Rle | None]]) -> np.ndarray:
    """D x G: sum over frames of |d ∩ g| / sum over frames of |d ∪ g| (0 for an empty union).

    All sequences have the same number of frames; masks of a frame have the same size.
    """
    d_n, g_n = len(dts), len(gts)
    if not d_n or not g_n:
        return np.zeros((d_n, g_n))
    inter = np.zeros((d_n, g_n), np.int64)
    d_area = np.array([_area(d)[0].sum() for d in dts], np.int64)
    g_area = np.array([_area(g)[0].sum() for g in gts], np.int64)
    for t in range(len(dts[0])):
        di = [i for i in range(d_n) if dts[i][t] is not None]
        gi = [j for j in range(g_n) if gts[j][t] is not None]
        if not di or not gi:
            continue
        d_rle = [dts[i][t] for i in di]
        # With every gt flagged crowd, pycocotools' iou is |d ∩ g| / |d|: times |d| it is the
        # exact integer intersection (both < 2^31, far inside a double's exact range).
        ratio = np.asarray(mask_utils.iou(d_rle, [gts[j][t] for j in gi], [1] * len(gi)), np.float64)
        ratio = ratio.reshape(len(di), len(gi))
        da = np.array([mask_utils.area(r) for r in d_rle], np.float64)
        inter[np.ix_(di, gi)] += np.rint(ratio * da[:, None]).astype(np.int64)
    union = d_area[:, None] + g_area[None, :] - inter
    return np.divide(inter, union, out=np.zeros((d_n, g_n)), where=union > 0)


def _match(ious: np.ndarray, gt_ignore: np.ndarray, crowd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy COCO matching of score-sorted detections to gt (sorted: ignored gt last).

    Returns matched (T x D bool) and ignored (T x D bool: matched to an ignored gt)."""
    t_n, (d_n, g_n) = len(IOU_THRESHOLDS), ious.shape
    matched = np.zeros((t_n, d_n), bool)
    ignored = np.zeros((t_n, d_n), bool)
    for ti, thr in enumerate(IOU_THRESHOLDS):
        taken = np.zeros(g_n, bool)
        for d in range(d_n):
            best, m = min(thr, 1 - 1e-10), -1
            for g in range(g_n):
                if taken[g] and not crowd[g]:
                    continue
                if m > -1 and not gt_ignore[m] and gt_ignore[g]:
                    break  # a regular match beats any ignored gt that follows
                if ious[d, g] < best:
                    continue
                best, m = ious[d, g], g
            if m > -1:
                matched[ti, d], ignored[ti, d] = True, bool(gt_ignore[m])
                taken[m] = True
    return matched, ignored


class VideoInstanceEval:
    """YouTube-VIS AP / AR over videos; see the module docstring for the definition."""

    reduce_by_sum = False  # the state is per-video cells: gathered, not summed

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self._videos: dict[int, dict[int, Cell]] = {}

    @property
    def num_videos(self) -> int:
        return len(self._videos)

    def update(self, video_id: int, tracks: Sequence[Track], predictions: Sequence[PredictedTrack]) -> None:
        """Add one whole video: its ground-truth tracks and predicted tracks.

        Every track has the same number of frames and a frame's masks the same size (checked:
        ValueError). Each video may be added once; a video without tracks or predictions
        still counts (it contributes nothing but its id).
        """
        video_id = int(video_id)
        if video_id in self._videos:
            raise ValueError(f"video {video_id} was added twice")
        everything: list[Track | PredictedTrack] = [*tracks, *predictions]
        lengths = {len(x.masks) for x in everything}
        if len(lengths) > 1:
            raise ValueError(f"video {video_id}: tracks have different frame counts {sorted(lengths)}")
        for t in range(lengths.pop() if lengths else 0):
            sizes = {tuple(m["size"]) for x in everything if (m := x.masks[t]) is not None}
            if len(sizes) > 1:
                raise ValueError(f"video {video_id}, frame {t}: masks of different sizes {sorted(sizes)}")
        for x in everything:
            if not 0 <= x.category < self.num_classes:
                raise ValueError(f"video {video_id}: category {x.category} outside [0, {self.num_classes})")
        cells: dict[int, Cell] = {}
        for k in sorted({x.category for x in everything}):
            gt = [g for g in tracks if g.category == k]
            dt = [p for p in predictions if p.category == k]
            scores = np.array([p.score for p in dt], np.float64)
            order = np.argsort(-scores, kind="mergesort")[:MAX_DETS[-1]]  # stable: file order breaks ties
            dt = [dt[i] for i in order]
            cells[k] = (scores[order], np.array([_area(p.masks)[1] for p in dt], np.float64),
                        np.array([bool(g.iscrowd) for g in gt], bool),
                        np.array([_area(g.masks)[1] for g in gt], np.float64),
                        spatio_temporal_iou([p.masks for p in dt], [g.masks for g in gt]))
        self._videos[video_id] = cells

    def state(self) -> dict[str, Any]:
        """{"num_classes", "videos": {video id: {category: (scores, dt_area, gt_crowd, gt_area,
        ious)}}}; picklable, what `merge` takes."""
        return {"num_classes": self.num_classes, "videos": self._videos}

    def merge(self, other: VideoInstanceEval | dict[str, Any]) -> VideoInstanceEval:
        """Add another evaluator's videos (or its `state()`) in place; returns self."""
        s = other.state() if isinstance(other, VideoInstanceEval) else other
        if s["num_classes"] != self.num_classes:
            raise ValueError("cannot merge video instance evaluators with different num_classes")
        both = set(self._videos) & set(s["videos"])
        if both:
            raise ValueError(f"videos {sorted(both)[:5]} were added to both evaluators")
        for vid, cells in s["videos"].items():
            self._videos[int(vid)] = dict(cells)
        return self

    def compute(self) -> VisScores:
        """Match, accumulate and summarise as the API's evaluate / accumulate / summarize."""
        t_n, r_n, k_n = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), self.num_classes
        ranges = list(AREA_RANGES.values())
        a_n, m_n = len(ranges), len(MAX_DETS)
        precision = -np.ones((t_n, r_n, k_n, a_n, m_n))
        recall = -np.ones((t_n, k_n, a_n, m_n))
        per_cat: dict[int, list[Cell]] = {}
        for vid in sorted(self._videos):  # the API's order: ties across videos by video id
            for k, cell in self._videos[vid].items():
                per_cat.setdefault(k, []).append(cell)
        for k, cells in per_cat.items():
            for a, (lo, hi) in enumerate(ranges):
                evals = [_evaluate_cell(cell, lo, hi) for cell in cells]
                for m, max_det in enumerate(MAX_DETS):
                    scores = np.concatenate([e[0][:max_det] for e in evals])
                    order = np.argsort(-scores, kind="mergesort")
                    tps = np.concatenate([e[1][:, :max_det] for e in evals], axis=1)[:, order]
                    ign = np.concatenate([e[2][:, :max_det] for e in evals], axis=1)[:, order]
                    n_gt = sum(int(np.count_nonzero(~e[3])) for e in evals)
                    if n_gt == 0:
                        continue  # only crowd / out-of-range gt: undefined, -1
                    tp = np.cumsum(tps & ~ign, axis=1, dtype=np.float64)
                    fp = np.cumsum(~tps & ~ign, axis=1, dtype=np.float64)
                    for t in range(t_n):
                        rc = tp[t] / n_gt
                        pr = tp[t] / (tp[t] + fp[t] + np.spacing(1))
                        recall[t, k, a, m] = rc[-1] if len(rc) else 0.0
                        pr = np.maximum.accumulate(pr[::-1])[::-1]  # precision envelope
                        inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
                        q = np.zeros(r_n)
                        ok = inds < len(pr)  # recall never reached: precision 0
                        q[ok] = pr[inds[ok]]
                        precision[t, :, k, a, m] = q
        labels = list(AREA_RANGES)

        def mean(x: np.ndarray) -> float:
            x = x[x > -1]
            return float(x.mean()) if x.size else float("nan")

        def ap(thr: float | None = None, area: str = "all") -> float:
            p = precision[:, :, :, labels.index(area), m_n - 1]
            return mean(p if thr is None else p[np.isclose(IOU_THRESHOLDS, thr)])

        def ar(max_det: int, area: str = "all") -> float:
            return mean(recall[:, :, labels.index(area), MAX_DETS.index(max_det)])

        per_class = np.array([mean(precision[:, :, k, 0, m_n - 1]) for k in range(k_n)])
        return VisScores(ap(), ap(0.5), ap(0.75), ap(area="small"), ap(area="medium"), ap(area="large"),
                         ar(1), ar(10), ar(100), ar(100, "small"), ar(100, "medium"), ar(100, "large"),
                         per_class, precision, recall, len(self._videos))


def _evaluate_cell(cell: Cell, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scores D, matched T x D, ignored T x D, gt ignored G) of one (video, category) cell
    for the area range [lo, hi]."""
    scores, dt_area, crowd, gt_area, ious = cell
    gt_ignore = crowd | (gt_area < lo) | (gt_area > hi)
    g_order = np.argsort(gt_ignore, kind="mergesort")  # ignored gt last, otherwise in order
    matched, ignored = _match(ious[:, g_order], gt_ignore[g_order], crowd[g_order])
    # an unmatched detection outside the range is not a false positive of this range
    ignored |= ~matched & ((dt_area < lo) | (dt_area > hi))[None, :]
    return scores, matched, ignored, gt_ignore


# ---------------------------------------------------------------------------------------
# Ground truth from shards, the submission format, scoring a file


@dataclass(frozen=True)
class GtVideo:
    """One video of a split: release name, id in the submission, frame sizes, tracks."""

    name: str
    video_id: int
    sizes: list[tuple[int, int]]  # (h, w) per frame, frame order
    tracks: list[Track]


def video_ids(data: str | Path, split: str, videos_json: str | Path | None = None) -> dict[str, int]:
    """Video name -> the `video_id` of the submission format.

    With `videos_json` (the release's `valid.json` / `train.json`): its own ids, the name being
    the folder of the video's first file name, as the converter names videos. Without it: 1..N
    in the order of the sorted video names (the order of dataset.json's `videos`), which is how
    the official JSONs number their videos (ids 1..N in the `videos` list, sorted by name).
    """
    index = ShardIndex(data)
    names = sorted(index.split_meta(split).get("videos", {}))
    if not names:
        raise UserError(f"{Path(data) / 'dataset.json'}: split {split!r} has no videos: give the shards of a "
                        "video dataset (rankseg prepare youtube-vis)")
    if videos_json is None:
        return {n: i + 1 for i, n in enumerate(names)}
    return release_video_ids(videos_json, names, f"the shards' split {split!r}")


def release_video_ids(videos_json: str | Path, names: Sequence[str], what: str) -> dict[str, int]:
    """Video name -> id from a YouTube-VIS release JSON (`videos` [{id, file_names}], the name
    being the folder of a video's first file name) for each of `names` (UserError naming the
    first one the JSON lacks; `what` says where the names come from)."""
    path = Path(videos_json)
    try:
        doc = jsonio.loads(read_regular(path, "YouTube-VIS JSON", MAX_RESULTS_BYTES))
        ids = {Path(v["file_names"][0]).parent.name: int(v["id"]) for v in doc["videos"]}
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc}): give the release's JSON") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{path}: not a YouTube-VIS JSON with 'videos' [{{id, file_names}}] ({exc})") from None
    missing = [n for n in names if n not in ids]
    if missing:
        raise UserError(f"{path}: has no video {missing[0]} of {what} ({len(missing)} missing): give the JSON "
                        "the videos come from")
    return {n: ids[n] for n in names}


def ground_truth_videos(data: str | Path, split: str, ids: Mapping[str, int],
                        only: Container[str] | None = None) -> Iterator[GtVideo]:
    """The split's videos in name order, each with its tracks rebuilt from the per-frame
    `instances` JSON (one RLE or None per frame). Frames must be 0..n-1 (a converted video
    with skipped frames cannot be scored: which frame a submission's mask is for is unknown).
    only: the names of the videos to read (one process's share); None = all."""
    index = ShardIndex(data)
    arrays = index.arrays(split)
    paths = index.shard_paths(split)
    rows: dict[str, list[int]] = {}
    for i, v in enumerate(arrays.video):
        if v:
            rows.setdefault(v, []).append(i)
    files: dict[int, Any] = {}
    try:
        for name in sorted(rows):
            if only is not None and name not in only:
                continue
            idx = sorted(rows[name], key=lambda i: int(arrays.frame[i]))
            frames = [int(arrays.frame[i]) for i in idx]
            if frames != list(range(len(frames))):
                raise UserError(f"{Path(data)}: video {name} of split {split!r} has frames {_ranges(frames)}, "
                                "not 0..n-1 (skipped or --limit): convert the whole video to score it")
            per_track: dict[int, tuple[int, bool, list[Rle | None]]] = {}
            for t, i in enumerate(idx):
                shard = int(arrays.shard[i])
                if shard not in files:
                    files[shard] = open_shard(paths[shard])
                where = f"{paths[shard]}: sample {arrays.keys[i]}"
                try:
                    insts = jsonio.loads(files[shard]["instances"].asstr()[int(arrays.row[i])] or "[]")
                    for inst in insts:
                        tid, cat, crowd = int(inst["track_id"]), int(inst["category"]), bool(inst["iscrowd"])
                        rle = inst["rle"]
                        h, w = int(arrays.height[i]), int(arrays.width[i])
                        counts = check_rle_dict(rle, h, w)
                        check_counts_string(str(counts).encode(), h, w)
                        entry = per_track.setdefault(tid, (cat, crowd, [None] * len(idx)))
                        entry[2][t] = {"size": [h, w], "counts": str(counts).encode()}
                except (KeyError, TypeError, ValueError, OSError) as exc:  # GeometryError is a ValueError
                    raise UserError(f"{where}: instances do not read ({exc}); run `rankseg verify`") from None
            tracks = [Track(c, m, crowd) for _, (c, crowd, m) in sorted(per_track.items())]
            yield GtVideo(name, ids[name], [(int(arrays.height[i]), int(arrays.width[i])) for i in idx], tracks)
    finally:
        for f in files.values():
            f.close()


def _ranges(frames: list[int]) -> str:
    return f"{frames[:6]}{'...' if len(frames) > 6 else ''}"


def read_results(path: str | Path, videos: Mapping[int, GtVideo], num_classes: int) -> dict[int, list[PredictedTrack]]:
    """Parse and check a submission (`results.json`) against the videos it is scored on.

    Returns video id -> predicted tracks in file order (the order breaks score ties). Any
    problem is one UserError naming the file, the entry and the fix.
    """
    path = Path(path)
    try:
        doc = jsonio.loads(read_regular(path, "results file", MAX_RESULTS_BYTES))
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc}): give the results.json to score") from None
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}): give the results.json that predict or eval wrote") from None
    if not isinstance(doc, list):
        raise UserError(f"{path}: the top level is a {type(doc).__name__}, not a list of "
                        "{video_id, category_id, score, segmentations}")
    out: dict[int, list[PredictedTrack]] = {vid: [] for vid in videos}
    for n, e in enumerate(doc):
        where = f"{path}: entry {n}"
        if not isinstance(e, dict) or not {"video_id", "category_id", "score", "segmentations"} <= set(e):
            raise UserError(f"{where} is not {{video_id, category_id, score, segmentations}}")
        vid, cat, score, segs = e["video_id"], e["category_id"], e["score"], e["segmentations"]
        if not _is_int(vid) or vid not in videos:
            raise UserError(f"{where}: video_id {vid!r} is not a video of these shards: results of another "
                            "dataset or split, or another id mapping (see --videos-json)")
        if not _is_int(cat) or not 1 <= cat <= num_classes:
            raise UserError(f"{where}: category_id {cat!r} is outside 1..{num_classes} (train id + 1): results "
                            "of another model or label set")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise UserError(f"{where}: score {score!r} is not a number")
        video = videos[vid]
        if not isinstance(segs, list) or len(segs) != len(video.sizes):
            got = len(segs) if isinstance(segs, list) else type(segs).__name__
            raise UserError(f"{where}: {got} segmentations for the {len(video.sizes)} frames of video {vid} "
                            f"({video.name}): one RLE or null per frame")
        masks: list[Rle | None] = []
        for t, (seg, (h, w)) in enumerate(zip(segs, video.sizes)):
            if seg is None:
                masks.append(None)
                continue
            try:
                counts = check_rle_dict(seg, h, w)
                if not isinstance(counts, str):
                    raise GeometryError("RLE counts is a list: the submission format uses compressed RLE strings")
                check_counts_string(counts.encode(), h, w)  # pycocotools would read past a bad string
            except GeometryError as exc:
                raise UserError(f"{where}, frame {t} of video {vid} ({video.name}): {exc}") from None
            masks.append({"size": [h, w], "counts": counts.encode()})
        out[vid].append(PredictedTrack(cat - 1, float(score), masks))
    return out


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def results_entries(video_id: int, predictions: Sequence[PredictedTrack]) -> list[dict[str, Any]]:
    """A video's predictions as submission entries (category_id = train id + 1)."""
    def rle(m: Rle | None) -> dict[str, Any] | None:
        if m is None:
            return None
        c = m["counts"]
        return {"size": [int(m["size"][0]), int(m["size"][1])], "counts": c.decode() if isinstance(c, bytes) else c}

    return [{"video_id": int(video_id), "category_id": int(p.category) + 1, "score": float(p.score),
             "segmentations": [rle(m) for m in p.masks]} for p in predictions]


def write_results(path: str | Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """Write `results.json` (strict JSON, atomically)."""
    atomic_write_json(path, list(entries))


def score_results(results: str | Path, data: str | Path, split: str,
                  videos_json: str | Path | None = None) -> tuple[VisScores, list[str]]:
    """Score a submission against converted shards; returns the scores and the class names."""
    index = ShardIndex(data)
    ids = video_ids(data, split, videos_json)
    videos = {v.video_id: v for v in ground_truth_videos(data, split, ids)}
    if not any(v.tracks for v in videos.values()):
        raise UserError(f"{Path(data)}: split {split!r} has no annotated tracks (valid / test labels are only "
                        "on the evaluation server): score a split converted with annotations")
    preds = read_results(results, videos, index.num_classes)
    ev = VideoInstanceEval(index.num_classes)
    for vid in sorted(videos):
        ev.update(vid, videos[vid].tracks, preds[vid])
    return ev.compute(), index.class_names


def report(scores: VisScores, class_names: Sequence[str], results: str | Path, data: str | Path,
           split: str) -> dict[str, Any]:
    """The JSON report of `rankseg eval-vis` (NaN -> null when written)."""
    return {"metric": "youtube-vis", "results": str(results), "data": str(data), "split": split,
            **scores.summary(), "num_videos": scores.num_videos,
            "per_class_ap": {n: float(v) for n, v in zip(class_names, scores.per_class_ap)}}
