"""Scoring at the bincount limit (issue 24): the one-bincount confusion update against
independent counts, predictions read in their decoded dtype, bounded memory, and no torch in
the numpy-only scoring path."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
from score_helpers import make_shards

from rankseg_core.errors import UserError
from rankseg_core.evaluation import score_files
from rankseg_core.evaluation.metrics import ConfusionMatrix

REPO = Path(__file__).resolve().parents[1]
IGNORE = 65535


def loop_counts(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> np.ndarray:
    """The definition, one pixel at a time: (target, pred) pairs with 0 <= target < K and
    target != ignore; every such pixel must have 0 <= pred < K."""
    m = np.zeros((k, k), np.int64)
    for t, p in zip(np.asarray(target).reshape(-1).tolist(), np.asarray(pred).reshape(-1).tolist()):
        if 0 <= t < k and t != ignore:
            assert 0 <= p < k, "test data: a counted pixel with an out-of-range prediction"
            m[t, p] += 1
    return m


def blocky(rng: np.random.Generator, k: int, shape: tuple[int, int], ignore: int) -> tuple[np.ndarray, np.ndarray]:
    """A piecewise-constant (target, prediction) pair: regions of a few classes, an ignore band."""
    n = min(k, 6)
    cells = rng.choice(k, n, replace=False)[rng.integers(0, n, (4, 5))]
    gt = cv2.resize(cells.astype(np.uint16), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    gt[: shape[0] // 6] = ignore
    pred = np.roll(gt, 2, axis=1).copy()
    pred[pred == ignore] = rng.integers(0, k)
    pred[rng.random(shape) < 0.05] = rng.integers(0, k)
    return gt, pred


# --- the update against independent counts ---------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64, np.uint64])
def test_update_equals_the_pixel_loop_for_every_integer_dtype(dtype: type) -> None:
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    k = 7
    for ignore in (5, 255, IGNORE, -1):  # inside [0, K), at the 8-bit end, the stored value, negative
        target: np.ndarray = rng.integers(max(info.min, -3), min(info.max, 300) + 1, (9, 11)).astype(dtype)
        target[rng.random(target.shape) < 0.5] = rng.integers(0, k)  # plenty of counted pixels
        counted = (target.astype(np.int64) >= 0) & (target.astype(np.int64) < k) & (target.astype(np.int64) != ignore)
        pred: np.ndarray = rng.integers(0, k, target.shape).astype(dtype)
        pred[~counted] = rng.integers(max(info.min, -3), min(info.max, 300) + 1, int((~counted).sum()))
        cm = ConfusionMatrix(k, ignore)
        cm.update(pred, target)  # out-of-range predictions at skipped pixels are fine
        np.testing.assert_array_equal(cm.matrix, loop_counts(pred, target, k, ignore))


def test_update_equals_histogram2d_at_a847_size() -> None:
    rng = np.random.default_rng(1)
    k = 847
    cm = ConfusionMatrix(k, IGNORE)
    ref = np.zeros((k, k))
    for shape in ((48, 64), (64, 40)):
        gt, pred = blocky(rng, k, shape, IGNORE)
        cm.update(pred, gt)
        keep = gt != IGNORE
        ref += np.histogram2d(gt[keep], pred[keep], bins=[np.arange(k + 1)] * 2)[0]
    np.testing.assert_array_equal(cm.matrix, ref.astype(np.int64))
    assert cm.matrix.sum() == sum(s[0] * s[1] - s[0] // 6 * s[1] for s in ((48, 64), (64, 40)))


def test_torch_tensors_and_the_device_counts_agree() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    gt, pred = blocky(rng, 300, (24, 30), IGNORE)
    ref = loop_counts(pred, gt, 300, IGNORE)
    a = ConfusionMatrix(300, IGNORE)
    a.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    np.testing.assert_array_equal(a.matrix, ref)
    # The accelerator path, run on CPU tensors (CUDA is not needed to check its arithmetic).
    counts = a._device_counts(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(gt.astype(np.int64)))
    np.testing.assert_array_equal(counts[:300, :300], ref)
    assert counts[:300, 300].sum() == 0 and counts[300].sum() == int((gt == IGNORE).sum())


def test_an_out_of_range_prediction_is_refused_only_where_counted() -> None:
    k = 5
    gt = np.array([[0, 1, IGNORE], [4, 9, 2]], np.uint16)  # 9 >= K: skipped like ignore
    ok = np.array([[0, 1, 77], [4, 6, 2]], np.uint16)  # 77 and 6 sit on skipped pixels
    cm = ConfusionMatrix(k, IGNORE)
    cm.update(ok, gt)
    np.testing.assert_array_equal(cm.matrix, loop_counts(np.where(gt < k, ok, 0), gt, k, IGNORE))
    before = cm.matrix.copy()
    for bad in (np.array([[0, 5, 0], [4, 0, 2]], np.uint16), np.array([[0, -1, 0], [4, 0, 2]], np.int64)):
        with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
            cm.update(bad, gt)
        np.testing.assert_array_equal(cm.matrix, before)  # a refused image adds nothing
    with pytest.raises(ValueError, match="sizes differ"):
        cm.update(np.zeros(3, np.uint16), np.zeros(4, np.uint16))


def test_one_update_holds_no_k_squared_array() -> None:
    """The old update (and detectron2's) allocated (K+1)^2 int64 per image: 5.7 MB at K = 847;
    the rows of the classes present are a few kB, plus work arrays of the image's size."""
    k = 847
    cm = ConfusionMatrix(k, IGNORE)
    gt, pred = blocky(np.random.default_rng(3), k, (64, 64), IGNORE)
    cm.update(pred, gt)  # the work arrays now exist
    tracemalloc.start()
    try:
        for _ in range(3):
            cm.update(pred, gt)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 512 * 1024 < 8 * (k + 1) ** 2
    assert 4 * loop_counts(pred, gt, k, IGNORE).sum() == cm.matrix.sum()
    clone = pickle.loads(pickle.dumps(cm))  # the work arrays are not state
    np.testing.assert_array_equal(clone.matrix, cm.matrix)
    assert not clone._scratch


# --- reading predictions ----------------------------------------------------------------


def test_read_prediction_keeps_the_decoded_dtype(tmp_path: Path) -> None:
    p16 = np.array([[1, 2, 300], [4, 5, 6]], np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), p16)
    got = score_files.read_prediction(tmp_path / "a.png", 301, 0, (2, 3))
    assert got.dtype == np.uint16 and np.array_equal(got, p16)
    got = score_files.read_prediction(tmp_path / "a.png", 300, 1, (2, 3))  # --pred-offset 1
    assert got.dtype == np.uint16 and np.array_equal(got, p16 - 1)
    cv2.imwrite(str(tmp_path / "b.png"), p16.astype(np.uint8) + 1)
    got = score_files.read_prediction(tmp_path / "b.png", 50, 1)  # 300 wraps to 44 in 8 bits
    assert got.dtype == np.uint8 and np.array_equal(got, p16.astype(np.uint8))
    with pytest.raises(UserError, match=r"a\.png: value 300 in 1 pixel\(s\) is not a class id 0\.\.299"):
        score_files.read_prediction(tmp_path / "a.png", 300)
    with pytest.raises(UserError, match=r"a\.png: value 1 is below --pred-offset 2"):
        score_files.read_prediction(tmp_path / "a.png", 400, 2)


def _labels(n: int, k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)
    return {f"img_{i}": blocky(rng, k, (32, 40), IGNORE)[0] for i in range(n)}


def test_scoring_counts_every_file_in_order_and_memory_does_not_grow(tmp_path: Path) -> None:
    k = 300
    labels = _labels(12, k)
    data = make_shards(tmp_path / "gt", {"val": labels, "val_small": dict(list(labels.items())[:3])},
                       [f"c{i}" for i in range(k)])
    preds = tmp_path / "p"
    preds.mkdir()
    rng = np.random.default_rng(5)
    ref = np.zeros((k, k), np.int64)
    for key, gt in labels.items():
        pred = np.where(rng.random(gt.shape) < 0.7, np.where(gt == IGNORE, 0, gt), rng.integers(0, k, gt.shape))
        cv2.imwrite(str(preds / f"{key}.png"), pred.astype(np.uint16))
        ref += loop_counts(pred, gt, k, IGNORE)
    res = score_files.score_predictions(preds, data, "val", groups="none", progress=False)
    np.testing.assert_array_equal(res.confusion.matrix, ref)
    peaks = []
    for split in ("val_small", "val"):
        tracemalloc.start()
        try:
            score_files.score_predictions(preds, data, split, groups="none", progress=False, allow_extra=True)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] < peaks[0] + 256 * 1024, f"peak grows with the number of images: {peaks}"
    # A bad file stops the run at its turn, with its name, although the next one is read ahead.
    cv2.imwrite(str(preds / "img_4.png"), np.full((32, 40), k, np.uint16))
    with pytest.raises(UserError, match=r"img_4\.png: value 300 in 1280 pixel\(s\)"):
        score_files.score_predictions(preds, data, "val", groups="none", progress=False)


def test_numpy_only_scoring_never_imports_torch(tmp_path: Path) -> None:
    k = 4
    labels = _labels(2, k)
    data = make_shards(tmp_path / "gt", {"val": labels}, [f"c{i}" for i in range(k)])
    preds = tmp_path / "p"
    preds.mkdir()
    for key, gt in labels.items():
        cv2.imwrite(str(preds / f"{key}.png"), np.where(gt == IGNORE, 0, gt).astype(np.uint16))
    code = textwrap.dedent(f"""
        import sys
        import rankseg_core.evaluation.metrics, rankseg_core.evaluation.score_files
        import rankseg_cli.score_cmds, rankseg_cli.app
        assert "torch" not in sys.modules, "importing the scoring modules or the CLI loaded torch"
        from rankseg_cli.entry import main
        sys.argv = ["rankseg", "eval-predictions", {str(preds)!r}, "--data", {str(data)!r},
                    "--json", {str(tmp_path / "s.json")!r}]
        try:
            main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        assert "torch" not in sys.modules, "rankseg eval-predictions loaded torch"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert (tmp_path / "s.json").exists()
