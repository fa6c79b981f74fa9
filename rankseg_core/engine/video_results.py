"""YouTube-VIS tracks of a trained video instance model over a shard split: `results.json`
(`rankseg predict-vis`) and their AP (`rankseg eval`, the periodic evaluation).

Walks the split video by video (frames in `frame` order), feeds each whole video to the
family's `predict_tracks` at the run's test size (the test transform of the evaluation),
writes the tracks at the frames' original size in the challenge's submission format
(`evaluation.video_instances.write_results`), video ids from `video_ids` (the release JSON's
with `videos_json`, else 1..N in name order).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.data.augment import build_test_transform
from rankseg_core.errors import UserError
from rankseg_core.evaluation.accumulators import reduce_across_processes
from rankseg_core.evaluation.video_instances import (
    PredictedTrack,
    VideoInstanceEval,
    VisScores,
    ground_truth_videos,
    results_entries,
    video_ids,
    write_results,
)
from rankseg_core.families import family_of
from rankseg_core.inference.video_instances import TOP_K
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils import distributed as D
from rankseg_core.utils import jsonio
from rankseg_core.utils.fsio import check_writable_target, read_regular
from rankseg_core.utils.progress import Progress


def video_frames(ds: ShardDataset) -> dict[str, list[int]]:
    """Video name -> its sample ids in frame order (names sorted). Frames must be 0..n-1: a
    submission has one mask per frame of the video, and with skipped frames which frame a mask
    is for would be unknown."""
    a = ds.arrays
    rows: dict[str, list[int]] = {}
    for i, v in enumerate(a.video):
        if not v:
            raise UserError(f"{ds.index.root}: sample {a.keys[i]} of split {ds.split!r} is not a video frame: "
                            "give the shards of a video dataset (rankseg prepare youtube-vis)")
        rows.setdefault(str(v), []).append(i)
    out: dict[str, list[int]] = {}
    for name in sorted(rows):
        idx = sorted(rows[name], key=lambda i: int(a.frame[i]))
        frames = [int(a.frame[i]) for i in idx]
        if frames != list(range(len(frames))):
            raise UserError(f"{ds.index.root}: video {name} of split {ds.split!r} does not have frames 0..n-1 "
                            "(skipped or --limit): convert the whole video to predict it")
        out[name] = idx
    return out


def check_results_target(path: Path, inputs: list[Path]) -> None:
    """Refuse an output path that is an input, or an existing file that is not a results list
    (a results.json written earlier may be replaced)."""
    check_writable_target(path)
    if not os.path.lexists(path):
        return
    if any(p.exists() and os.path.samefile(path, p) for p in inputs):
        raise UserError(f"{path} is an input of this command: choose another --out")
    try:
        ours = isinstance(jsonio.loads(read_regular(path, "results file", 1 << 33)), list)
    except (OSError, ValueError, UserError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and is not a results.json (a JSON list): it would be overwritten; "
                        "choose another --out")


def video_tracks(model: nn.Module, cfg: TrainConfig, ds: ShardDataset, videos: Mapping[str, list[int]],
                 top_k: int = TOP_K) -> Iterator[tuple[str, list[PredictedTrack]]]:
    """(video name, its top-k tracks) for each video of `videos` (name -> sample ids in frame
    order, `video_frames`), in that order: each video whole as one clip at the run's test size,
    the masks at the frames' original size. Only one video's frames are held at a time."""
    family = family_of(cfg.model.model)
    predict_tracks = family.track_predictor(cfg.model)
    dc = family.data_config(model)
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    device = next(model.parameters()).device
    for name, idx in videos.items():
        frames = [ds.load(i)["image"] for i in idx]
        sizes = {f.shape[:2] for f in frames}
        if len(sizes) > 1:
            raise UserError(f"{ds.index.root}: the frames of video {name} differ in size {sorted(sizes)}")
        size = (int(frames[0].shape[0]), int(frames[0].shape[1]))
        images = torch.from_numpy(np.stack([tf(f) for f in frames])).to(device)
        del frames  # the decoded frames are not needed once normalised
        yield name, predict_tracks(model, cfg, images, size, top_k)


def evaluate_tracks(model: nn.Module, cfg: TrainConfig, ds: ShardDataset, max_images: int = 0,
                    keep_results: bool = False, progress: bool = False,
                    device: torch.device | None = None) -> tuple[VisScores, list[dict[str, Any]] | None]:
    """YouTube-VIS AP of a video instance model on a split of converted shards (what
    `rankseg eval` and the periodic evaluation of an instance run report).

    Each video is predicted whole (`video_tracks`) and scored against its tracks rebuilt from
    the shards (`ground_truth_videos`), video ids 1..N in name order. max_images > 0: only the
    first videos (in name order) until that many frames are reached, at least one. Under DDP
    the i-th video goes to process i mod W and the per-video matchings are merged (every process
    gets the scores). keep_results: also return the submission entries (`results_entries`) of
    every video, gathered in video order; otherwise no mask outlives its video.
    """
    root, split = ds.index.root, ds.split
    if not ds.has_instances():
        raise UserError(f"{root}: split {split!r} has no annotated tracks (valid / test labels are only on the "
                        "evaluation server): evaluate a split converted with annotations, or write results.json "
                        "with `rankseg predict-vis` and submit it")
    videos = video_frames(ds)
    if max_images:
        kept: dict[str, list[int]] = {}
        frames = 0
        for name, idx in videos.items():
            if kept and frames + len(idx) > max_images:
                break
            kept[name], frames = idx, frames + len(idx)
        videos = kept
    info = D.current()
    ids = video_ids(root, split)
    ev = VideoInstanceEval(cfg.model.num_classes)
    entries: list[tuple[int, list[dict[str, Any]]]] = []
    mine = {name: idx for n, (name, idx) in enumerate(videos.items()) if n % info.world_size == info.rank}
    gts = ground_truth_videos(root, split, ids, only=mine)  # this process's videos only
    with Progress(len(mine), f"tracks {split}", unit="video", enabled=progress and info.is_main) as bar:
        for (name, tracks), gt in zip(video_tracks(model, cfg, ds, mine), gts, strict=True):
            if gt.name != name:  # pragma: no cover - both walk the split's videos in name order
                raise RuntimeError(f"video order differs: {name} vs {gt.name}")
            ev.update(gt.video_id, gt.tracks, tracks)
            if keep_results:
                entries.append((gt.video_id, results_entries(gt.video_id, tracks)))
            bar.advance()
    ev = reduce_across_processes(ev, device)
    if not keep_results:
        return ev.compute(), None
    gathered = [e for part in D.all_gather_objects(entries) for e in part]
    return ev.compute(), [e for _, part in sorted(gathered, key=lambda x: x[0]) for e in part]


def write_video_results(model: nn.Module, cfg: TrainConfig, data: str | Path, split: str, out_json: str | Path,
                        videos_json: str | Path | None = None, top_k: int = TOP_K,
                        inputs: list[Path] | None = None) -> int:
    """Predict every video of `split` whole and write `out_json`; returns the number of entries.

    model: a video instance model in eval mode (`runs.load_run`); cfg its TrainConfig. inputs:
    further files `out_json` must not be (the run's files).
    """
    data, out_json = Path(data), Path(out_json)
    family_of(cfg.model.model).track_predictor(cfg.model)  # a model without tracks: refused first
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: keep at least 1 track per video")
    ds = ShardDataset(data, split)
    if ds.num_classes != cfg.model.num_classes:
        raise UserError(f"{data}: K={ds.num_classes} but the model was trained with K={cfg.model.num_classes}; "
                        "predict shards of the same dataset")
    files = [data / "dataset.json", *ds.paths, *([Path(videos_json)] if videos_json else []), *(inputs or [])]
    check_results_target(out_json, files)  # refused before the (long) inference, not after it
    ids = video_ids(data, split, videos_json)
    entries: list[dict[str, Any]] = []
    for name, tracks in video_tracks(model, cfg, ds, video_frames(ds), top_k):
        entries.extend(results_entries(ids[name], tracks))
    write_results(out_json, entries)
    return len(entries)


def write_run_results(run_dir: str | Path, data: str | Path, split: str, out_json: str | Path,
                      videos_json: str | Path | None = None, device: str = "auto", weights: str = "auto",
                      top_k: int = TOP_K) -> int:
    """`write_video_results` for the model of a run directory (what `rankseg predict-vis` runs)."""
    from rankseg_core.engine import runs

    run = runs.run_paths(run_dir)
    protect = [run.config, run.metrics, run.last, run.best, run.weights]
    check_results_target(Path(out_json), protect)  # before loading the model
    model, cfg = runs.load_run(run_dir, device, weights)
    return write_video_results(model, cfg, data, split, out_json, videos_json, top_k, protect)

