"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rankseg_core.evaluation.metrics import ConfusionMatrix, average_precision, recall_at_k

IGN = 255


def _example() -> tuple[np.ndarray, np.ndarray]:
    target = np.array([[0, 0, 1, 1], [2, 2, IGN, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])
    return pred, target


def test_confusion_matrix_iou_by_hand() -> None:
    pred, target = _example()
    cm = ConfusionMatrix(num_classes=5, ignore_index=IGN)
    cm.update(pred, target)
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 3, gt 3, pred 4 -> 3/4;
    # class 2: tp 1, gt 2, pred 1 -> 1/2; class 3: only predicted on ignore -> union 0 -> NaN;
    # class 4: absent everywhere -> NaN
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [1 / 3, 3 / 4, 1 / 2])
    assert np.isnan(iou[3]) and np.isnan(iou[4])
    assert cm.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert cm.miou(classes=[1, 2, 4]) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert cm.aacc() == pytest.approx(5 / 7)
    assert cm.matrix.sum() == 7


def test_confusion_matrix_torch_equals_numpy_and_merge() -> None:
    pred, target = _example()
    a = ConfusionMatrix(5, IGN)
    a.update(torch.from_numpy(pred), torch.from_numpy(target))
    b = ConfusionMatrix(5, IGN)
    b.update(pred, target)
    assert np.array_equal(a.matrix, b.matrix)
    c = a + b
    assert np.array_equal(c.matrix, 2 * b.matrix) and np.array_equal(a.matrix, b.matrix)
    a.merge(b)
    assert np.array_equal(a.matrix, c.matrix)
    assert a.miou() == pytest.approx(b.miou())  # doubling counts leaves IoU unchanged


def test_confusion_matrix_large_ignore_value() -> None:
    cm = ConfusionMatrix(num_classes=1284, ignore_index=65535)
    cm.update(np.array([3, 255, 7]), np.array([3, 255, 65535]))
    assert cm.matrix[3, 3] == 1 and cm.matrix[255, 255] == 1 and cm.matrix.sum() == 2
    with pytest.raises(ValueError):
        cm.update(np.array([1284]), np.array([0]))  # would alias into the next row otherwise
    with pytest.raises(ValueError):
        cm.update(torch.tensor([-1]), torch.tensor([0]))


def test_average_precision_by_hand() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.4], [0.7, 0.4], [0.6, 0.3]])
    targets = np.array([[1, 0], [0, 1], [1, 0], [0, 0]])
    mean_ap, per_class = average_precision(scores, targets)
    # class 0: ranked 1,0,1,0 -> (1/1 + 2/3) / 2
    assert per_class[0] == pytest.approx((1 + 2 / 3) / 2)
    # class 1: tie at 0.4 between a positive and a negative -> one threshold, P = 1/2, R = 1
    assert per_class[1] == pytest.approx(0.5)
    assert mean_ap == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_average_precision_skips_classes_without_positives() -> None:
    scores = torch.tensor([[0.2, 0.9], [0.8, 0.1]])
    targets = torch.tensor([[0, 1], [0, 0]])
    mean_ap, per_class = average_precision(scores, targets)
    assert math.isnan(per_class[0]) and per_class[1] == 1.0 and mean_ap == 1.0


def test_recall_at_k_by_hand() -> None:
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4], [0.3, 0.2, 0.1, 0.0]])
    targets = np.array([[1, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]])
    # image 0: top-2 {0, 1} -> 1/2; image 1: top-2 {3, 2} -> 1/2; image 2 skipped
    assert recall_at_k(scores, targets, 2) == pytest.approx(0.5)
    assert recall_at_k(scores, targets, 4) == pytest.approx(1.0)
