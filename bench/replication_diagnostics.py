"""The paper's precondition, measured on one trained run (issue 23; docs/replication.md,
"What this replication can decide").

RankSeg helps only when its multi-label head ranks an image's classes better than a ranking
read off the segmentation output itself: §4.2 of the paper gets mAP 62.52 from the head and
58.55 from the segmentation, and the selection from the latter gives no gain. `precondition`
measures both rankings of one run on a split, with the same AP as the engine's multi-label mAP:

- *ml head*: the run's sigmoid multi-label scores (None for a model without a ranking);
- *decoder*: per class, the maximum over the image's pixels of the decoder's softmax when
  every one of the K classes is scored (a RankSeg run is evaluated with kappa = K for this:
  its ranks past the trained kappa reuse the last rank's gamma / beta, as `--kappa` does).

On the synthetic data (docs/synthetic.md) the generator's world, rebuilt from dataset.json,
also says what the image's *scene* is, and `precondition` adds:

- *scene accuracy* of each ranking: the scene whose class set (its background and its
  object classes) holds the most of the ranking's top-kappa classes, ties broken by the
  higher mean score over the scene's classes, then by the lower scene index; it is correct
  when it is one of the image's scenes (`image_scenes`: every scene of the world whose class
  set holds all of the image's GT classes — one in the default world, possibly several where
  scenes share backgrounds);
- the *scene oracle*: mIoU with each image's selection replaced by its GT classes plus every
  class of its scenes (the GT (eval) oracle of `rankseg eval --oracle`, widened to the scene;
  not filled up to kappa), next to the run's own mIoU;
- where the wrongly labelled pixels of the run's own prediction go
  (`replication_report.error_makeup`): another GT class of the image, a scene-mate, a
  look-alike of another scene, another scene's background, or any other class.

Simplification: only Segmenter-family runs with dense inference (the replication's models);
other families are refused in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from replication_protocol import cached
from replication_report import error_makeup, image_scenes, related_classes, synthetic_world

SCENE_ERRORS = ("gt", "scene", "look", "background", "other")


# ---------------------------------------------------------------------------------------
# The synthetic world


def world_of(data_root: Path) -> Any | None:
    """The synthetic generator's world of a shard directory, or None (see
    `replication_report.synthetic_world`)."""
    return synthetic_world(data_root)


def scene_class_sets(world: Any) -> list[np.ndarray]:
    """Per scene: its sorted class ids (the background and the object classes)."""
    return [np.union1d([int(b)], np.asarray(objs, np.int64)) for b, objs in zip(world.scenes_bg,
                                                                                   world.scenes_objects)]


def predicted_scene(scores: np.ndarray, scene_sets: list[np.ndarray], kappa: int) -> int:
    """The scene a ranking points to: the most of its top-kappa classes in the scene's class
    set; ties by the higher mean score over the scene's classes, then the lower index.
    scores: (K,) one image's class scores."""
    top = np.zeros(scores.shape[0], bool)
    top[np.argsort(-scores, kind="stable")[:kappa]] = True
    keys = [(-int(top[c].sum()), -float(scores[c].mean()), s) for s, c in enumerate(scene_sets)]
    return min(keys)[2]


def related_with_backgrounds(world: Any, classes: np.ndarray) -> dict[str, np.ndarray]:
    """`related_classes` (scene-mates, look-alikes) plus "background": the background classes
    of the world the image does not show (K-bool masks; error_makeup counts each wrong pixel
    in the first set it belongs to, after the image's own classes)."""
    rel = related_classes(world, classes)
    bg = np.zeros(world.num_classes, bool)
    bg[np.asarray(world.scenes_bg, np.int64)] = True
    gt = np.zeros(world.num_classes, bool)
    gt[np.asarray(classes, np.int64)] = True
    return {**rel, "background": bg & ~gt}


# ---------------------------------------------------------------------------------------
# Scores from per-image arrays (what the tests check by hand)


def ranking_scores(score_lists: list[np.ndarray | None], classes: list[np.ndarray], kappa: int,
                   scene_sets: list[np.ndarray] | None, world: Any | None) -> dict[str, float | None]:
    """mAP (the engine's per-class AP over images, classes with a positive), recall@kappa and,
    with a world, scene accuracy of one ranking. score_lists: per image (K,) scores or None
    (no such ranking: every number None)."""
    from rankseg_core.evaluation.metrics import average_precision, recall_at_k

    if not score_lists or any(s is None for s in score_lists):
        return {"map": None, "recall": None, "scene_acc": None, "scene_images": None}
    scores = np.stack([np.asarray(s, np.float64) for s in score_lists])
    k = scores.shape[1]
    targets = np.zeros_like(scores, dtype=bool)
    for i, c in enumerate(classes):
        c = np.asarray(c, np.int64)
        targets[i, c[(c >= 0) & (c < k)]] = True
    out: dict[str, float | None] = {"map": average_precision(scores, targets)[0],
                                    "recall": recall_at_k(scores, targets, kappa),
                                    "scene_acc": None, "scene_images": None}
    if world is not None and scene_sets is not None:
        hits, n = 0, 0
        for s, c in zip(scores, classes):
            mine = image_scenes(world, c)
            if len(mine) == 0:  # no scene holds the image's classes: not a generator image
                continue
            n += 1
            hits += int(predicted_scene(s, scene_sets, kappa) in set(mine.tolist()))
        out["scene_acc"] = hits / n if n else None
        out["scene_images"] = float(n)
    return out


def decoder_ranking(probs: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) per-class maximum over pixels of a softmax over `classes` (probs C x H x W); the
    classes the softmax did not score get 0."""
    out = np.zeros(num_classes, np.float64)
    out[np.asarray(classes, np.int64)] = probs.reshape(probs.shape[0], -1).max(1)
    return out


def miou_of(preds: list[np.ndarray], labels: list[np.ndarray], num_classes: int) -> float:
    """The engine's mIoU (confusion matrix over labelled pixels, mean over classes with a
    non-empty union)."""
    from rankseg_core.evaluation.metrics import ConfusionMatrix
    from rankseg_core.shards.codec import IGNORE

    cm = ConfusionMatrix(num_classes, ignore_index=IGNORE)
    for p, lab in zip(preds, labels):
        cm.update(p.astype(np.int64), lab.astype(np.int64))
    return float(cm.miou())


# ---------------------------------------------------------------------------------------
# One run


def precondition(run_dir: Path, data_root: Path, kappa: int, split: str = "val", max_images: int | None = None,
                 device: str = "cpu") -> dict:
    """The precondition diagnostics of one trained run on `split` of `data_root` (module
    docstring): ml-head vs decoder ranking (mAP, recall@kappa, scene accuracy), the run's own
    mIoU, the scene oracle's mIoU (synthetic data only) and where the wrong pixels go.
    kappa: the top-kappa that scene accuracy reads (the replication's training kappa)."""
    import torch

    from rankseg_core.data.augment import build_test_transform
    from rankseg_core.errors import UserError
    from rankseg_core.families import family_of
    from rankseg_core.inference.dense import mmseg_scale_sizes, predict_probs
    from rankseg_core.model.selection import Selection
    from rankseg_core.viz.common import load_viz_run, open_split

    run = load_viz_run(run_dir, device)
    cfg, model = run.cfg, run.model
    m = cfg.model
    family = family_of(m.model)
    if not m.model.startswith("segmenter-"):
        raise UserError(f"{run_dir}: the precondition diagnostics score Segmenter runs (dense inference); this is a "
                        f"{m.model}")
    ds = open_split(data_root, split, [run])
    k = m.num_classes
    world = world_of(Path(data_root))
    scene_sets = scene_class_sets(world) if world is not None else None
    ranked = family.ranks(m) and not m.oracle
    dc = family.data_config(model)
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    dev = next(model.parameters()).device
    scales = tuple(cfg.eval.scales)

    def probs(x: torch.Tensor, size: tuple[int, int], sel: Selection):
        maps, ml = predict_probs(model, x, k, [size], scales, cfg.eval.flip, cfg.eval.mode, cfg.eval.crop,
                                 cfg.eval.stride, mmseg_scale_sizes(cfg.eval, x, [size], list(scales)), sel,
                                 patch=model.patch_size)
        return maps[0], ml

    n = len(ds) if max_images is None else min(max_images, len(ds))
    classes, labels, own, scene_pred = [], [], [], []
    ml_scores: list[np.ndarray | None] = []
    dec_scores: list[np.ndarray | None] = []
    related = []
    for i in range(n):
        item = ds.load(i)
        c = np.asarray(item["classes"], np.int64)
        x = torch.from_numpy(tf(item["image"]))[None].to(dev)
        size = tuple(item["label"].shape)
        gt = [torch.as_tensor(c, dtype=torch.long, device=dev)]
        # The run's own prediction, as `rankseg eval` makes it (a GT (train + eval) oracle
        # model gets its GT classes).
        maps, ml = probs(x, size, Selection(gt_classes=gt) if m.oracle else Selection())
        own.append(maps.argmax()[0].cpu().numpy())
        ml_scores.append(ml[0].float().cpu().numpy() if ml is not None and ranked else None)
        if ranked:  # the decoder over all K classes, for its own ranking
            maps, _ = probs(x, size, Selection(kappa=k))
        dec = maps.maps[0].float().cpu().numpy()
        dec_scores.append(decoder_ranking(dec, maps.classes.cpu().numpy(), k))
        if world is not None and scene_sets is not None and not m.oracle:
            mine = image_scenes(world, c)
            sel = np.union1d(c[(c >= 0) & (c < k)], np.concatenate([scene_sets[s] for s in mine]) if len(mine) else [])
            smaps, _ = probs(x, size, Selection(override=[torch.as_tensor(sel, dtype=torch.long, device=dev)]))
            scene_pred.append(smaps.argmax()[0].cpu().numpy())
            related.append(related_with_backgrounds(world, c))
        classes.append(c)
        labels.append(np.asarray(item["label"]))
    out: dict[str, Any] = {"run": str(run_dir), "split": split, "images": n, "kappa": kappa, "ranked": ranked,
                           "synthetic": world is not None}
    out |= {f"ml_{key}": v for key, v in ranking_scores(ml_scores, classes, kappa, scene_sets, world).items()}
    out |= {f"decoder_{key}": v for key, v in ranking_scores(dec_scores, classes, kappa, scene_sets, world).items()}
    out["miou"] = miou_of(own, labels, k)
    out["scene_oracle_miou"] = miou_of(scene_pred, labels, k) if scene_pred else None
    out["scene_oracle_gain"] = (out["scene_oracle_miou"] - out["miou"]) if scene_pred else None
    if related:
        out |= error_makeup(own, labels, classes, related)
    return out


def precondition_job(run_dir: str, out_json: str, data: str, kappa: int, threads: int) -> dict:
    """`precondition` of one run as a replication task, cached in out_json for the same
    weights (the run's stamp in its replicate.json), as bench/replicate.py's `eval_job`."""
    import time

    import torch

    from rankseg_core.utils.fsio import atomic_write_json

    torch.set_num_threads(threads)
    out = Path(out_json)
    stamp, hit = cached(run_dir, out, kappa=kappa)
    if hit is not None:
        return hit
    t = time.perf_counter()
    rec = precondition(Path(run_dir), Path(data), kappa)
    rec |= {"stamp": stamp, "seconds": time.perf_counter() - t}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, rec)
    return rec


def main(argv: list[str] | None = None) -> int:
    """`python bench/replication_diagnostics.py RUN... --data DIR --kappa K`: one JSON line per run."""
    import argparse
    import json

    from rankseg_core.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="trained Segmenter run directories")
    ap.add_argument("--data", type=Path, required=True, help="the shard directory the runs were trained on")
    ap.add_argument("--kappa", type=int, required=True, help="the top-kappa scene accuracy reads (training kappa)")
    ap.add_argument("--split", default="val")
    args = ap.parse_args(argv)
    try:
        for run in args.runs:
            print(json.dumps(precondition(run, args.data, args.kappa, args.split)), flush=True)
    except UserError as exc:
        print(f"error: {exc}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
