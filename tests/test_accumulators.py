"""Metric accumulators: against independent computations, merged states == one accumulator
(split data and 2 real gloo processes), empty accumulators, bounded multi-label storage."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from rankseg_core.evaluation.accumulators import (
    Accumulator,
    EvalAccumulators,
    MultiLabelAccumulator,
    reduce_across_processes,
)
from rankseg_core.evaluation.metrics import ConfusionMatrix, average_precision, recall_at_k
from rankseg_core.evaluation.panoptic_quality import PanopticQuality

K = 6
THINGS = [0, 2, 3]
IGN = 255


# ---------------------------------------------------------------------------------------
# Data


def seg_batch(rng: np.random.Generator, n: int, k: int = K) -> list[tuple[np.ndarray, np.ndarray]]:
    """n (pred, target) 5 x 7 class maps, with ignore pixels in the target."""
    out = []
    for _ in range(n):
        target = rng.integers(0, k, (5, 7))
        target[rng.random((5, 7)) < 0.2] = IGN
        pred = np.where(rng.random((5, 7)) < 0.6, target % k, rng.integers(0, k, (5, 7)))
        out.append((pred, target))
    return out


def ml_batch(rng: np.random.Generator, n: int, k: int = K) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N x K probabilities rounded to 0.1 so that ties occur, N GT class-id arrays, some empty)."""
    probs = np.round(rng.random((n, k)), 1).astype(np.float32)
    gts = [np.flatnonzero(rng.random(k) < 0.3) for _ in range(n)]
    return probs, gts


def pan_batch(rng: np.random.Generator, n: int) -> list[tuple]:
    """n (pred_segments, pred_info, gt_segments, gt_info) of 8 x 8 maps with ids 0..3."""
    out = []
    for _ in range(n):
        gt = rng.integers(0, 4, (8, 8))
        pred = np.where(rng.random((8, 8)) < 0.8, gt, rng.integers(0, 4, (8, 8)))
        cats = rng.integers(0, K, 3)
        gt_info = [{"id": i, "category": int(c), "iscrowd": 0} for i, c in enumerate(cats, 1)]
        pred_info = [{"id": i, "category": int(c if rng.random() < 0.8 else rng.integers(K))}
                     for i, c in enumerate(cats, 1)]
        out.append((pred, pred_info, gt, gt_info))
    return out


def fill(kind: str, acc, data) -> None:
    """Add `data` (as made for `kind`) to `acc`."""
    if kind == "confusion":
        for pred, target in data:
            acc.update(pred, target)
    elif kind == "multilabel":
        acc.update(*data)
    else:
        for item in data:
            acc.update(*item)


def make(kind: str):
    if kind == "confusion":
        return ConfusionMatrix(K, IGN)
    if kind == "multilabel":
        return MultiLabelAccumulator(K, kappa=2)
    return PanopticQuality(K, THINGS)


def data_for(kind: str, rng: np.random.Generator, n: int):
    return {"confusion": seg_batch, "multilabel": ml_batch, "panoptic": pan_batch}[kind](rng, n)


def split(kind: str, data, at: int):
    if kind == "multilabel":
        probs, gts = data
        return (probs[:at], gts[:at]), (probs[at:], gts[at:])
    return data[:at], data[at:]


def assert_same(kind: str, a, b, exact: bool = True) -> None:
    """Two accumulators hold the same result (float sums to rounding unless `exact`)."""
    if kind == "confusion":
        assert np.array_equal(a.matrix, b.matrix)
    elif kind == "multilabel":
        ra, rb = a.compute(), b.compute()
        np.testing.assert_array_equal(ra.ap, rb.ap)
        assert (ra.map, ra.recall_at_kappa, ra.num_images) == (rb.map, rb.recall_at_kappa, rb.num_images) or (
            math.isnan(ra.map) and math.isnan(rb.map) and ra.num_images == rb.num_images)
    else:
        for key in ("tp", "fp", "fn"):
            assert getattr(a, key).tolist() == getattr(b, key).tolist()
        if exact:
            assert a.compute() == b.compute()
        else:
            np.testing.assert_allclose(a.iou, b.iou, rtol=1e-12)
            assert a.compute()["all"] == pytest.approx(b.compute()["all"])


KINDS = ["confusion", "multilabel", "panoptic"]


# ---------------------------------------------------------------------------------------
# Independent references


def brute_ap(scores: np.ndarray, positive: np.ndarray) -> float:
    """sklearn's average_precision_score from its definition: thresholds at the distinct
    scores, high to low; AP = sum (R_n - R_{n-1}) P_n."""
    total, ap, prev_recall = positive.sum(), 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        chosen = scores >= t
        tp = (positive & chosen).sum()
        recall = tp / total
        ap += (recall - prev_recall) * tp / chosen.sum()
        prev_recall = recall
    return ap


def brute_recall(scores: np.ndarray, gts: list[np.ndarray], k: int) -> float:
    """Top-k by score, ties broken by the lower class id; images without GT classes skipped."""
    vals = []
    for row, gt in zip(scores, gts):
        if len(gt):
            top = sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
            vals.append(len(set(top) & set(gt.tolist())) / len(set(gt.tolist())))
    return sum(vals) / len(vals)


def one_hot(gts: list[np.ndarray], k: int) -> np.ndarray:
    t = np.zeros((len(gts), k), np.float32)
    for row, gt in zip(t, gts):
        row[gt] = 1
    return t


# ---------------------------------------------------------------------------------------
# Multi-label accumulator


def test_multilabel_by_hand() -> None:
    probs = np.array([[0.9, 0.1, 0.0], [0.8, 0.4, 0.0], [0.7, 0.4, 0.0], [0.6, 0.2, 0.0]], np.float32)
    gts = [[0], [1], [0], []]
    acc = MultiLabelAccumulator(3, kappa=1)
    acc.update(torch.from_numpy(probs), gts)
    res = acc.compute()
    # class 0: positives ranked 1st and 3rd -> (1/1 + 2/3) / 2; class 1: its positive ties with a
    # negative at 0.4, entering together -> precision 1/2; class 2: no positive -> NaN
    np.testing.assert_allclose(res.ap[:2], [5 / 6, 1 / 2])
    assert math.isnan(res.ap[2]) and res.map == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert res.recall_at_kappa == pytest.approx(2 / 3)  # image 1's class 1 is 2nd; image 3 has no GT
    assert res.num_images == 4
    acc2 = MultiLabelAccumulator(3, kappa=2)
    acc2.update(probs, gts)
    assert acc2.compute().recall_at_kappa == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kappa", [1, 3, 10])
def test_multilabel_matches_brute_force_and_metrics(seed: int, kappa: int) -> None:
    rng = np.random.default_rng(seed)
    probs, gts = ml_batch(rng, 40)
    acc = MultiLabelAccumulator(K, kappa)
    for at in range(0, 40, 7):  # several updates, one image each for some
        acc.update(probs[at:at + 7], gts[at:at + 7])
    res = acc.compute()
    hot = one_hot(gts, K) > 0
    for c in range(K):
        ref = brute_ap(probs[:, c].astype(np.float64), hot[:, c]) if hot[:, c].any() else float("nan")
        assert res.ap[c] == pytest.approx(ref, abs=1e-12, nan_ok=True)
    assert res.recall_at_kappa == pytest.approx(brute_recall(probs, gts, kappa), abs=1e-12)
    # exactly what the evaluation loop computed before (stacked float32 one-hot targets)
    m_ap, ap = average_precision(probs, one_hot(gts, K))
    assert res.map == m_ap and np.array_equal(res.ap, ap, equal_nan=True)
    assert res.recall_at_kappa == recall_at_k(probs, one_hot(gts, K), kappa)


def test_multilabel_inputs() -> None:
    acc = MultiLabelAccumulator(4, kappa=2)
    acc.update(torch.tensor([[0.1, 0.9, 0.3, 0.2]], dtype=torch.float16), [torch.tensor([1, 1])])
    acc.update(np.zeros((0, 4)), [])  # an empty batch adds nothing
    assert acc.num_images == 1 and acc.state()["probs"].dtype == np.float32
    with pytest.raises(ValueError, match="N x 4"):
        acc.update(np.zeros((2, 3)), [[0], [1]])
    with pytest.raises(ValueError, match="GT class lists"):
        acc.update(np.zeros((2, 4)), [[0]])
    for bad in ([4], [-1], [0.5]):
        with pytest.raises(ValueError, match="GT class ids"):
            acc.update(np.zeros((1, 4)), [bad])
    with pytest.raises(ValueError, match="different num_classes or kappa"):
        acc.merge(MultiLabelAccumulator(4, kappa=3))
    assert acc.num_images == 1  # failed updates left nothing behind


def test_multilabel_storage_is_bounded() -> None:
    k, n = 1284, 100
    rng = np.random.default_rng(0)
    acc = MultiLabelAccumulator(k, kappa=25)
    for _ in range(n):  # one image per update, as a per-image loop adds them
        acc.update(rng.random((1, k)), [rng.choice(k, 8, replace=False)])
    s = acc.state()
    assert s["probs"].dtype == np.float32 and s["probs"].shape == (n, k)
    assert s["targets"].nbytes == n * 161 < n * k * 4 / 30  # packed bits, not a float32 one-hot
    assert acc.nbytes == n * k * 4 + n * 161
    assert np.unpackbits(s["targets"], axis=1, count=k).sum() == 8 * n


# ---------------------------------------------------------------------------------------
# Confusion matrix as an accumulator


def test_confusion_state_merge_compute() -> None:
    rng = np.random.default_rng(3)
    cm = ConfusionMatrix(K, IGN)
    fill("confusion", cm, seg_batch(rng, 4))
    state = cm.state()
    assert state.dtype == np.int64 and state.shape == (K, K) and state is not cm.matrix
    other = ConfusionMatrix(K, IGN).merge(pickle.loads(pickle.dumps(state)))
    assert np.array_equal(other.matrix, cm.matrix)
    res = cm.compute("d2")
    assert res["miou"] == cm.miou(protocol="d2") and res["aacc"] == cm.aacc()
    assert np.array_equal(res["iou"], cm.iou("d2"), equal_nan=True)
    with pytest.raises(ValueError, match="different sizes"):
        cm.merge(np.zeros((K + 1, K + 1), np.int64))
    with pytest.raises(ValueError, match="integers"):
        cm.merge(np.zeros((K, K)))


# ---------------------------------------------------------------------------------------
# Every accumulator


@pytest.mark.parametrize("kind", KINDS)
def test_is_accumulator(kind: str) -> None:
    assert isinstance(make(kind), Accumulator)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("at", [0, 3, 9])
def test_merged_states_equal_one_accumulator(kind: str, at: int) -> None:
    """Two "processes" with parts of the data (one possibly empty), states through pickle."""
    data = data_for(kind, np.random.default_rng(at), 9)
    one, a, b = make(kind), make(kind), make(kind)
    fill(kind, one, data)
    part_a, part_b = split(kind, data, at)
    fill(kind, a, part_a)
    fill(kind, b, part_b)
    merged = make(kind).merge(pickle.loads(pickle.dumps(a.state()))).merge(b)
    assert_same(kind, merged, one, exact=False)
    assert_same(kind, a.merge(b.state()), one, exact=False)


@pytest.mark.parametrize("kind", KINDS)
def test_single_process_reduce_is_a_no_op(kind: str) -> None:
    acc = make(kind)
    fill(kind, acc, data_for(kind, np.random.default_rng(0), 5))
    before = pickle.dumps(acc.state())
    assert reduce_across_processes(acc, torch.device("cpu")) is acc
    assert pickle.dumps(acc.state()) == before


def test_empty_accumulators() -> None:
    accs = EvalAccumulators.create(K, ignore_index=IGN, kappa=3, thing_classes=THINGS).reduce()
    res = accs.compute()
    assert math.isnan(res["miou"]) and math.isnan(res["aacc"])
    assert math.isnan(res["map"]) and math.isnan(res["recall_at_kappa"]) and np.isnan(res["ap"]).all()
    assert res["pq"] is None and res["ap"].shape == (K,)
    ml = MultiLabelAccumulator(K, kappa=3)
    assert ml.state()["probs"].shape == (0, K) and ml.compute().num_images == 0
    assert PanopticQuality(K, THINGS).compute()["all"]["pq"] is None
    assert EvalAccumulators().compute() == {"pq": None}
    assert EvalAccumulators.create(K, ignore_index=IGN, kappa=3).panoptic is None


def test_eval_accumulators_compute() -> None:
    rng = np.random.default_rng(5)
    accs = EvalAccumulators.create(K, ignore_index=IGN, kappa=2, thing_classes=THINGS)
    seg, ml, pan = seg_batch(rng, 3), ml_batch(rng, 3), pan_batch(rng, 3)
    for (pred, target), item in zip(seg, pan):
        accs.confusion.update(torch.from_numpy(pred), torch.from_numpy(target))
        accs.panoptic.update(*item)
    accs.multilabel.update(*ml)
    res = accs.reduce(torch.device("cpu")).compute()
    assert res["miou"] == accs.confusion.miou() and res["aacc"] == accs.confusion.aacc()
    assert res["map"] == average_precision(ml[0], one_hot(ml[1], K))[0]
    assert res["recall_at_kappa"] == recall_at_k(ml[0], one_hot(ml[1], K), 2)
    assert res["pq"] == accs.panoptic.compute() and res["pq"]["num_images"] == 3


# ---------------------------------------------------------------------------------------
# Two real processes (gloo)


WORLD = 2
PARTS = (5, 0)  # images per rank: rank 1 holds none (more processes than images left)


def _rank_data(rank: int) -> tuple:
    rng = np.random.default_rng(100 + rank)
    n = PARTS[rank]
    return seg_batch(rng, n), ml_batch(rng, n), pan_batch(rng, n)


def _fill_bundle(accs: EvalAccumulators, rank: int) -> None:
    seg, ml, pan = _rank_data(rank)
    fill("confusion", accs.confusion, seg)
    fill("multilabel", accs.multilabel, ml)
    fill("panoptic", accs.panoptic, pan)


def _bundle() -> EvalAccumulators:
    return EvalAccumulators.create(K, ignore_index=IGN, kappa=2, thing_classes=THINGS)


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        accs = _bundle()
        _fill_bundle(accs, rank)
        accs.reduce(torch.device("cpu"))
        Path(out, f"{rank}.pkl").write_bytes(pickle.dumps([a.state() for a in accs.present()]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes(tmp_path: Path) -> None:
    """A real all-reduce / all-gather; rank 1 adds nothing. Every rank gets the merged result."""
    torch_mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ref = _bundle()
    for rank in range(WORLD):  # merged in rank order, as the gather does
        part = _bundle()
        _fill_bundle(part, rank)
        for acc, p in zip(ref.present(), part.present()):
            acc.merge(p.state())
    for rank in range(WORLD):  # every rank holds the whole result
        got = _bundle()
        for acc, state in zip(got.present(), pickle.loads((tmp_path / f"{rank}.pkl").read_bytes())):
            acc.merge(state)
        for kind, a, b in zip(KINDS, got.present(), ref.present()):
            assert_same(kind, a, b, exact=True)
        assert got.multilabel.num_images == got.panoptic.num_images == sum(PARTS)
