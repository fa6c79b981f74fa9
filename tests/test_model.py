"""Model shapes, selection semantics and gradients on a tiny ViT (CPU, no downloads)."""

from __future__ import annotations

import pytest
import torch

from rankseg_core.config.model import ModelConfig
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.model.backbone import load_backbone_weights
from rankseg_core.model.heads import FILL_LOGIT, RankNorm
from rankseg_core.model.selection import Selection

K, KAPPA, IMG = 12, 4, 32

VARIANTS = {
    "segmenter": dict(head="segmenter"),
    "rankseg": dict(),
    "rankseg-shared": dict(tau="shared"),
    "mt": dict(select=False),
    "trandec": dict(ml_head="trandec"),
    "gap": dict(ml_head="gap"),
    "oracle": dict(oracle=True),
    "clip2": dict(clip_len=2),
    "kappa-eq-k": dict(kappa=K),
}
GT = [torch.tensor([1, 3]), torch.tensor([2]), torch.tensor([0, 5, 7]), torch.tensor([4, 11])]


def make(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"img_size": IMG, "num_classes": K, "kappa": KAPPA, **kw})
    return SEGMENTER.build(cfg)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_output_shapes(name: str) -> None:
    kw = VARIANTS[name]
    model = make(**kw).eval()
    x = torch.randn(4, 3, 32, 48)
    with torch.no_grad():
        out = model(x, Selection(gt_classes=GT))
    h, w = 2, 3
    selects = kw.get("head") != "segmenter" and kw.get("select", True)
    c = (3 if name == "oracle" else min(kw.get("kappa", KAPPA), K)) if selects else K
    assert out.mask_logits.shape == (4, c, h, w)
    assert torch.isfinite(out.mask_logits).all()
    if selects:
        assert out.topk_index.shape == (4, c) and out.topk_index.dtype == torch.long
    else:
        assert out.topk_index is None
    if name in ("segmenter", "oracle"):
        assert out.ml_logits is None
    else:
        assert out.ml_logits.shape == (4 // kw.get("clip_len", 1), K)
        assert torch.isfinite(out.ml_logits).all()
    assert out.valid is None or out.valid.shape == out.topk_index.shape
    assert model.rank_scale().shape == model.rank_bias().shape


@pytest.mark.parametrize("name", ["rankseg", "rankseg-shared", "trandec", "gap", "mt", "segmenter"])
def test_batch_equals_per_image_loop(name: str) -> None:
    model = make(**VARIANTS[name]).eval()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        batch = model(x)
        for i in range(3):
            one = model(x[i : i + 1])
            torch.testing.assert_close(batch.mask_logits[i : i + 1], one.mask_logits, atol=1e-5, rtol=1e-4)
            if one.topk_index is not None:
                assert torch.equal(batch.topk_index[i : i + 1], one.topk_index)
            if one.ml_logits is not None:
                torch.testing.assert_close(batch.ml_logits[i : i + 1], one.ml_logits, atol=1e-5, rtol=1e-4)


def test_selection_is_the_argsort_of_ml_logits_and_rows_follow_it() -> None:
    model = make().eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, IMG, IMG))
    expected = out.ml_logits.argsort(dim=1, descending=True)[:, :KAPPA]
    assert torch.equal(out.topk_index, expected)
    # Rank order: the ml scores along the channels are non-increasing.
    scores = out.ml_logits.gather(1, out.topk_index)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_dynamic_threshold_pads_and_matches_per_image() -> None:
    model = make().eval()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        probs = model(x).ml_logits.sigmoid()
        # a threshold that gives the images different numbers of classes, so padding happens
        thr = next(float(t) for t in probs.flatten().sort().values
                   if len(set((probs > t).sum(1).tolist())) > 1)
        out = model(x, Selection(dynamic_threshold=thr))
        n = (probs > thr).sum(1).clamp(1, K)
        assert out.mask_logits.shape[1] == int(n.max())
        assert torch.equal(out.valid.sum(1), n)
        assert (out.mask_logits[~out.valid] == FILL_LOGIT).all()
        for i in range(3):
            one = model(x[i : i + 1], Selection(dynamic_threshold=thr))
            ni = int(n[i])
            assert one.mask_logits.shape[1] == ni
            torch.testing.assert_close(out.mask_logits[i : i + 1, :ni], one.mask_logits, atol=1e-5, rtol=1e-4)


def test_eval_kappa_larger_than_trained_repeats_last_gamma() -> None:
    model = make().eval()
    with torch.no_grad():
        model.head.mask_norm.weight.copy_(torch.arange(1.0, KAPPA + 1))
        out = model(torch.randn(1, 3, IMG, IMG), Selection(kappa=KAPPA + 3))
    assert out.mask_logits.shape[1] == KAPPA + 3
    gamma, _ = model.head.mask_norm.affine(KAPPA + 3)
    assert gamma.tolist() == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0]


def test_select_override_and_oracle() -> None:
    model = make().eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        out = model(x, Selection(override=[torch.tensor([5, 2, 5]), torch.tensor([9])]))
    assert out.mask_logits.shape[1] == 2
    assert set(out.topk_index[0].tolist()) == {2, 5}
    assert out.topk_index[1, 0] == 9 and not out.valid[1, 1]

    oracle = make(oracle=True).eval()
    with torch.no_grad():
        out = oracle(x, Selection(gt_classes=[torch.tensor([7, 1, 255]), torch.tensor([3])]))
    assert out.topk_index[0].tolist() == [1, 7]  # sorted by id, ignore dropped
    assert out.valid.tolist() == [[True, True], [True, False]]
    with pytest.raises(ValueError):
        oracle(x)


def test_override_on_class_ordered_model_masks_channels() -> None:
    model = make(head="segmenter").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, IMG, IMG), Selection(override=[torch.tensor([0, 4])]))
    assert out.topk_index is None and out.valid.shape == (1, K)
    assert out.valid[0].nonzero().flatten().tolist() == [0, 4]


def test_clip_frames_share_selection() -> None:
    model = make(clip_len=2).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, IMG, IMG))
    assert out.ml_logits.shape == (2, K)
    assert torch.equal(out.topk_index[0], out.topk_index[1]) and torch.equal(out.topk_index[2], out.topk_index[3])
    with pytest.raises(ValueError):
        model(torch.randn(3, 3, IMG, IMG))


@pytest.mark.parametrize("tau", ["rank", "shared"])
def test_gradients_reach_rank_scale_and_ml_branch(tau: str) -> None:
    model = make(tau=tau).train()
    out = model(torch.randn(2, 3, IMG, IMG))
    assert not out.topk_index.requires_grad
    (out.mask_logits.square().mean() + out.ml_logits.mean()).backward()
    norm = model.head.mask_norm
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    assert model.head.ml_fc.W.grad.abs().sum() > 0
    assert model.head.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.backbone.vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert norm.weight.shape == ((KAPPA,) if tau == "rank" else (1,))
    assert model.rank_scale().shape == (KAPPA,)


def test_rank_norm_masked_equals_layernorm_on_valid_columns() -> None:
    torch.manual_seed(0)
    norm = RankNorm(5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 7, 5)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    y = norm(x, valid)
    torch.testing.assert_close(y[0], torch.nn.functional.layer_norm(x[0], (5,), norm.weight, norm.bias))
    torch.testing.assert_close(y[1, :, :3], torch.nn.functional.layer_norm(x[1, :, :3], (3,), norm.weight[:3],
                                                                            norm.bias[:3]))
    assert (y[1, :, 3:] == FILL_LOGIT).all()


def test_any_input_size_multiple_of_16_and_data_config() -> None:
    model = make().eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 16)).shape == (1, 192, 4, 1)
    with pytest.raises(ValueError):
        model.forward_features(torch.randn(1, 3, 40, 32))
    dc = model.data_config()
    assert len(dc["mean"]) == 3 and all(v > 1 for v in dc["std"])  # 0..255 scale


def test_config_errors_are_user_errors() -> None:
    for bad in (dict(model="resnet"), dict(head="x"), dict(tau="x"), dict(ml_head="x"), dict(img_size=40),
                dict(kappa=0), dict(clip_len=0)):
        with pytest.raises(UserError):
            cfg = ModelConfig(**{"img_size": IMG, "num_classes": K, **bad})
            family_of(cfg.model).build(cfg)


def test_kappa_clamped_to_num_classes() -> None:
    model = make(kappa=100).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, IMG, IMG))
    assert out.mask_logits.shape[1] == K and model.rank_scale().shape == (K,)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_load_local_weights_resamples_pos_embed(tmp_path, suffix: str) -> None:
    import timm

    src = timm.create_model("vit_tiny_patch16_384", pretrained=False, img_size=32, num_classes=10)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save({"model": src.state_dict()}, path)
    model = SEGMENTER.build(ModelConfig(img_size=64, num_classes=K, backbone_weights=str(path)))
    vit = model.backbone.vit
    assert torch.equal(vit.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert vit.pos_embed.shape[1] == 1 + 16  # 4x4 grid after resampling from 2x2
    assert torch.equal(vit.pos_embed[:, 0], src.pos_embed[:, 0])  # class token position kept


def test_missing_or_wrong_weights_raise_user_error(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        SEGMENTER.build(ModelConfig(img_size=IMG, num_classes=K, backbone_weights=str(tmp_path / "nope.pth")))
    bad = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    model = make()
    with pytest.raises(UserError):
        load_backbone_weights(model.backbone, bad)
