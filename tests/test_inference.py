"""Inference helpers: -100 scatter, whole / slide / multi-scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankseg_core.inference import (compact_logits, predict_compact, predict_multiscale, predict_slide, predict_whole,
                                    scatter_to_classes)
from rankseg_core.model import ModelConfig, SegOutput, build_model

K = 10


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelConfig(img_size=32, num_classes=K, kappa=3)).eval()


def test_scatter_minus_100() -> None:
    logits = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).reshape(2, 3, 1, 2)
    out = SegOutput(mask_logits=logits, topk_index=torch.tensor([[4, 0, 7], [1, 2, 3]]))
    full = scatter_to_classes(out, num_classes=8)
    assert full.shape == (2, 8, 1, 2)
    assert torch.equal(full[0, 4], logits[0, 0]) and torch.equal(full[0, 0], logits[0, 1])
    assert torch.equal(full[0, 7], logits[0, 2]) and torch.equal(full[1, 3], logits[1, 2])
    untouched = [c for c in range(8) if c not in (4, 0, 7)]
    assert (full[0, untouched] == -100).all()


def test_scatter_skips_padding_channels() -> None:
    logits = torch.ones(1, 3, 1, 1)
    out = SegOutput(mask_logits=logits, topk_index=torch.tensor([[2, 5, 0]]),
                    valid=torch.tensor([[True, True, False]]))
    full = scatter_to_classes(out, num_classes=6, fill=-7.0)
    assert full[0, :, 0, 0].tolist() == [-7.0, -7.0, 1.0, -7.0, -7.0, 1.0]


def test_scatter_passthrough_and_class_valid() -> None:
    logits = torch.randn(1, 4, 2, 2)
    assert scatter_to_classes(SegOutput(mask_logits=logits), 4) is logits
    masked = scatter_to_classes(SegOutput(mask_logits=logits, valid=torch.tensor([[True, False, True, False]])), 4)
    assert (masked[0, 1] == -100).all() and torch.equal(masked[0, 0], logits[0, 0])


def test_upsample_before_scatter_equals_after() -> None:
    torch.manual_seed(0)
    out = SegOutput(mask_logits=torch.randn(1, 3, 2, 2), topk_index=torch.tensor([[5, 1, 3]]))
    a = scatter_to_classes(out, 6, size=(8, 8))
    b = F.interpolate(scatter_to_classes(out, 6), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(a, b)


def test_predict_whole_shapes_and_padding(model) -> None:
    x = torch.randn(2, 3, 40, 36)  # not multiples of 16: padded inside, cropped back
    logits, ml = predict_whole(model, x, K, return_ml=True)
    assert logits.shape == (2, K, 40, 36) and ml.shape == (2, K)
    assert ((logits == -100).sum(1) == K - 3).all()  # kappa classes selected per image


def test_slide_equals_whole_when_one_window_covers(model) -> None:
    x = torch.randn(1, 3, 32, 32)
    whole, ml_w = predict_whole(model, x, K, return_ml=True)
    slide, ml_s = predict_slide(model, x, K, crop=32, stride=16, return_ml=True)
    torch.testing.assert_close(slide, whole)
    torch.testing.assert_close(ml_s, ml_w)


def test_slide_averages_overlaps_including_minus_100(model) -> None:
    x = torch.randn(1, 3, 48, 32)  # windows at rows 0..32 and 16..48
    slide = predict_slide(model, x, K, crop=32, stride=16)
    top = predict_whole(model, x[:, :, :32], K)
    bottom = predict_whole(model, x[:, :, 16:], K)
    expected = torch.zeros(1, K, 48, 32)
    expected[:, :, :16] = top[:, :, :16]
    expected[:, :, 16:32] = (top[:, :, 16:] + bottom[:, :, :16]) / 2
    expected[:, :, 32:] = bottom[:, :, 16:]
    torch.testing.assert_close(slide, expected)


def test_slide_pads_small_images(model) -> None:
    x = torch.randn(1, 3, 16, 20)
    slide = predict_slide(model, x, K, crop=32, stride=16)
    assert slide.shape == (1, K, 16, 20)
    padded = F.pad(x, (0, 12, 0, 16))
    torch.testing.assert_close(slide, predict_whole(model, padded, K)[..., :16, :20])


def test_multiscale_is_mean_of_softmax(model) -> None:
    x = torch.randn(1, 3, 32, 32)
    probs, ml = predict_multiscale(model, x, K, scales=(1.0, 1.5), flip=True, return_ml=True)
    assert probs.shape == (1, K, 32, 32) and ml.shape == (1, K)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 32, 32))
    single = predict_whole(model, x, K).softmax(1)
    flipped = predict_whole(model, x.flip(-1), K).flip(-1).softmax(1)
    big = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    big_logits = predict_whole(model, big, K)
    big_flip = predict_whole(model, big.flip(-1), K).flip(-1)
    down = [F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False).softmax(1)
            for t in (big_logits, big_flip)]
    torch.testing.assert_close(probs, (single + flipped + down[0] + down[1]) / 4)
    slide = predict_multiscale(model, x, K, scales=(1.0,), mode="slide", crop=32, stride=16)
    torch.testing.assert_close(slide, single)


def test_predict_with_gt_override(model) -> None:
    x = torch.randn(1, 3, 32, 32)
    logits = predict_slide(model, x, K, crop=32, stride=16, select_override=[torch.tensor([2, 6])])
    selected = (logits[0, :, 0, 0] != -100).nonzero().flatten().tolist()
    assert selected == [2, 6]


@pytest.mark.parametrize("mode, scales, flip", [("whole", (1.0, 1.5), True), ("slide", (0.75, 1.0), False)])
def test_compact_maps_hold_only_selected_classes(model, mode: str, scales: tuple, flip: bool) -> None:
    """Multi-scale / slide results over the union of selections equal the dense K-channel ones."""
    x = torch.randn(2, 3, 48, 40)
    maps, ml = predict_compact(model, x, K, scales=scales, flip=flip, mode=mode, crop=32, stride=16)
    passes = len(scales) * (2 if flip else 1) * (6 if mode == "slide" else 1)
    assert maps.classes.numel() <= min(K, 2 * 3 * passes)  # batch of 2, kappa 3
    assert torch.equal(maps.classes, torch.unique(maps.classes))
    dense = predict_multiscale(model, x, K, scales=scales, flip=flip, mode=mode, crop=32, stride=16)
    torch.testing.assert_close(maps.to_dense(K, 0.0), dense)
    assert torch.equal(maps.argmax(), dense.argmax(1))
    torch.testing.assert_close(maps.maps.sum(1), torch.ones(2, 48, 40))


def test_compact_logits_batch_union_fills_other_images_classes() -> None:
    logits = torch.arange(2 * 2 * 1 * 1, dtype=torch.float32).reshape(2, 2, 1, 1)
    out = SegOutput(mask_logits=logits, topk_index=torch.tensor([[4, 1], [1, 6]]),
                    valid=torch.tensor([[True, True], [True, False]]))
    maps = compact_logits(out, num_classes=8)
    assert maps.classes.tolist() == [1, 4]  # 6 is a padding column
    assert maps.maps[:, :, 0, 0].tolist() == [[1.0, 0.0], [2.0, -100.0]]
    torch.testing.assert_close(maps.to_dense(8, -100.0), scatter_to_classes(out, 8))


def test_compact_maps_stay_near_kappa_channels_at_large_k() -> None:
    torch.manual_seed(0)
    big_k = build_model(ModelConfig(img_size=32, num_classes=200, kappa=4)).eval()
    maps, _ = predict_compact(big_k, torch.randn(1, 3, 32, 32), 200, scales=(1.0, 1.25), flip=True)
    assert 4 <= maps.classes.numel() <= 4 * 4  # 4 passes of kappa 4, never 200
    assert maps.maps.shape == (1, maps.classes.numel(), 32, 32)
