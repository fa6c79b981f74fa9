"""ADE20K panoptic PQ as the official evaluation computes it: panopticapi on the ground truth of
Mask2Former's `prepare_ade20k_pan_seg.py`, whose JSON keeps stuff areas from before the
instances were painted and keeps stuff records that end up fully covered.

The reference here is a line-by-line transcription of panopticapi's `pq_compute_single_core`
on dicts keyed by segment id (GT areas from the JSON records, predicted areas counted from the
PNG), independent of rankseg's vectorised `image_stats`.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from panoptic_trees import ade_official, ade_panoptic_tree, ade_things
from PIL import Image

from rankseg_core.convert.ade20k_panoptic import Ade20kPanopticMaker, panoptic_ids, prepare_ade20k_panoptic
from rankseg_core.convert.segments import segment_records
from rankseg_core.errors import SampleError
from rankseg_core.evaluation.panoptic_quality import PanopticQuality, gt_from_shard, image_stats
from rankseg_core.shards.read import ShardDataset

K = 150
VOID = 0
OFFSET = 1 << 24


# --- panopticapi, transcribed ---------------------------------------------------------------

def panopticapi_image(pan_gt: np.ndarray, gt_segments: list[dict], pan_pred: np.ndarray,
                      pred_segments: list[dict], stat: dict) -> None:
    """panopticapi's `pq_compute_single_core` body for one image; `stat[cat]` = [tp, fp, fn, iou]."""
    gt_segms = {el["id"]: dict(el) for el in gt_segments}
    pred_segms = {el["id"]: dict(el) for el in pred_segments}
    labels, labels_cnt = np.unique(pan_pred, return_counts=True)
    for label, label_cnt in zip(labels.tolist(), labels_cnt.tolist()):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(label)
        pred_segms[label]["area"] = label_cnt
    pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
    for label, intersection in zip(labels.tolist(), labels_cnt.tolist()):
        gt_pred_map[(label // OFFSET, label % OFFSET)] = intersection
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        if gt_segms[gt_label]["iscrowd"] == 1:
            continue
        if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
            continue
        union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
                 - gt_pred_map.get((VOID, pred_label), 0))
        iou = intersection / union
        if iou > 0.5:
            stat[gt_segms[gt_label]["category_id"]][0] += 1
            stat[gt_segms[gt_label]["category_id"]][3] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    crowd_labels_dict = {}
    for gt_label, gt_info in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_info["iscrowd"] == 1:
            crowd_labels_dict[gt_info["category_id"]] = gt_label
            continue
        stat[gt_info["category_id"]][2] += 1
    for pred_label, pred_info in pred_segms.items():
        if pred_label in pred_matched:
            continue
        intersection = gt_pred_map.get((VOID, pred_label), 0)
        if pred_info["category_id"] in crowd_labels_dict:
            intersection += gt_pred_map.get((crowd_labels_dict[pred_info["category_id"]], pred_label), 0)
        if intersection / pred_info["area"] > 0.5:
            continue
        stat[pred_info["category_id"]][1] += 1


def panopticapi_average(stat: dict, cats: list[int]) -> float:
    """`PQStat.pq_average`'s PQ over `cats`."""
    pq, n = 0.0, 0
    for c in cats:
        tp, fp, fn, iou = stat[c]
        if tp + fp + fn == 0:
            continue
        n += 1
        pq += iou / (tp + 0.5 * fp + 0.5 * fn)
    return pq / n


def new_stat() -> dict:
    return defaultdict(lambda: [0, 0, 0, 0.0])


def perfect_prediction(pan: np.ndarray, segments: list[dict]) -> tuple[np.ndarray, list[dict]]:
    """The official PNG itself as a prediction: a record for every id with pixels."""
    present = set(np.unique(pan).tolist())
    return pan.copy(), [{"id": s["id"], "category_id": s["category_id"]} for s in segments if s["id"] in present]


def rankseg_gt(semantic: np.ndarray, instance: np.ndarray, things: dict[int, int]) -> tuple[np.ndarray, list[dict]]:
    """The converter's records for one image, as the shard would hold them, read back for PQ."""
    ids, records = panoptic_ids(semantic, instance[..., 0], instance[..., 1], things, set(things.values()),
                                "sem.png", "inst.png")
    index, info = segment_records(ids, records, "sem.png + inst.png", json_areas=True)
    return gt_from_shard(index, info)


def pred_records(segments: list[dict]) -> list[dict]:
    return [{"id": s["id"], "category": s["category_id"]} for s in segments]


# --- the toy case of the issue --------------------------------------------------------------

def toy() -> tuple[np.ndarray, np.ndarray, dict[int, int], dict[str, int]]:
    """8 x 8: stuff A on rows 0-3 (32 px), stuff B on rows 4-7 cols 0-3 (16 px), unlabelled
    elsewhere; instance 1 (thing X) on rows 0-1 cols 0-3 (8 px, over A), instance 2 (thing Y)
    on rows 4-7 cols 0-3, covering B entirely."""
    things = ade_things()
    thing_values = set(things.values())
    stuff = [v for v in range(1, 151) if v not in thing_values]
    (r_x, x), (r_y, y) = sorted(things.items())[:2]
    assert x != y
    semantic = np.zeros((8, 8), np.uint8)
    semantic[:4] = stuff[0]
    semantic[4:, :4] = stuff[1]
    instance = np.zeros((8, 8, 3), np.uint8)
    instance[:2, :4] = (r_x, 1, 0)
    instance[4:, :4] = (r_y, 2, 0)
    return semantic, instance, things, {"A": stuff[0] - 1, "B": stuff[1] - 1, "X": x - 1, "Y": y - 1}


def test_toy_perfect_prediction_scores_as_panopticapi() -> None:
    semantic, instance, things, c = toy()
    pan, segments = ade_official(semantic, instance, things)
    # the official JSON: A keeps its 32 px (24 left), B keeps a record with no pixel left
    assert [(s["category_id"], s["area"]) for s in segments] == [(c["A"], 32), (c["B"], 16), (c["X"], 8),
                                                                  (c["Y"], 16)]
    pred, pred_segments = perfect_prediction(pan, segments)
    stat = new_stat()
    panopticapi_image(pan, segments, pred, pred_segments, stat)
    # by hand: A matched with IoU 24 / (24 + 32 - 24) = 0.75; B a false negative; X, Y IoU 1
    assert stat[c["A"]] == [1, 0, 0, 0.75] and stat[c["B"]] == [0, 0, 1, 0.0]
    official = panopticapi_average(stat, list(c.values()))
    assert official == pytest.approx((0.75 + 0 + 1 + 1) / 4)

    # rankseg on the official JSON records (image_stats takes their areas) ...
    pq = PanopticQuality(K, sorted(v - 1 for v in things.values()))
    pq.update(pred, pred_records(pred_segments), pan,
              [{"id": s["id"], "category": s["category_id"], "iscrowd": 0, "area": s["area"]} for s in segments])
    result = pq.compute()
    assert result["all"]["pq"] == pytest.approx(official)
    assert result["stuff"]["pq"] == pytest.approx(0.375) and result["things"]["pq"] == pytest.approx(1.0)
    # ... and on what the converter stores, read back by gt_from_shard
    pq.reset()
    gt_ids, gt_info = rankseg_gt(semantic, instance, things)
    pq.update(pred, pred_records(pred_segments), gt_ids, gt_info)
    assert pq.compute()["all"]["pq"] == pytest.approx(official)


def test_converter_records_are_the_official_json() -> None:
    semantic, instance, things, c = toy()
    pan, segments = ade_official(semantic, instance, things)
    ids, records = panoptic_ids(semantic, instance[..., 0], instance[..., 1], things, set(things.values()),
                                "sem.png", "inst.png")
    index, info = segment_records(ids, records, "x", json_areas=True)
    assert np.array_equal(ids, pan)
    assert [(r["category"], r.get("json_area", r["area"])) for r in info] == \
        [(s["category_id"], s["area"]) for s in segments]
    # pixel counts stay the stored "area"; the official one is stored only where it differs
    assert [(r["area"], "json_area" in r) for r in info] == [(24, True), (0, True), (8, False), (16, False)]
    assert not (index == 2).any()


def test_gt_record_without_pixels_is_a_false_negative() -> None:
    gt_map = np.ones((4, 4), int)
    pred_map = np.ones((4, 4), int)
    s = image_stats(pred_map, [{"id": 1, "category": 0}], gt_map,
                    [{"id": 1, "category": 0, "iscrowd": 0}, {"id": 2, "category": 3, "iscrowd": 0}], 5)
    assert s["tp"].tolist() == [1, 0, 0, 0, 0] and s["fn"].tolist() == [0, 0, 0, 1, 0]
    assert s["fp"].sum() == 0
    # a crowd record without pixels is not a false negative (panopticapi ignores crowd)
    s = image_stats(pred_map, [{"id": 1, "category": 0}], gt_map,
                    [{"id": 1, "category": 0, "iscrowd": 0}, {"id": 2, "category": 3, "iscrowd": 1}], 5)
    assert s["fn"].sum() == 0


def test_declared_area_below_the_pixel_count_is_refused() -> None:
    z = np.ones((3, 3), int)
    with pytest.raises(ValueError, match="area 8 is less than its 9 pixels"):
        image_stats(z, [{"id": 1, "category": 0}], z, [{"id": 1, "category": 0, "iscrowd": 0, "area": 8}], 2)
    with pytest.raises(ValueError, match="area must be an integer"):
        image_stats(z, [{"id": 1, "category": 0}], z, [{"id": 1, "category": 0, "iscrowd": 0, "area": 9.0}], 2)
    with pytest.raises(SampleError, match="segment 1 has area 8 in the JSON but 9 pixels"):
        segment_records(z, [(1, 0, 0, 8)], "x", json_areas=True)
    # without json_areas (COCO) a declared area must equal the pixel count, as before
    with pytest.raises(SampleError, match="area 10 in the JSON but 9 pixels"):
        segment_records(z, [(1, 0, 0, 10)], "x")


# --- random images: the converter + rankseg vs the script + panopticapi ----------------------

def random_ade(rng: np.random.Generator, things: dict[int, int], h: int = 24, w: int = 28):
    thing_values = sorted(set(things.values()))
    stuff_values = [v for v in range(1, 151) if v not in set(thing_values)]
    by_ade = {}
    for r, v in sorted(things.items()):
        by_ade.setdefault(v, r)
    vals = [0, *rng.choice(stuff_values, 4, replace=False), *rng.choice(thing_values, 2, replace=False)]
    semantic = np.kron(rng.choice(vals, (h // 4, w // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)
    instance = np.zeros((h, w, 3), np.uint8)
    for j in range(1, int(rng.integers(1, 7))):
        y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
        hh, ww = rng.integers(2, 14, 2)
        instance[y:y + hh, x:x + ww, :2] = (by_ade[int(rng.choice(thing_values[:5]))], j)
    return semantic, instance


def random_prediction(rng: np.random.Generator, pan: np.ndarray, segments: list[dict]):
    """The official segments, perturbed: some relabelled, rectangles painted with new segments or void."""
    pred = pan.copy()
    cats = {s["id"]: s["category_id"] for s in segments}
    for s in segments:
        if rng.random() < 0.2:
            cats[s["id"]] = int(rng.integers(0, K))
    next_id = max(cats, default=0) + 1
    h, w = pan.shape
    for _ in range(int(rng.integers(0, 4))):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        hh, ww = rng.integers(2, 12, 2)
        if rng.random() < 0.3:
            pred[y:y + hh, x:x + ww] = 0
        else:
            pred[y:y + hh, x:x + ww] = next_id
            cats[next_id] = int(rng.choice(list(cats.values())))
            next_id += 1
    present = set(np.unique(pred).tolist()) - {0}
    return pred, [{"id": i, "category_id": cats[i]} for i in sorted(present)]


def test_random_images_match_panopticapi_on_the_official_gt() -> None:
    rng = np.random.default_rng(17)
    things = ade_things()
    stat = new_stat()
    pq = PanopticQuality(K, sorted(v - 1 for v in things.values()))
    covered = overlapped = 0
    for _ in range(60):
        semantic, instance = random_ade(rng, things)
        pan, segments = ade_official(semantic, instance, things)
        covered += sum(not (pan == s["id"]).any() for s in segments)
        overlapped += sum(s["area"] > int((pan == s["id"]).sum()) for s in segments)
        pred, pred_segments = random_prediction(rng, pan, segments)
        panopticapi_image(pan, segments, pred, pred_segments, stat)
        pq.update(pred, pred_records(pred_segments), *rankseg_gt(semantic, instance, things))
    assert covered > 0 and overlapped > 5  # the cases where the two readings differ occur
    for c in range(K):
        tp, fp, fn, iou = stat[c]
        assert (int(pq.tp[c]), int(pq.fp[c]), int(pq.fn[c])) == (tp, fp, fn), c
        assert pq.iou[c] == pytest.approx(iou, rel=1e-12, abs=1e-12)
    seen = [c for c in range(K) if sum(stat[c][:3])]
    assert pq.compute()["all"]["pq"] == pytest.approx(panopticapi_average(stat, seen))


def random_coco(rng: np.random.Generator, h: int = 20, w: int = 24):
    """COCO-like GT (blocks, void, crowd of thing classes 0..1) whose JSON areas are pixel counts."""
    blocks = np.kron(rng.integers(0, 6, (h // 4, w // 4)), np.ones((4, 4), np.int64))
    ids = rng.choice(np.arange(1, 500), 6, replace=False)
    pan = np.where(blocks == 0, 0, ids[blocks])
    segments = []
    for b in range(1, 6):
        area = int((pan == ids[b]).sum())
        if area:
            cat = int(rng.integers(0, 5))
            segments.append({"id": int(ids[b]), "category_id": cat, "area": area,
                             "iscrowd": int(cat < 2 and rng.random() < 0.3)})
    return pan, segments


def test_coco_numbers_unchanged() -> None:
    """COCO's JSON areas are pixel counts and it has no empty records: scoring with or without
    the records' areas, and from shard records (no json_area), is panopticapi's number."""
    rng = np.random.default_rng(3)
    stat = new_stat()
    with_area, from_shard = PanopticQuality(5, [0, 1]), PanopticQuality(5, [0, 1])
    for _ in range(60):
        pan, segments = random_coco(rng)
        pred, pred_segments = random_prediction(rng, pan, segments)
        pred_segments = [{**s, "category_id": s["category_id"] % 5} for s in pred_segments]
        panopticapi_image(pan, segments, pred, pred_segments, stat)
        gt_info = [{"id": s["id"], "category": s["category_id"], "iscrowd": s["iscrowd"], "area": s["area"]}
                   for s in segments]
        with_area.update(pred, pred_records(pred_segments), pan, gt_info)
        # the shard's form: index map, records with pixel-count areas and no json_area
        index = np.zeros(pan.shape, np.int64)
        for i, s in enumerate(segments, 1):
            index[pan == s["id"]] = i
        gt_ids, shard_info = gt_from_shard(index, [{"id": s["id"], "category": s["category_id"],
                                                    "iscrowd": s["iscrowd"], "area": s["area"]} for s in segments])
        assert all("area" not in r for r in shard_info)
        from_shard.update(pred, pred_records(pred_segments), gt_ids, shard_info)
    for pq in (with_area, from_shard):
        assert pq.tp.tolist() == [stat[c][0] for c in range(5)]
        assert pq.fp.tolist() == [stat[c][1] for c in range(5)]
        assert pq.fn.tolist() == [stat[c][2] for c in range(5)]
        assert pq.iou.tolist() == pytest.approx([stat[c][3] for c in range(5)], rel=1e-12)


# --- the converter end to end ---------------------------------------------------------------

def test_shards_keep_fully_covered_stuff_records(tmp_path: Path) -> None:
    tree = ade_panoptic_tree(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1)
    prepare_ade20k_panoptic(tmp_path / "ADEChallengeData2016", tmp_path / "out")
    things = ade_things()
    empty = 0
    for split in ("training", "validation"):
        ds = ShardDataset(tmp_path / "out", split)
        for i in range(len(ds)):
            item = ds.load(i)
            img = tree[item["key"]]
            pan, segments = ade_official(img.semantic, img.instance, things)
            info = item["segments_info"]
            assert [r["category"] for r in info] == [s["category_id"] for s in segments]
            for j, (r, s) in enumerate(zip(info, segments), 1):
                assert r["area"] == int((pan == s["id"]).sum()) == int((item["segments"] == j).sum())
                empty += r["area"] == 0
    assert empty >= 1


def test_shards_score_as_panopticapi(tmp_path: Path) -> None:
    tree = ade_panoptic_tree(tmp_path / "ADEChallengeData2016", n_train=2, n_val=1)
    prepare_ade20k_panoptic(tmp_path / "ADEChallengeData2016", tmp_path / "out")
    things = ade_things()
    stat = new_stat()
    ds = ShardDataset(tmp_path / "out", "training")
    pq = PanopticQuality(K, ds.index.thing_classes)
    for i in range(len(ds)):
        item = ds.load(i)
        img = tree[item["key"]]
        pan, segments = ade_official(img.semantic, img.instance, things)
        assert [r.get("json_area", r["area"]) for r in item["segments_info"]] == [s["area"] for s in segments]
        pred, pred_segments = perfect_prediction(pan, segments)
        panopticapi_image(pan, segments, pred, pred_segments, stat)
        pq.update(pred, pred_records(pred_segments), *gt_from_shard(item["segments"], item["segments_info"]))
    seen = [c for c in range(K) if sum(stat[c][:3])]
    assert pq.compute()["all"]["pq"] == pytest.approx(panopticapi_average(stat, seen))


# --- messages -------------------------------------------------------------------------------

def test_bad_semantic_value_names_the_semantic_png(tmp_path: Path) -> None:
    root = tmp_path / "ADEChallengeData2016"
    tree = ade_panoptic_tree(root, n_train=1, n_val=1)
    key = sorted(tree)[0]
    img = tree[key]
    sem = img.semantic.copy()
    sem[0, 0] = 151
    Image.fromarray(sem).save(img.paths["semantic"])
    things = ade_things()
    image, semantic, instance = (str(img.paths[k].relative_to(root)) for k in ("image", "semantic", "instance"))
    files = {key: (image, semantic, instance)}
    maker = Ade20kPanopticMaker(str(root), files, things, K)
    with pytest.raises(SampleError) as err:
        maker(key)
    message = str(err.value)
    assert message.startswith(f"{img.paths['semantic']}: semantic value(s) [151]")
    assert "annotations_instance" not in message and "\n" not in message
