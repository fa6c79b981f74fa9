"""Inference helpers: -100 scatter, whole / slide / multi-scale, compact vs dense.

The official-protocol semantics (logits resized before the softmax, unpadded small windows,
grid stretched over unpadded sizes) are checked against an independent dense re-implementation
of mmseg in tests/test_protocol.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankseg_core.config.model import ModelConfig
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.inference.dense import (
    compact_logits,
    predict_multiscale,
    predict_probs,
    predict_slide,
    predict_whole,
    scaled_size,
    scatter_to_classes,
)
from rankseg_core.model.heads import SegOutput
from rankseg_core.model.selection import Selection

K = 10


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return SEGMENTER.build(ModelConfig(img_size=32, num_classes=K, kappa=3)).eval()


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
    x = torch.randn(2, 3, 40, 36)  # not multiples of 16: padded for the forward
    logits, ml = predict_whole(model, x, K, return_ml=True)
    assert logits.shape == (2, K, 40, 36) and ml.shape == (2, K)
    assert ((logits == -100).sum(1) == K - 3).all()  # kappa classes selected per image
    # The 3 x 3 patch grid of the padded 48 x 48 input is stretched over the unpadded 40 x 36
    # (mmseg resizes to the input size), not resized to 48 x 48 and cropped.
    out = model(F.pad(x, (0, 12, 0, 8)))
    grid = scatter_to_classes(out, K)
    torch.testing.assert_close(logits, F.interpolate(grid, size=(40, 36), mode="bilinear", align_corners=False))
    cropped = F.interpolate(grid, size=(48, 48), mode="bilinear", align_corners=False)[..., :40, :36]
    assert not torch.allclose(logits, cropped)


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


def test_slide_decodes_small_windows_unpadded(model) -> None:
    x = torch.randn(1, 3, 16, 20)  # smaller than the 32 crop: one window, the image itself
    slide = predict_slide(model, x, K, crop=32, stride=16)
    assert slide.shape == (1, K, 16, 20)
    torch.testing.assert_close(slide, predict_whole(model, x, K))
    # Padding the window to the crop (the old behaviour) gives other logits: the zeros enter
    # the patch tokens and the 8 x 8 pooling of the ml branch.
    padded = predict_whole(model, F.pad(x, (0, 12, 0, 16)), K)[..., :16, :20]
    assert not torch.allclose(slide, padded)


def test_multiscale_is_mean_of_softmax_of_resized_logits(model) -> None:
    x = torch.randn(1, 3, 32, 32)
    probs, ml = predict_multiscale(model, x, K, scales=(1.0, 1.5), flip=True, size=(45, 41), return_ml=True)
    assert probs.shape == (1, K, 45, 41) and ml.shape == (1, K)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 45, 41))
    def up(t):
        return (F.interpolate(t, size=(45, 41), mode="bilinear", align_corners=False))
    single = up(predict_whole(model, x, K)).softmax(1)
    flipped = up(predict_whole(model, x.flip(-1), K)).softmax(1).flip(-1)
    big = F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False)
    passes = [up(predict_whole(model, big, K)).softmax(1), up(predict_whole(model, big.flip(-1), K)).softmax(1).flip(-1)]
    torch.testing.assert_close(probs, (single + flipped + passes[0] + passes[1]) / 4)
    slide = predict_multiscale(model, x, K, scales=(1.0,), mode="slide", crop=32, stride=16)
    torch.testing.assert_close(slide, predict_whole(model, x, K).softmax(1))


def test_scaled_size_rounds_half_up() -> None:
    assert scaled_size(512, 683, 0.75) == (384, 512)  # 512.25
    assert scaled_size(3, 5, 0.5) == (2, 3)  # 1.5 -> 2, 2.5 -> 3 (Python's round gives 2, 2)
    assert scaled_size(1, 1, 0.1) == (1, 1)


def test_predict_with_gt_override(model) -> None:
    x = torch.randn(1, 3, 32, 32)
    logits = predict_slide(model, x, K, crop=32, stride=16, selection=Selection(override=[torch.tensor([2, 6])]))
    selected = (logits[0, :, 0, 0] != -100).nonzero().flatten().tolist()
    assert selected == [2, 6]


@pytest.mark.parametrize("mode, scales, flip", [("whole", (1.0, 1.5), True), ("slide", (0.75, 1.0), False)])
def test_compact_maps_hold_only_selected_classes(model, mode: str, scales: tuple, flip: bool) -> None:
    """Per-image maps hold only that image's selected classes and equal the dense result."""
    x = torch.randn(2, 3, 48, 40)
    maps, _ = predict_probs(model, x, K, sizes=[(50, 41), (30, 33)], scales=scales, flip=flip, mode=mode,
                            crop=32, stride=16)
    passes = len(scales) * (2 if flip else 1) * (6 if mode == "slide" else 1)
    for i, size in enumerate([(50, 41), (30, 33)]):
        m = maps[i]
        assert m.maps.shape == (1, m.classes.numel(), *size)
        assert m.classes.numel() <= min(K, 3 * passes)  # kappa 3 per window and pass, this image only
        assert torch.equal(m.classes, torch.unique(m.classes))
        dense = predict_multiscale(model, x[i:i + 1], K, scales=scales, flip=flip, mode=mode, crop=32, stride=16,
                                   size=size)
        torch.testing.assert_close(m.to_dense(K, 0.0), dense)
        assert torch.equal(m.argmax(), dense.argmax(1))
        torch.testing.assert_close(m.maps.sum(1), torch.ones(1, *size))


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
    big_k = SEGMENTER.build(ModelConfig(img_size=32, num_classes=200, kappa=4)).eval()
    maps, _ = predict_probs(big_k, torch.randn(2, 3, 32, 32), 200, scales=(1.0, 1.25), flip=True)
    for m in maps:  # 4 passes of kappa 4 per image, never 200 (nor the other image's classes)
        assert 4 <= m.classes.numel() <= 4 * 4
        assert m.maps.shape == (1, m.classes.numel(), 32, 32)
