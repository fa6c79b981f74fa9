"""A tiny Mask2Former (+ RankSeg) overfits one synthetic image in ~30 steps on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import m2f_semantic_map, overfit
from conftest import tiny_m2f_cfg as tiny_cfg
from conftest import tiny_m2f_model as tiny_model

from rankseg_core.inference.mask2former import panoptic_inference
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.targets import targets_from_semantic

K = 10


def synthetic_image() -> tuple[torch.Tensor, torch.Tensor]:
    """64 x 64: class 3 on top, class 7 bottom-left, class 1 bottom-right, an ignore patch;
    each class has its own colour so the image explains the labels."""
    lab = torch.full((64, 64), 1, dtype=torch.long)
    lab[:32] = 3
    lab[32:, :24] = 7
    lab[40:48, 44:60] = 255
    colours = {1: (1.0, -1.0, 0.0), 3: (-1.0, 1.0, 0.5), 7: (0.0, 0.5, -1.0), 255: (0.0, 0.0, 0.0)}
    img = torch.zeros(1, 3, 64, 64)
    for c, rgb in colours.items():
        img[0, :, lab == c] = torch.tensor(rgb)[:, None]
    return img, lab


@pytest.mark.slow  # 6-20 s each on one shared core
@pytest.mark.parametrize("head", ["segmenter", "rankseg"])
def test_overfits_one_image(head: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(head=head, kappa=4).train()
    crit = Mask2FormerCriterion(tiny_cfg(head=head, kappa=4))
    img, lab = synthetic_image()
    targets = [targets_from_semantic(lab, K, 255)]
    losses = overfit(model, crit, img, targets)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    model.eval()
    with torch.no_grad():
        out = model(img)  # no ground truth at test time
    pred = m2f_semantic_map(out, (64, 64))[0]
    labelled = lab != 255
    assert (pred[labelled] == lab[labelled]).float().mean() > 0.8
    if head == "rankseg":
        assert {1, 3, 7} <= set(out.topk_index[0].tolist())  # the ml head learned the image's classes
    (seg, segments), = panoptic_inference(out, (64, 64), thing_classes=[7], object_mask_threshold=0.0,
                                          overlap_threshold=0.0)
    assert {d["category"] for d in segments} <= set(range(K)) and seg.shape == (64, 64)
