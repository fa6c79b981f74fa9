"""Panoptic quality: hand-computed cases, torchmetrics' PanopticQuality, and an independent
re-implementation of panopticapi's per-image `pq_compute` logic on random segmentations.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from rankseg_core.evaluation.panoptic_quality import PanopticQuality, gt_from_shard, image_stats

K = 5
THINGS = [0, 1]  # 2, 3, 4 are stuff; 4 never occurs


def seg(info):
    return [{"id": i, "category": c} for i, c in info]


def gt(info):
    return [{"id": i, "category": c, "iscrowd": z} for i, c, z in info]


# --- hand-built cases (numbers worked out by hand in the comments) ------------------------

def case_perfect():
    g = np.zeros((4, 4), int)
    g[:, :2], g[:, 2:] = 1, 2
    p = np.where(g == 1, 7, 9)
    return p, seg([(7, 0), (9, 2)]), g, gt([(1, 0, 0), (2, 2, 0)])


def case_split():
    # GT: one thing of 100 px. Prediction splits it 60 / 40: IoU(60) = 60 / 100 -> TP 0.6,
    # the 40-pixel part is an FP (it does not lie on void).
    g = np.ones((10, 10), int)
    p = np.ones((10, 10), int)
    p[6:] = 2
    return p, seg([(1, 0), (2, 0)]), g, gt([(1, 0, 0)])


def case_crowd():
    # GT: cols 0-4 a crowd of class 0, cols 5-9 stuff 2. Prediction: class 0 on cols 0-3
    # (all on the crowd of its class: not an FP), class 1 on col 4 (on the crowd of ANOTHER
    # class: an FP), class 2 on cols 5-9 (TP, IoU 1). The crowd is never an FN.
    g = np.zeros((10, 10), int)
    g[:, :5], g[:, 5:] = 1, 2
    p = np.zeros((10, 10), int)
    p[:, :4], p[:, 4], p[:, 5:] = 1, 2, 3
    return p, seg([(1, 0), (2, 1), (3, 2)]), g, gt([(1, 0, 1), (2, 2, 0)])


def case_void():
    # GT: cols 0-4 stuff 2 (50 px), cols 5-9 void. Prediction: class 2 on cols 0-7 (80 px, 30 on
    # void): union = 80 + 50 - 50 - 30 = 50 -> IoU 1. Class 3 on cols 8-9: all void, ignored.
    g = np.zeros((10, 10), int)
    g[:, :5] = 1
    p = np.full((10, 10), 5)
    p[:, 8:] = 6
    return p, seg([(5, 2), (6, 3)]), g, gt([(1, 2, 0)])


def case_fp_fn():
    # GT: class 1 everywhere; prediction: class 3 everywhere -> FN for 1, FP for 3.
    g = np.ones((10, 10), int)
    p = np.full((10, 10), 4)
    return p, seg([(4, 3)]), g, gt([(1, 1, 0)])


CASES = {"perfect": case_perfect, "split": case_split, "crowd": case_crowd, "void": case_void,
         "fp_fn": case_fp_fn}
# per case: class -> (tp, fp, fn, iou sum)
EXPECTED = {
    "perfect": {0: (1, 0, 0, 1.0), 2: (1, 0, 0, 1.0)},
    "split": {0: (1, 1, 0, 0.6)},
    "crowd": {1: (0, 1, 0, 0.0), 2: (1, 0, 0, 1.0)},
    "void": {2: (1, 0, 0, 1.0)},
    "fp_fn": {1: (0, 0, 1, 0.0), 3: (0, 1, 0, 0.0)},
}


@pytest.mark.parametrize("name", CASES)
def test_hand_cases(name: str) -> None:
    s = image_stats(*CASES[name](), num_classes=K)
    for c in range(K):
        tp, fp, fn, iou = EXPECTED[name].get(c, (0, 0, 0, 0.0))
        assert (s["tp"][c], s["fp"][c], s["fn"][c]) == (tp, fp, fn), (name, c)
        assert s["iou"][c] == pytest.approx(iou, abs=1e-12)


def test_hand_cases_accumulated() -> None:
    pq = PanopticQuality(K, THINGS)
    for make in CASES.values():
        pq.update(*make())
    r = pq.compute()
    # class 0: TP 2 (IoU 1 + 0.6), FP 1 -> PQ 1.6 / 2.5 = 0.64, SQ 0.8, RQ 0.8
    # class 1: FP 1, FN 1 -> 0; class 2: 3 TP of IoU 1 -> 1; class 3: FP 1 -> 0; class 4: absent.
    per = r["per_class"]
    assert per[0]["pq"] == pytest.approx(0.64) and per[0]["sq"] == pytest.approx(0.8)
    assert per[0]["rq"] == pytest.approx(0.8)
    assert (per[1]["pq"], per[1]["sq"], per[1]["rq"]) == (0.0, 0.0, 0.0)
    assert per[2]["pq"] == per[2]["sq"] == per[2]["rq"] == 1.0
    assert per[3]["pq"] == 0.0
    assert per[4] == {"pq": None, "sq": None, "rq": None, "tp": 0, "fp": 0, "fn": 0, "isthing": False}
    assert r["all"] == pytest.approx({"pq": (0.64 + 1) / 4, "sq": (0.8 + 1) / 4, "rq": (0.8 + 1) / 4, "n": 4})
    assert r["things"] == pytest.approx({"pq": 0.32, "sq": 0.4, "rq": 0.4, "n": 2})
    assert r["stuff"] == pytest.approx({"pq": 0.5, "sq": 0.5, "rq": 0.5, "n": 2})
    assert r["num_images"] == 5
    json.dumps(r, allow_nan=False)  # strict JSON


def test_nothing_seen_is_none_not_nan() -> None:
    pq = PanopticQuality(3, [0])
    z = np.zeros((4, 4), int)
    pq.update(z, [], z, [])
    r = pq.compute()
    assert r["all"] == {"pq": None, "sq": None, "rq": None, "n": 0} == r["things"] == r["stuff"]
    json.dumps(r, allow_nan=False)


def test_merge_equals_one_accumulator() -> None:
    rng = np.random.default_rng(1)
    pairs = [random_pair(rng) for _ in range(12)]
    one, a, b = (PanopticQuality(K, THINGS) for _ in range(3))
    for i, pair in enumerate(pairs):
        one.update(*pair)
        (a if i % 2 else b).update(*pair)
    merged = PanopticQuality(K, THINGS).merge(json.loads(json.dumps(a.state()))).merge(b)
    for k in ("tp", "fp", "fn"):
        assert getattr(merged, k).tolist() == getattr(one, k).tolist()
    np.testing.assert_allclose(merged.iou, one.iou, rtol=1e-12)
    assert one.tp.sum() > 0 and merged.num_images == 12
    for part in ("all", "things", "stuff"):
        assert merged.compute()[part] == pytest.approx(one.compute()[part])
    with pytest.raises(ValueError, match="different classes"):
        PanopticQuality(K, [0]).merge(a)


def test_bad_inputs() -> None:
    z = np.ones((3, 3), int)
    with pytest.raises(ValueError, match="not in its info"):
        image_stats(z, [], z, gt([(1, 0, 0)]), K)
    with pytest.raises(ValueError, match="differ in size"):
        image_stats(np.ones((2, 3), int), seg([(1, 0)]), z, gt([(1, 0, 0)]), K)
    with pytest.raises(ValueError, match="train ids"):
        image_stats(z, seg([(1, K)]), z, gt([(1, 0, 0)]), K)
    with pytest.raises(ValueError, match="not unique"):
        image_stats(z, seg([(1, 0), (1, 2)]), z, gt([(1, 0, 0)]), K)
    with pytest.raises(ValueError, match="iscrowd"):
        image_stats(z, seg([(1, 0)]), z, gt([(1, 0, 2)]), K)
    with pytest.raises(ValueError, match="integer"):
        image_stats(z, [{"id": 1}], z, gt([(1, 0, 0)]), K)
    # a record without pixels: a predicted one is ignored, a ground-truth one is an FN (panopticapi)
    s = image_stats(z, seg([(1, 0), (2, 3)]), z, gt([(1, 0, 0), (5, 2, 0)]), K)
    assert s["tp"][0] == 1 and s["fp"].sum() == 0 and s["fn"].tolist() == [0, 0, 1, 0, 0]


def test_gt_from_shard() -> None:
    idx = np.array([[0, 1], [2, 2]], np.uint16)
    m, info = gt_from_shard(idx, [{"id": 999, "category": 3, "iscrowd": 0, "area": 1},
                                  {"id": 5, "category": 0, "iscrowd": 1, "area": 2}])
    assert info == [{"id": 1, "category": 3, "iscrowd": 0}, {"id": 2, "category": 0, "iscrowd": 1}]
    s = image_stats(idx.astype(np.int64), seg([(1, 3), (2, 0)]), m, info, K)
    assert s["tp"][3] == 1 and s["fp"].sum() == 0  # class 0 lies on its own crowd: forgiven


# --- random segmentations -----------------------------------------------------------------

def random_pair(rng: np.random.Generator, cells: int = 6, cell: int = 4, crowd: bool = False,
                pred_void: bool = False, gt_void: bool = True):
    """A random GT (blocks of segments, some void, optionally crowd) and a perturbed prediction.

    Stuff classes get at most one segment per image in both (torchmetrics merges them).
    """
    def segments(n_seg: int, cats: np.ndarray):
        grid = rng.integers(1, n_seg + 1, (cells, cells))
        ids = np.kron(grid, np.ones((cell, cell), int))
        # a stuff class appears once: later segments of the same stuff class merge into the first
        first: dict[int, int] = {}
        for s in range(1, n_seg + 1):
            c = int(cats[s - 1])
            if c not in THINGS and c in first:
                ids[ids == s] = first[c]
            first.setdefault(c, s)
        return ids

    n = int(rng.integers(2, 7))
    g_cats = rng.integers(0, 4, n)
    g = segments(n, g_cats)
    if gt_void:
        g[rng.random(g.shape) < 0.08] = 0
    p = g.copy()
    # perturb: move some cells to other / new segments, and relabel some segments
    p_cats = np.concatenate([g_cats, rng.integers(0, 4, 3)])
    for _ in range(int(rng.integers(0, 8))):
        y, x = rng.integers(0, cells, 2) * cell
        p[y:y + cell, x:x + cell] = rng.integers(1, n + 4)
    p[p == 0] = rng.integers(1, n + 4)
    flip = rng.random(len(p_cats)) < 0.2
    p_cats[flip] = rng.integers(0, 4, int(flip.sum()))
    for s in range(1, n + 4):  # merge repeated stuff classes in the prediction too
        c = int(p_cats[s - 1])
        if c in THINGS:
            continue
        same = [t for t in range(1, s) if p_cats[t - 1] == c and (p == t).any()]
        if same:
            p[p == s] = same[0]
    if pred_void:
        p[rng.random(p.shape) < 0.1] = 0
    g_ids, p_ids = [int(v) for v in np.unique(g) if v], [int(v) for v in np.unique(p) if v]
    crowd_of = {s: int(crowd and g_cats[s - 1] in THINGS and rng.random() < 0.3) for s in g_ids}
    # ids are offset so that prediction ids differ from ground-truth ids
    p = np.where(p > 0, p + 100, 0)
    return (p, seg([(s + 100, int(p_cats[s - 1])) for s in p_ids]), g,
            gt([(s, int(g_cats[s - 1]), crowd_of[s]) for s in g_ids]))


def test_against_torchmetrics() -> None:
    """No crowd and no void in the prediction: torchmetrics' PanopticQuality must agree exactly."""
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.detection")
    rng = np.random.default_rng(0)
    stuffs = [c for c in range(K) if c not in THINGS]
    ref = tm.PanopticQuality(things=set(THINGS), stuffs=set(stuffs), return_per_class=True,
                             return_sq_and_rq=True)
    ref_avg = tm.PanopticQuality(things=set(THINGS), stuffs=set(stuffs))
    ours = PanopticQuality(K, THINGS)
    matched = 0
    for _ in range(60):
        p, pi, g, gi = random_pair(rng)
        ours.update(p, pi, g, gi)
        for m in (ref, ref_avg):
            m.update(to_torchmetrics(p, pi, torch), to_torchmetrics(g, gi, torch))
        matched += int(image_stats(p, pi, g, gi, K)["tp"].sum())
    assert matched > 60  # the random pairs do exercise matching
    order = sorted(THINGS) + sorted(stuffs)  # torchmetrics' continuous ids
    assert ours.tp[order].tolist() == ref.true_positives.tolist()
    assert ours.fp[order].tolist() == ref.false_positives.tolist()
    assert ours.fn[order].tolist() == ref.false_negatives.tolist()
    # torchmetrics divides in float32: agreement to ~1e-8 relative
    np.testing.assert_allclose(ours.iou[order], ref.iou_sum.numpy(), rtol=1e-6)
    per = ref.compute().numpy()  # K x (pq, sq, rq), zeros for absent classes
    r = ours.compute()
    for row, c in zip(per, order):
        if r["per_class"][c]["pq"] is not None:
            assert [r["per_class"][c][k] for k in ("pq", "sq", "rq")] == pytest.approx(row.tolist(), abs=1e-6)
    assert r["all"]["pq"] == pytest.approx(float(ref_avg.compute()), abs=1e-6)


def to_torchmetrics(ids: np.ndarray, info: list[dict], torch):  # torch: the module, imported lazily by the caller
    """1 x H x W x 2 (category, instance) with void = class K (unknown to torchmetrics)."""
    cat = np.full(ids.shape, K)
    for r in info:
        cat[ids == r["id"]] = r["category"]
    return torch.from_numpy(np.stack([cat, ids], -1)[None])


def test_torchmetrics_differences() -> None:
    """Where torchmetrics departs from panopticapi (docs/panoptic.md): crowd and predicted void."""
    torch = pytest.importorskip("torch")
    tm = pytest.importorskip("torchmetrics.detection")

    def theirs(p, pi, g, gi):
        m = tm.PanopticQuality(things=set(THINGS), stuffs={2, 3, 4}, allow_unknown_preds_category=True)
        m.update(to_torchmetrics(p, pi, torch), to_torchmetrics(g, gi, torch))
        return m

    # 1. Crowd: torchmetrics has no crowd flag, so a crowd region is an ordinary segment. In
    # case_crowd the class-0 prediction covers 40 of the crowd's 50 px: a TP of IoU 0.8 there,
    # nothing for panopticapi (crowd regions are never matched).
    p, pi, g, gi = case_crowd()
    ours = image_stats(p, pi, g, gi, K)
    m = theirs(p, pi, g, gi)
    assert (ours["tp"][0], ours["fp"][0], ours["fn"][0]) == (0, 0, 0)
    assert int(m.true_positives[0]) == 1 and float(m.iou_sum[0]) == pytest.approx(0.8)
    # With only 20 px predicted, torchmetrics counts the crowd as an FN and the prediction as
    # an FP; panopticapi forgives the prediction (all of it lies on its class's crowd).
    p[:, 2:4] = 2
    ours = image_stats(p, pi, g, gi, K)
    m = theirs(p, pi, g, gi)
    assert (ours["tp"][0], ours["fp"][0], ours["fn"][0]) == (0, 0, 0)
    assert (int(m.true_positives[0]), int(m.false_positives[0]), int(m.false_negatives[0])) == (0, 1, 1)

    # 2. Void in the prediction: torchmetrics also removes the GT pixels predicted void from
    # the union. GT: 100 px of class 2; prediction: class 2 on 40 px, void on 60 px.
    # panopticapi: IoU = 40 / 100 -> no match, 1 FN + 1 FP. torchmetrics: IoU = 40 / 40 -> TP.
    g = np.ones((10, 10), int)
    p = np.zeros((10, 10), int)
    p[:4] = 1
    pi, gi = seg([(1, 2)]), gt([(1, 2, 0)])
    ours = image_stats(p, pi, g, gi, K)
    m = theirs(p, pi, g, gi)
    assert (ours["tp"][2], ours["fn"][2], ours["fp"][2]) == (0, 1, 1)
    assert int(m.true_positives[2]) == 1 and float(m.iou_sum[2]) == 1.0

    # 3. A GT segment mostly predicted void is an FN for panopticapi, not for torchmetrics.
    p = np.zeros((10, 10), int)
    p[:2] = 1  # 20 px of class 3, the rest void
    pi = seg([(1, 3)])
    ours = image_stats(p, pi, g, gi, K)
    m = theirs(p, pi, g, gi)
    assert ours["fn"][2] == 1 and int(m.false_negatives[2]) == 0


# --- an independent re-implementation of pq_compute's per-image loop ----------------------

def reference_pq_image(p: np.ndarray, pi: list[dict], g: np.ndarray, gi: list[dict]):
    """panopticapi's per-image logic, written out with dicts and loops (areas from the maps)."""
    offset = 1 << 24
    pred = {r["id"]: dict(r, area=int((p == r["id"]).sum())) for r in pi}
    gts = {r["id"]: dict(r, area=int((g == r["id"]).sum())) for r in gi}
    joint, counts = np.unique(g.astype(np.int64) * offset + p, return_counts=True)
    inter = {(int(j // offset), int(j % offset)): int(c) for j, c in zip(joint, counts)}
    stats = defaultdict(lambda: [0, 0, 0, 0.0])  # tp, fp, fn, iou
    gm, pm = set(), set()
    for (gl, pl), n in inter.items():
        if gl not in gts or pl not in pred or gts[gl]["iscrowd"] == 1:
            continue
        if gts[gl]["category"] != pred[pl]["category"]:
            continue
        union = pred[pl]["area"] + gts[gl]["area"] - n - inter.get((0, pl), 0)
        if n / union > 0.5:
            stats[gts[gl]["category"]][0] += 1
            stats[gts[gl]["category"]][3] += n / union
            gm.add(gl)
            pm.add(pl)
    crowd = {}
    for gl, r in gts.items():
        if gl in gm:
            continue
        if r["iscrowd"] == 1:
            crowd[r["category"]] = gl
            continue
        stats[r["category"]][2] += 1
    for pl, r in pred.items():
        if pl in pm:
            continue
        n = inter.get((0, pl), 0)
        if r["category"] in crowd:
            n += inter.get((crowd[r["category"]], pl), 0)
        if n / r["area"] > 0.5:
            continue
        stats[r["category"]][1] += 1
    return stats


def test_against_reimplemented_pq_compute() -> None:
    rng = np.random.default_rng(7)
    ours = PanopticQuality(K, THINGS)
    total = defaultdict(lambda: [0, 0, 0, 0.0])
    crowds = 0
    for _ in range(80):
        p, pi, g, gi = random_pair(rng, crowd=True, pred_void=True)
        crowds += sum(r["iscrowd"] for r in gi)
        ours.update(p, pi, g, gi)
        for c, v in reference_pq_image(p, pi, g, gi).items():
            total[c] = [a + b for a, b in zip(total[c], v)]
    assert crowds > 10
    for c in range(K):
        tp, fp, fn, iou = total.get(c, [0, 0, 0, 0.0])
        assert (ours.tp[c], ours.fp[c], ours.fn[c]) == (tp, fp, fn), c
        assert ours.iou[c] == pytest.approx(iou, rel=1e-12)
    # pq_average, written out
    r = ours.compute()
    pqs = [total[c][3] / (total[c][0] + 0.5 * total[c][1] + 0.5 * total[c][2]) for c in range(K)
           if sum(total[c][:3]) > 0]
    assert r["all"]["pq"] == pytest.approx(sum(pqs) / len(pqs)) and r["all"]["n"] == len(pqs)
