"""bench/replication_diagnostics.py on hand-built cases: the scenes of an image, the scene a
ranking points to, the ranking scores (mAP, recall, scene accuracy), the decoder's ranking,
mIoU and where wrong pixels go. The whole `precondition` on trained runs is checked against
the engine's own evaluation in tests/test_replicate.py (smoke)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replication_diagnostics as D  # noqa: E402
import replication_report as RR  # noqa: E402

# K = 8. Backgrounds 0 and 4; scene 0 = bg 0 + objects 1, 2; scene 1 = bg 4 + objects 3, 5;
# scene 2 SHARES background 0, with objects 1, 6. Looks: 1 and 3 look a, 2 and 5 look b, 6 c,
# 7 d (7 is in no scene).
WORLD = SimpleNamespace(num_classes=8, appearance=np.array([-1, 0, 1, 0, -1, 1, 2, 3]),
                        scenes_bg=np.array([0, 4, 0]), scenes_objects=np.array([[1, 2], [3, 5], [1, 6]]))


def test_image_scenes_and_scene_sets() -> None:
    assert RR.image_scenes(WORLD, np.array([0, 2])).tolist() == [0]
    assert RR.image_scenes(WORLD, np.array([0, 1])).tolist() == [0, 2]  # shared background: two scenes fit
    assert RR.image_scenes(WORLD, np.array([4, 3, 65535])).tolist() == [1]  # ignore ids dropped
    assert RR.image_scenes(WORLD, np.array([0, 3])).tolist() == []  # no scene holds both
    assert [s.tolist() for s in D.scene_class_sets(WORLD)] == [[0, 1, 2], [3, 4, 5], [0, 1, 6]]
    # Scene-mates come from every scene that fits; the look-alike of 2 (look b) is 5.
    rel = RR.related_classes(WORLD, np.array([0, 1]))
    assert np.nonzero(rel["scene"])[0].tolist() == [2, 6] and np.nonzero(rel["look"])[0].tolist() == [3]
    rel = D.related_with_backgrounds(WORLD, np.array([0, 2]))
    assert {n: np.nonzero(m)[0].tolist() for n, m in rel.items()} == {"scene": [1], "look": [5], "background": [4]}


def test_predicted_scene_counts_top_kappa_then_breaks_ties() -> None:
    sets = D.scene_class_sets(WORLD)
    s = np.array([0.9, 0.8, 0.1, 0.2, 0.05, 0.0, 0.7, 0.0])
    assert D.predicted_scene(s, sets, 3) == 2  # top-3 {0, 1, 6} is all of scene 2
    # top-2 {0, 1}: scenes 0 and 2 hold both; mean score 0.6 vs 0.8 -> scene 2.
    assert D.predicted_scene(s, sets, 2) == 2
    flat = np.array([0.9, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # same count, same mean: lower index
    assert D.predicted_scene(flat, sets, 2) == 0


def test_ranking_scores_by_hand() -> None:
    classes = [np.array([0, 2]), np.array([4, 3]), np.array([0, 1])]
    scores = [np.array([0.9, 0.3, 0.6, 0.1, 0.2, 0.0, 0.0, 0.0]),
              np.array([0.5, 0.45, 0.0, 0.4, 0.3, 0.1, 0.0, 0.0]),
              np.array([0.7, 0.2, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0])]
    got = D.ranking_scores(scores, classes, 2, D.scene_class_sets(WORLD), WORLD)
    # AP per class with a positive: 0 -> 1 (A, C above B); 1 -> 1/3 (C third); 2 -> 1/2 (C above A);
    # 3 -> 1; 4 -> 1.
    assert got["map"] == pytest.approx((1 + 1 / 3 + 0.5 + 1 + 1) / 5)
    # recall@2: A keeps both, B none (its top-2 is {0, 1}), C one of two.
    assert got["recall"] == pytest.approx(0.5)
    # Scenes at kappa 2: A -> 0 (right); B's top-2 {0, 1} fits scenes 0 and 2 equally (tie on
    # the mean too) -> 0, wrong (B is scene 1); C -> 0, one of its scenes {0, 2}.
    assert got["scene_acc"] == pytest.approx(2 / 3) and got["scene_images"] == 3
    none = D.ranking_scores([None, None, None], classes, 2, None, None)
    assert none == {"map": None, "recall": None, "scene_acc": None, "scene_images": None}
    # An image no scene explains is left out of the scene accuracy.
    odd = D.ranking_scores(scores + [scores[0]], classes + [np.array([0, 3])], 2, D.scene_class_sets(WORLD), WORLD)
    assert odd["scene_images"] == 3 and odd["scene_acc"] == pytest.approx(2 / 3)


def test_decoder_ranking_and_miou_by_hand() -> None:
    probs = np.array([[[0.5, 0.1], [0.2, 0.3]], [[0.4, 0.8], [0.1, 0.1]], [[0.1, 0.1], [0.7, 0.6]]])
    assert D.decoder_ranking(probs, np.array([1, 3, 6]), 8).tolist() == [0, 0.5, 0, 0.8, 0, 0, 0.7, 0]
    labels = [np.array([[0, 0], [1, 1]], np.uint16), np.array([[65535, 2]], np.uint16)]
    preds = [np.array([[0, 1], [1, 1]]), np.array([[2, 1]])]
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 2 -> 1/2; class 2: TP 0, FN 1 -> 0; ignore not counted.
    assert D.miou_of(preds, labels, 3) == pytest.approx((0.5 + 0.5 + 0.0) / 3)


def test_wrong_pixels_with_backgrounds_by_hand() -> None:
    rel = D.related_with_backgrounds(WORLD, np.array([0, 2]))
    label = np.array([[0, 0, 2, 2, 0, 0, 65535]], np.uint16)
    pred = np.array([[1, 5, 4, 7, 0, 2, 6]])  # scene-mate, look-alike, background, other, right, GT class, ignored
    err = RR.error_makeup([pred], [label], [np.array([0, 2])], [rel])
    assert err == pytest.approx({"err_gt": 0.2, "err_scene": 0.2, "err_look": 0.2, "err_background": 0.2,
                                 "err_other": 0.2})


def test_command_line_refuses_a_missing_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert D.main([str(tmp_path / "nope"), "--data", str(tmp_path), "--kappa", "5"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: ") and "no such run directory" in out and len(out.strip().splitlines()) == 1
