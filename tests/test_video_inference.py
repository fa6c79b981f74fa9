"""YouTube-VIS inference (docs/video.md): the top-k (query, class) pairs and scores of the
official whole-video inference on a hand-built model output, masks upsampled frame by frame
against the official "all queries x all frames, then select" order, null for empty frames,
the hand-computed AP, and predict-vis -> eval-vis end to end on a tiny clip run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MASK2FORMER_RUN, assert_one_line_error
from pycocotools import mask as mask_utils
from torch import Tensor, nn
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic_video import prepare_synthetic_video
from rankseg_core.evaluation.video_instances import Track, VideoInstanceEval
from rankseg_core.inference.video_instances import tracks_from_output, video_instance_predictions
from rankseg_core.model.mask2former.video import VideoMask2FormerOutput
from rankseg_core.model.selection import NO_SELECTION, Selection

# Q = 3 queries, K = 2 classes (+ no-object), T = 2 frames, 2 x 2 mask logits, 8 x 8 frames.
LOGITS = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
LEFT = torch.tensor([[5.0, -5.0], [5.0, -5.0]])  # upsampled 4x: columns 0..3 > 0 (hand: +-1.25 at 3 / 4)
MASKS = torch.stack([
    torch.stack([-LEFT, -LEFT]),  # query 0: right half in both frames
    torch.stack([LEFT, torch.full((2, 2), -5.0)]),  # query 1: left half, then empty
    torch.stack([torch.full((2, 2), -5.0), LEFT]),  # query 2: empty, then left half
])
SIZE = (8, 8)


def output(logits: Tensor = LOGITS, masks: Tensor = MASKS, image_size: tuple[int, int] = SIZE,
           **kw: object) -> VideoMask2FormerOutput:
    args = {"topk_index": None, "valid": None, "num_classes": logits.shape[1] - 1} | kw
    return VideoMask2FormerOutput(pred_logits=logits[None], pred_masks=masks[None], aux=[], ml_logits=None,
                                  image_size=image_size, clip_len=masks.shape[1], **args)  # type: ignore[arg-type]


def half(left: bool) -> np.ndarray:
    m = np.zeros(SIZE, bool)
    m[:, :4] = left
    m[:, 4:] = not left
    return m


def decode(rle: dict | None) -> np.ndarray | None:
    return None if rle is None else mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def test_top_pairs_and_scores_by_hand() -> None:
    z = [math.exp(3) + 2, math.exp(2) + 2, math.exp(1) + 2]  # softmax denominators of the three queries
    tracks = tracks_from_output(output(), SIZE, top_k=4)
    # All 6 (query, class) probabilities, highest first: (0,0) e^3/z0, (1,0) e^2/z1, (2,1) e/z2, then
    # (2,0) 1/z2 > (1,1) 1/z1 > (0,1) 1/z0.
    assert [t.category for t in tracks] == [0, 0, 1, 0]
    assert [t.score for t in tracks] == pytest.approx([math.exp(3) / z[0], math.exp(2) / z[1], math.e / z[2],
                                                       1 / z[2]])
    # Masks: hand-built halves; a frame without a pixel is null (no RLE).
    expect = [[half(False), half(False)], [half(True), None], [None, half(True)], [None, half(True)]]
    for t, e in zip(tracks, expect):
        for rle, m in zip(t.masks, e):
            got = decode(rle)
            assert (got is None and m is None) or (got is not None and m is not None and (got == m).all())
    assert tracks[0].masks[0]["size"] == [8, 8] and isinstance(tracks[0].masks[0]["counts"], str)


def test_score_is_the_class_probability_alone_not_times_mask_score() -> None:
    # The same logits with masks of another confidence: the VIS scores do not change.
    a = tracks_from_output(output(), SIZE, top_k=3)
    b = tracks_from_output(output(masks=MASKS * 0.01), SIZE, top_k=3)
    assert [t.score for t in a] == [t.score for t in b]


def test_frame_by_frame_equals_official_order_on_random_outputs() -> None:
    # Official order: upsample all Q x T masks to the padded input, crop, resize, threshold,
    # then take the top-k pairs; here the k queries are chosen first, frame by frame.
    g = torch.Generator().manual_seed(0)
    q, k, t, h, w = 7, 5, 3, 6, 5
    logits, masks = torch.randn(q, k + 1, generator=g) * 2, torch.randn(q, t, h, w, generator=g) * 3
    image_size, size = (21, 17), (30, 25)  # the padded input is 24 x 20
    tracks = tracks_from_output(output(logits, masks, image_size), size, top_k=6)
    probs = logits.softmax(-1)[:, :-1].numpy()
    pairs = sorted(((float(probs[i, c]), i, c) for i in range(q) for c in range(k)), key=lambda x: -x[0])[:6]
    full = F.interpolate(masks, size=(h * 4, w * 4), mode="bilinear", align_corners=False)[..., :21, :17]
    full = F.interpolate(full, size=size, mode="bilinear", align_corners=False) > 0  # Q x T x H x W
    assert len(tracks) == 6
    for tr, (s, i, c) in zip(tracks, pairs):
        assert tr.category == c and tr.score == pytest.approx(s)
        for f in range(t):
            got = decode(tr.masks[f])
            want = full[i, f].numpy()
            assert (got is None and not want.any()) or (got is not None and (got == want).all())


def test_rankseg_columns_are_scattered_back_to_classes() -> None:
    # Selected classes (2, 0) of K = 3: column 0 is class 2, column 1 class 0, then no-object.
    tracks = tracks_from_output(output(LOGITS, MASKS, topk_index=torch.tensor([[2, 0]]),
                                       num_classes=3), SIZE, top_k=2)
    assert [t.category for t in tracks] == [2, 2]


class FixedModel(nn.Module):
    """Returns the fixed output; records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION, clip_len: int = 1) -> VideoMask2FormerOutput:
        self.calls.append((tuple(images.shape), clip_len))
        return output()


def test_whole_video_is_one_clip_and_scores_the_hand_computed_ap() -> None:
    model = FixedModel()
    preds = video_instance_predictions(model, torch.zeros(2, 3, 8, 8), SIZE, top_k=3)
    assert model.calls == [((2, 3, 8, 8), 2)]  # the 2 frames as ONE clip
    # Ground truth: one class-0 track, left half in frame 0, absent in frame 1 (= query 1's mask).
    gt_rle = mask_utils.encode(np.asfortranarray(half(True)[:, :, None].astype(np.uint8)))[0]
    ev = VideoInstanceEval(2)
    ev.update(1, [Track(0, [gt_rle, None])], preds)
    s = ev.compute()
    # Class 0, by score: query 0 (right halves: IoU 0, a false positive), then query 1 (IoU 1):
    # precision 1/2 at recall 1, so 1/2 at every recall point and IoU threshold. Class 1 has no
    # ground truth and does not count.
    assert s.ap == pytest.approx(0.5) and s.ap50 == pytest.approx(0.5) and math.isnan(s.per_class_ap[1])
    assert s.ar1 == pytest.approx(0.0) and s.ar10 == pytest.approx(1.0)


def test_bad_frames_are_refused() -> None:
    with pytest.raises(ValueError, match="T x 3 x H x W"):
        video_instance_predictions(FixedModel(), torch.zeros(0, 3, 8, 8), SIZE)


# --- end to end: tiny clip run -> predict-vis -> eval-vis -------------------------------------

K = 40
CLIP = TINY_MASK2FORMER_RUN + ["model.clip_len=2", "model.mask2former.task=instance", "eval.batch_size=2",
                               "schedule.iters=2", "data.val_split="]


def test_predict_vis_then_eval_vis(tmp_path: Path) -> None:
    data = tmp_path / "data"
    prepare_synthetic_video(data, num_classes=K, videos=2, val_videos=2, frames=3, size=64, seed=0,
                            opts=ConvertOptions(samples_per_shard=8))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run),
                                   *[f"--set={s}" for s in CLIP]])
    assert res.exit_code == 0, res.output
    out = tmp_path / "results.json"
    res = CliRunner().invoke(app, ["predict-vis", str(run), "--data", str(data), "--split", "val", "--out", str(out),
                                   "--device", "cpu", "--top-k", "4"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert isinstance(doc, list) and len(doc) == 2 * 4  # 2 videos x top-4 tracks
    for e in doc:
        assert set(e) == {"video_id", "category_id", "score", "segmentations"}
        assert e["video_id"] in (1, 2) and 1 <= e["category_id"] <= K and 0.0 <= e["score"] <= 1.0
        assert len(e["segmentations"]) == 3  # one per frame of the video
        for m in e["segmentations"]:
            assert m is None or (m["size"] == [64, 64] and isinstance(m["counts"], str) and decode(m).any())
    scores = [e["score"] for e in doc if e["video_id"] == 1]
    assert scores == sorted(scores, reverse=True)
    res = CliRunner().invoke(app, ["eval-vis", str(out), "--data", str(data), "--split", "val"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "results_vis_scores.json").read_text())
    assert rep["num_videos"] == 2 and (rep["ap"] is None or 0.0 <= rep["ap"] <= 1.0)
    # Never over an input: the shards' dataset.json is refused in one line, untouched.
    before = (data / "dataset.json").read_bytes()
    res = CliRunner().invoke(app, ["predict-vis", str(run), "--data", str(data), "--split", "val",
                                   "--out", str(data / "dataset.json"), "--device", "cpu"])
    assert_one_line_error(res, "dataset.json", "choose another --out")
    assert (data / "dataset.json").read_bytes() == before
