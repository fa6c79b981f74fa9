"""Semantic / panoptic inference on hand-built query outputs (expected maps built by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from rankseg_core.inference.mask2former import (
    full_class_logits,
    panoptic_inference,
    semantic_inference,
    semantic_inference_compact,
)
from rankseg_core.model.heads import FILL_LOGIT
from rankseg_core.model.mask2former.model import Mask2FormerOutput

# Masks are one row of 8 cells (image 4 x 32, cells of 4 columns). Bilinear x4 upsampling of
# +-BIG along a row weights the nearest cell >= 0.625, so sigmoid gives exact 0/1 blocks.
BIG = 1000.0


def cells_mask(cells: set[int], w: int = 8) -> torch.Tensor:
    m = torch.full((1, w), -BIG)
    for c in cells:
        m[0, c] = BIG
    return m


def class_row(k: int, cls: int, value: float) -> torch.Tensor:
    row = torch.zeros(k + 1)
    row[cls] = value
    return row


def output(logits: torch.Tensor, masks: torch.Tensor, k: int, image_size=(4, 32), topk=None, valid=None):
    return Mask2FormerOutput(pred_logits=logits[None], pred_masks=masks[None], aux=[], ml_logits=None,
                             topk_index=topk, valid=valid, image_size=image_size, num_classes=k)


K = 4
QUERIES = [  # (class, logit, cells of its mask)
    (0, 5.0, {0, 1}),     # thing, score e^5 / (e^5 + 4) = 0.974
    (0, 3.0, {2}),        # thing, 0.834
    (2, 5.0, {4, 5}),     # stuff
    (2, 3.0, {6}),        # stuff, same class: merged into the previous segment
    (1, 1.0, {3}),        # score 0.405 < 0.8: dropped
    (3, 3.0, {0, 1, 7}),  # wins only cell 7: 1/3 of its mask < 0.8: dropped
    (K, 6.0, {3, 7}),     # no-object: dropped
]


def hand_output() -> Mask2FormerOutput:
    logits = torch.stack([class_row(K, c, v) for c, v, _ in QUERIES])
    masks = torch.stack([cells_mask(cells) for _, _, cells in QUERIES])
    return output(logits, masks, K)


def test_panoptic_inference_hand_built() -> None:
    (seg, segments), = panoptic_inference(hand_output(), (4, 32), thing_classes=[0, 1])
    def s(v):
        return math.exp(v) / (math.exp(v) + K)
    expected_cells = [1, 1, 2, 0, 3, 3, 3, 0]  # cell 3: only dropped queries; cell 7: the dropped class-3 query
    expected = torch.tensor(expected_cells, dtype=torch.int32).repeat_interleave(4)[None].expand(4, -1)
    assert seg.dtype == torch.int32 and torch.equal(seg, expected)
    assert [(d["id"], d["category"], d["isthing"]) for d in segments] == [(1, 0, True), (2, 0, True), (3, 2, False)]
    assert [d["score"] for d in segments] == pytest.approx([s(5), s(3), s(5)], rel=1e-5)


def test_panoptic_thresholds_and_empty() -> None:
    (seg, segments), = panoptic_inference(hand_output(), (4, 32), [0, 1], object_mask_threshold=0.99)
    assert segments == [] and (seg == 0).all()
    # overlap 0.3: the class-3 query keeps its one won cell (1/3 >= 0.3)
    (seg, segments), = panoptic_inference(hand_output(), (4, 32), [0, 1], overlap_threshold=0.3)
    assert segments[-1]["category"] == 3 and (seg[:, 28:] == segments[-1]["id"]).all()
    assert (seg[:, :28] != segments[-1]["id"]).all()


def test_semantic_inference_hand_built() -> None:
    out = hand_output()
    scores = semantic_inference(out, (4, 32))
    assert scores.shape == (1, K, 4, 32)
    probs = torch.stack([class_row(K, c, v) for c, v, _ in QUERIES]).softmax(-1)
    for c in range(8):
        # sum over queries of P(class) * [cell in the query's mask] (sigmoid(+-BIG) is exactly 1 / 0)
        exp = torch.zeros(K)
        for q, (_, _, cells) in enumerate(QUERIES):
            if c in cells:
                exp = exp + probs[q, :K]
        block = scores[0, :, :, 4 * c:4 * c + 4]
        torch.testing.assert_close(block, exp[:, None, None].expand(-1, 4, 4), atol=1e-6, rtol=1e-6)


def test_crop_of_padding_before_resize() -> None:
    # image 4 x 16 padded to 4 x 32: a mask drawn only in the padding never reaches the output
    logits = torch.stack([class_row(K, 1, 5.0)])
    masks = cells_mask({5, 6, 7})[None]
    scores = semantic_inference(output(logits, masks, K, image_size=(4, 16)), (2, 8))
    assert scores.shape == (1, K, 2, 8) and scores.abs().max() == 0


def test_scatter_back_to_k_plus_one() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # columns: class 3, class 0, no-object
    out = output(logits, torch.zeros(2, 1, 8), 5, topk=torch.tensor([[3, 0]]))
    full = full_class_logits(out)[0]
    f = FILL_LOGIT
    assert full.tolist() == [[2.0, f, f, 1.0, f, 3.0], [5.0, f, f, 4.0, f, 6.0]]
    padded = output(logits, torch.zeros(2, 1, 8), 5, topk=torch.tensor([[3, 0]]), valid=torch.tensor([[True, False]]))
    assert full_class_logits(padded)[0, 0].tolist() == [f, f, f, 1.0, f, 3.0]  # padding is not written to class 0


def test_compact_equals_full_for_a_selection() -> None:
    torch.manual_seed(0)
    k = 12
    topk = torch.tensor([[7, 2, 9], [0, 11, 4]])
    logits = torch.randn(2, 5, 4) * 2
    out = Mask2FormerOutput(pred_logits=logits, pred_masks=torch.randn(2, 5, 3, 3), aux=[], ml_logits=None,
                            topk_index=topk, valid=None, image_size=(12, 12), num_classes=k)
    full = semantic_inference(out, (10, 11))
    compact, classes, valid = semantic_inference_compact(out, (10, 11))
    assert valid is None and torch.equal(classes, topk)
    torch.testing.assert_close(compact, full.gather(1, topk[:, :, None, None].expand(-1, -1, 10, 11)))
    others = torch.ones(k, dtype=torch.bool)
    others[[7, 2, 9]] = False
    assert full[0, others].abs().max() < 1e-30  # unselected classes: -100 logits
    scores, classes, valid = semantic_inference_compact(out, (10, 11))
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    best = scores.argmax(1)  # column of the compact scores -> class id
    assert torch.equal(classes.gather(1, best.flatten(1)).reshape(best.shape), full.argmax(1))
