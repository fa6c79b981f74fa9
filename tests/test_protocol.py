"""The test protocol against an independent, literal re-typing of mmseg 0.x (RankSeg fork).

The reference below follows `EncoderDecoder.encode_decode / slide_inference / inference /
aug_test` of openseg-group/RankSeg (mmseg/mmseg/models/segmentors/encoder_decoder.py) and the
fork's `PatchEmbed(pad_to_patch_size=True)`, with a DENSE K-channel tensor (-100 for the
classes a window did not select) and the softmax over all K. rankseg's compact per-image
class maps must give the same probabilities and the same argmax.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.engine.configure import resolve
from rankseg_core.families.base import InferenceProtocol
from rankseg_core.families.segmenter import SEGMENTER, predict
from rankseg_core.inference.dense import mmseg_scale_sizes, predict_probs
from rankseg_core.model.selection import NO_SELECTION, Selection

K = 12
PATCH = 16


# ---------------------------------------------------------------------------------------
# Reference (dense, straight from the mmseg code paths)


def ref_encode_decode(model, img: torch.Tensor, **kw) -> torch.Tensor:
    h_img, w_img = img.shape[2], img.shape[3]
    x = img
    if h_img % PATCH != 0:  # PatchEmbed: pad bottom, then right, to the patch size
        x = F.pad(x, (0, 0, 0, PATCH - h_img % PATCH))
    if w_img % PATCH != 0:
        x = F.pad(x, (0, PATCH - w_img % PATCH, 0, 0))
    out = model(x, Selection(**kw))
    masks = out.mask_logits
    b, _, h, w = masks.shape
    if out.topk_index is None:
        full = masks
    else:  # the head at inference: -100 everywhere, selected channels scattered in
        full = masks.new_ones((b, K, h, w)) * -100
        for i in range(b):
            keep = out.topk_index[i] if out.valid is None else out.topk_index[i][out.valid[i]]
            chans = masks[i] if out.valid is None else masks[i][out.valid[i]]
            full[i, keep] = chans
    return F.interpolate(full, size=(h_img, w_img), mode="bilinear", align_corners=False)


def ref_slide_inference(model, img: torch.Tensor, crop: int, stride: int, **kw) -> torch.Tensor:
    h_stride, w_stride = stride, stride
    h_crop, w_crop = crop, crop
    batch_size, _, h_img, w_img = img.size()
    h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
    preds = img.new_zeros((batch_size, K, h_img, w_img))
    count_mat = img.new_zeros((batch_size, 1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * h_stride
            x1 = w_idx * w_stride
            y2 = min(y1 + h_crop, h_img)
            x2 = min(x1 + w_crop, w_img)
            y1 = max(y2 - h_crop, 0)
            x1 = max(x2 - w_crop, 0)
            crop_img = img[:, :, y1:y2, x1:x2]
            crop_seg_logit = ref_encode_decode(model, crop_img, **kw)
            preds += F.pad(crop_seg_logit, (int(x1), int(preds.shape[3] - x2), int(y1), int(preds.shape[2] - y2)))
            count_mat[:, :, y1:y2, x1:x2] += 1
    assert (count_mat == 0).sum() == 0
    return preds / count_mat


def ref_inference(model, img, ori_shape, flip: bool, mode: str, crop: int, stride: int, **kw) -> torch.Tensor:
    if mode == "slide":
        seg_logit = ref_slide_inference(model, img, crop, stride, **kw)
    else:
        seg_logit = ref_encode_decode(model, img, **kw)
    seg_logit = F.interpolate(seg_logit, size=ori_shape, mode="bilinear", align_corners=False)  # rescale
    output = F.softmax(seg_logit, dim=1)
    if flip:
        output = output.flip(dims=(3,))
    return output


def ref_aug_test(model, imgs, flips, ori_shape, mode, crop, stride, **kw) -> torch.Tensor:
    seg_logit = ref_inference(model, imgs[0], ori_shape, flips[0], mode, crop, stride, **kw)
    for i in range(1, len(imgs)):
        seg_logit += ref_inference(model, imgs[i], ori_shape, flips[i], mode, crop, stride, **kw)
    return seg_logit / len(imgs)


def ref_predict(model, img, ori_shape, scales, flip, mode, crop, stride, **kw) -> torch.Tensor:
    """MultiScaleFlipAug's images (here: the test image resized per scale, as rankseg does;
    see docs/model.md for that remaining difference), then aug_test. -> 1 x K x H0 x W0."""
    h, w = img.shape[-2:]
    imgs, flips = [], []
    for s in scales:
        size = (int(h * s + 0.5), int(w * s + 0.5))
        scaled = img if size == (h, w) else F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for f in ((False, True) if flip else (False,)):
            imgs.append(scaled.flip(-1) if f else scaled)
            flips.append(f)
    return ref_aug_test(model, imgs, flips, ori_shape, mode, crop, stride, **kw)


# ---------------------------------------------------------------------------------------
# Comparison


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"rankseg": SEGMENTER.build(ModelConfig(img_size=32, num_classes=K, kappa=3)).eval(),
            "baseline": SEGMENTER.build(ModelConfig(img_size=32, num_classes=K, head="segmenter")).eval()}


def assert_same_prediction(ours: torch.Tensor, ref: torch.Tensor, classes: torch.Tensor) -> None:
    """Probabilities equal to float rounding; the predicted class is the reference's argmax,
    or where the reference has a tie (two passes each sure of another class give 0.5 / 0.5),
    one of the tied classes."""
    torch.testing.assert_close(ours, ref, atol=2e-6, rtol=1e-5)
    top = ref.max(1).values
    assert (ref.gather(1, classes[:, None]).squeeze(1) >= top - 1e-5).all()
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert clear.float().mean() > 0.5  # the exact comparison below is not vacuous
    assert torch.equal(classes[clear], ref.argmax(1)[clear])


CASES = [  # (image h, w), original (label) size, crop, stride
    ((20, 27), (41, 50), 32, 32),  # smaller than the crop on both sides, not multiples of 16
    ((48, 40), (95, 77), 32, 32),  # larger: non-overlapping windows, the last flush with the border
    ((70, 33), (70, 33), 32, 16),  # overlapping windows, no final resize
    ((32, 24), (64, 48), 32, 16),  # one side shorter than the crop
]


@pytest.mark.parametrize("image, ori, crop, stride", CASES)
@pytest.mark.parametrize("mode", ["slide", "whole"])
@pytest.mark.parametrize("scales, flip", [((1.0,), False), ((0.5, 1.0), True), ((0.75, 1.25), False)])
def test_matches_dense_mmseg_reference(models, image, ori, crop, stride, mode, scales, flip) -> None:
    torch.manual_seed(sum(image) + len(scales) + int(flip))
    x = torch.randn(2, 3, *image)
    maps, _ = predict_probs(models["rankseg"], x, K, sizes=[ori, ori], scales=scales, flip=flip, mode=mode,
                            crop=crop, stride=stride)
    for i in range(2):
        ref = ref_predict(models["rankseg"], x[i:i + 1], ori, scales, flip, mode, crop, stride)
        assert_same_prediction(maps[i].to_dense(K, 0.0), ref, maps[i].argmax())


@pytest.mark.parametrize("fwd_kw", [{}, {"dynamic_threshold": 0.5}, {"kappa": K}])
def test_reference_selection_options_and_baseline(models, fwd_kw) -> None:
    x = torch.randn(1, 3, 40, 52)
    for model in models.values():
        maps, _ = predict_probs(model, x, K, sizes=[(77, 99)], scales=(0.75, 1.0), flip=True, mode="slide",
                                crop=32, stride=24, selection=Selection(**fwd_kw))
        ref = ref_predict(model, x, (77, 99), (0.75, 1.0), True, "slide", 32, 24, **fwd_kw)
        assert_same_prediction(maps[0].to_dense(K, 0.0), ref, maps[0].argmax())


def test_resize_before_softmax_changes_labels(models) -> None:
    """The old order (softmax at the test size, then resize the probabilities) is measurably
    different from the official one: the test above would catch a regression."""
    torch.manual_seed(1)
    x = torch.randn(1, 3, 48, 64)
    ref = ref_predict(models["rankseg"], x, (150, 200), (1.0,), False, "slide", 32, 32)
    logits = ref_slide_inference(models["rankseg"], x, 32, 32)
    old = F.interpolate(logits.softmax(1), size=(150, 200), mode="bilinear", align_corners=False)
    assert (old.argmax(1) != ref.argmax(1)).any()
    assert not torch.allclose(old, ref, atol=1e-4)


def test_family_predict_uses_the_protocol_and_mmcv_scale_sizes(models) -> None:
    cfg = TrainConfig()
    for key, value in {"model.img_size": 32, "model.num_classes": K, "model.kappa": 3}.items():
        setattr(cfg.model, key.split(".")[1], value)
    cfg.eval.short_side, cfg.eval.max_long = 32, 128
    resolve(cfg)
    assert (cfg.eval.crop, cfg.eval.stride) == (32, 32)
    # A 45 x 61 original resized for testing: short side 32 -> 32 x 43 (mmcv rescale_size).
    x = torch.randn(1, 3, 32, 43)
    sizes = mmseg_scale_sizes(cfg.eval, x, [(45, 61)], [0.5, 0.75, 1.0, 1.75])
    # mmseg: img_scale (128 r, 32 r) -> factor min(int(128 r) / 61, int(32 r) / 45) on the original.
    expect = []
    for r in (0.5, 0.75, 1.0, 1.75):
        f = min(int(128 * r) / 61, int(32 * r) / 45)
        expect.append((int(45 * f + 0.5), int(61 * f + 0.5)))
    assert sizes == expect and sizes[2] == (32, 43)
    assert mmseg_scale_sizes(cfg.eval, x, [(45, 61), (46, 61)], [1.0]) is None  # mixed originals: input-size rule
    assert mmseg_scale_sizes(cfg.eval, torch.randn(1, 3, 30, 43), [(45, 61)], [1.0]) is None  # not test-resized
    res = predict(models["rankseg"], cfg, x, [(45, 61)], InferenceProtocol("slide", (1.0,), False), NO_SELECTION)
    ref = ref_predict(models["rankseg"], x, (45, 61), (1.0,), False, "slide", 32, 32)
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-5
    assert torch.equal(res.semantic[0][None][clear], ref.argmax(1)[clear])


# ---------------------------------------------------------------------------------------
# Issue 10, "Done when": a run on real ADE20K-Full-format shards evaluates with slide 512/512


@pytest.mark.slow
def test_ade20k_full_run_evaluates_with_slide_512(shared_fixtures, tmp_path, monkeypatch) -> None:
    import json

    from rankseg_core.convert.ade20k_full import prepare_ade20k_full
    from rankseg_core.convert.common import ConvertOptions
    from rankseg_core.engine import runs
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.evaluate import EvalOptions, run_evaluation
    from rankseg_core.engine.train import _evaluate, train
    from rankseg_core.inference import dense as inference

    root = shared_fixtures / "ade20k_full" / "ADE20K_2021_17_01"
    if not root.is_dir():
        pytest.skip("ADE20K-Full fixture files are absent")
    data = tmp_path / "ade"
    prepare_ade20k_full(root, data, split="training", opts=ConvertOptions(samples_per_shard=1000))
    split = next(iter(json.loads((data / "dataset.json").read_text())["splits"]))
    windows: list[tuple] = []
    real_slide = inference._slide

    def spy(model, images, num_classes, crop, stride, *args, **kw):
        windows.append((tuple(images.shape[-2:]), crop, stride))
        return real_slide(model, images, num_classes, crop, stride, *args, **kw)

    monkeypatch.setattr(inference, "_slide", spy)
    # Only runtime / size knobs are set: the protocol comes from the dataset defaults.
    cfg = build_train_config(None, ["schedule.iters=1", "schedule.batch_size=1", "data.num_workers=0",
                                    "eval.num_workers=0", f"data.train_split={split}", "data.val_split=",
                                    "model.dropout=0", "model.drop_path=0"], data)
    assert cfg.model.num_classes == 847 and cfg.model.img_size == 512
    train(cfg, tmp_path / "run", progress=False)
    rep, _, _ = run_evaluation(tmp_path / "run", EvalOptions(split=split, max_images=1, progress=False), device="cpu")
    assert rep["config"]["mode"] == "slide" and rep["num_images"] == 1  # `rankseg eval` defaults
    assert len(windows) == 1 and windows[0][1:] == (512, 512) and min(windows[0][0]) == 512
    # The evaluations during training (best-checkpoint selection) use the same protocol.
    model, saved = runs.load_run(tmp_path / "run", "cpu")
    saved.data.val_split = split
    _evaluate(model, saved, torch.device("cpu"), 1)
    assert len(windows) == 2 and windows[1] == windows[0]
