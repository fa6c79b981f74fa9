"""Mask2Former (+ RankSeg) model: shapes per backbone, selection, pruning, oracle, config plumbing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_M2F as TINY
from conftest import tiny_m2f_cfg as tiny_cfg
from conftest import tiny_m2f_model as tiny_model

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig, from_dict, parse_override, set_key, to_yaml
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.mask2former import (
    MASK2FORMER,
    MODELS,
    ml_branch_names,
    no_weight_decay,
    num_queries,
    official_exempt,
    param_groups,
)
from rankseg_core.model.heads import FILL_LOGIT
from rankseg_core.model.mask2former.backbone import PyramidBackbone, load_pyramid_weights
from rankseg_core.model.mask2former.multilabel import QueryRankNorm, selected_logits
from rankseg_core.model.mask2former.swin import use_detectron2_window_order
from rankseg_core.model.selection import Selection

K, KAPPA = 10, 4
FAST = ["mask2former-r50", "mask2former-swint", "mask2former-swins"]
NAMES = FAST + ["mask2former-swinb", "mask2former-swinl"]  # Swin-L builds in ~2 s


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("head", ["segmenter", "rankseg"])
def test_shapes_every_backbone(name: str, head: str) -> None:
    model = tiny_model(model=name, head=head).eval()
    x = torch.randn(2, 3, 50, 70)  # padded to 64 x 96 inside
    with torch.no_grad():
        out = model(x)
    c = KAPPA if head == "rankseg" else K
    assert out.pred_logits.shape == (2, TINY.num_queries, c + 1)
    assert out.pred_masks.shape == (2, TINY.num_queries, 16, 24)
    assert out.image_size == (50, 70)
    assert len(out.aux) == TINY.dec_layers  # learnable queries + layers 1..L-1
    for logits, masks in out.aux + [(out.pred_logits, out.pred_masks)]:
        assert torch.isfinite(logits).all() and torch.isfinite(masks).all()
        assert logits.shape == out.pred_logits.shape and masks.shape == out.pred_masks.shape
    if head == "rankseg":
        assert out.ml_logits.shape == (2, K) and out.topk_index.shape == (2, KAPPA)
    else:
        assert out.ml_logits is None and out.topk_index is None


@pytest.mark.parametrize("name", FAST)
def test_backbone_pyramid_is_nchw_strides_4_to_32(name: str) -> None:
    import timm

    bb = PyramidBackbone(MODELS[name], Mask2FormerConfig()).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = bb(x)
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in feats] == bb.channels
    with pytest.raises(ValueError):
        bb(torch.randn(1, 3, 48, 64))
    if bb.is_swin:
        # Against timm's own features_only model (NHWC), same weights, same (detectron2) window order.
        ref = timm.create_model(bb.body.default_cfg["architecture"], pretrained=False, features_only=True,
                                dynamic_img_size=True, always_partition=True)
        use_detectron2_window_order(ref)
        own = {k: v for k, v in bb.body.state_dict().items()}
        ref_sd = ref.state_dict()
        mapped = {k: own[k.replace("layers_", "layers.", 1)] for k in ref_sd if k.replace("layers_", "layers.", 1) in own}
        missing = ref.eval().load_state_dict(mapped, strict=False).missing_keys
        assert not [k for k in missing if not k.startswith("norm")]
        with torch.no_grad():
            expected = [y.permute(0, 3, 1, 2) for y in ref(x)]
            raw = bb.body.forward_intermediates(x, indices=bb.indices, intermediates_only=True)
        for a, e in zip(raw, expected):
            torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_rankseg_selection_prunes_and_computes_only_selected_columns() -> None:
    model = tiny_model(kappa=3).eval()
    feats = model.forward_features(torch.randn(2, 3, 64, 64))
    with torch.no_grad():
        out = model.forward_head(feats)
    expected = out.ml_logits.argsort(dim=1, descending=True)[:, :3]
    assert torch.equal(out.topk_index, expected)
    assert out.pred_logits.shape[-1] == 4  # kappa + no-object: the other 7 classes are gone
    # Independent: all K + 1 cosine logits, gathered at [top-3 ; no-object], then LayerNorm(4).
    with torch.no_grad():
        dec = model.decoder(*reversed(model.pixel_decoder(feats.maps)))
        w = F.normalize(model.class_embed.weight, dim=-1)
        full = F.normalize(dec.embeds[-1], dim=-1) @ w.t()  # B x Q x (K+1)
        cols = torch.cat([out.topk_index, torch.full((2, 1), K)], 1)
        gathered = full.gather(2, cols[:, None, :].expand(-1, full.shape[1], -1))
        norm = model.ml_norm
        ref = F.layer_norm(gathered, (4,), norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(out.pred_logits, ref, atol=1e-5, rtol=1e-4)


def test_selected_logits_equal_full_then_gather() -> None:
    torch.manual_seed(0)
    emb, weight, bias = torch.randn(2, 5, 8), torch.randn(7, 8), torch.randn(7)
    index = torch.tensor([[3, 0, 6], [6, 1, 2]])
    for cosine in (False, True):
        b = None if cosine else bias
        full = (F.normalize(emb, dim=-1) @ F.normalize(weight, dim=-1).t()) if cosine else emb @ weight.t() + bias
        ref = full.gather(2, index[:, None, :].expand(-1, 5, -1))
        torch.testing.assert_close(selected_logits(emb, weight, b, index, cosine), ref)


def test_query_rank_norm_affine_and_padding() -> None:
    torch.manual_seed(0)
    norm = QueryRankNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 9.0]))
        norm.bias.copy_(torch.tensor([0.1, 0.2, 0.3, 0.9]))
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (4,), norm.weight, norm.bias))
    # 2 class columns + no-object: ranks 0, 1 and the no-object entry (9, 0.9)
    y = norm(x[..., [0, 1, 3]])
    torch.testing.assert_close(y, F.layer_norm(x[..., [0, 1, 3]], (3,), torch.tensor([1.0, 2.0, 9.0]),
                                               torch.tensor([0.1, 0.2, 0.9])))
    # 5 class columns (eval kappa > trained): the last class rank repeats, no-object stays last
    z = torch.randn(1, 2, 6)
    torch.testing.assert_close(norm(z), F.layer_norm(z, (6,), torch.tensor([1.0, 2.0, 3.0, 3.0, 3.0, 9.0]),
                                                      torch.tensor([0.1, 0.2, 0.3, 0.3, 0.3, 0.9])))
    # padding column 1 of image 1: statistics over the valid columns only, FILL_LOGIT there
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    p = norm(x, valid)
    torch.testing.assert_close(p[0], F.layer_norm(x[0], (4,), norm.weight, norm.bias))
    torch.testing.assert_close(p[1][:, [0, 2, 3]], F.layer_norm(x[1][:, [0, 2, 3]], (3,), norm.weight[[0, 2, 3]],
                                                                  norm.bias[[0, 2, 3]]))
    assert (p[1][:, 1] == FILL_LOGIT).all()


def test_batch_equals_per_image_loop() -> None:
    model = tiny_model().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = model(x)
        for i in range(3):
            one = model(x[i:i + 1])
            torch.testing.assert_close(batch.pred_logits[i:i + 1], one.pred_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batch.pred_masks[i:i + 1], one.pred_masks, atol=1e-4, rtol=1e-4)
            assert torch.equal(batch.topk_index[i:i + 1], one.topk_index)


def test_inference_needs_no_ground_truth_but_oracle_does() -> None:
    model = tiny_model().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))  # no gt anywhere
    assert out.topk_index is not None
    oracle = tiny_model(oracle=True).eval()
    assert oracle.ml_head is None and oracle.ml_norm is None
    with pytest.raises(ValueError, match="gt_classes"):
        oracle(torch.randn(1, 3, 64, 64))
    with torch.no_grad():
        out = oracle(torch.randn(2, 3, 64, 64), Selection(gt_classes=[torch.tensor([7, 2, 255]), torch.tensor([5])]))
    assert out.topk_index.tolist() == [[2, 7], [5, 0]]  # sorted by id, ignore dropped, padded
    assert out.valid.tolist() == [[True, True], [True, False]]
    assert out.pred_logits.shape[-1] == 3
    assert (out.pred_logits[1, :, 1] == FILL_LOGIT).all()


def test_select_override_dynamic_threshold_and_eval_kappa() -> None:
    model = tiny_model().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        base = model(x)
        over = model(x, Selection(override=[torch.tensor([1, 8, 1]), torch.tensor([3])]))
        big = model(x, Selection(kappa=7))
        probs = base.ml_logits.sigmoid()
        thr = float(probs[0].sort(descending=True).values[1])  # image 0 keeps 1 class
        dyn = model(x, Selection(dynamic_threshold=thr))
    scores = base.ml_logits
    assert set(over.topk_index[0].tolist()) == {1, 8}
    assert scores[0, over.topk_index[0, 0]] >= scores[0, over.topk_index[0, 1]]  # ordered by ml score
    assert over.valid.tolist() == [[True, True], [True, False]]
    assert big.pred_logits.shape[-1] == 8
    n = (probs > thr).sum(1).clamp_min(1)
    assert dyn.topk_index.shape[1] == int(n.max())
    assert dyn.valid is None or torch.equal(dyn.valid.sum(1), n)

    baseline = tiny_model(head="segmenter").eval()
    with torch.no_grad():
        out = baseline(x, Selection(override=[torch.tensor([0, 4]), torch.tensor([9])]))
    assert out.topk_index is None and out.pred_logits.shape[-1] == K + 1
    assert out.valid[0].nonzero().flatten().tolist() == [0, 4]
    assert (out.pred_logits[1, :, :9] == FILL_LOGIT).all() and (out.pred_logits[1, :, 9:] != FILL_LOGIT).all()


def test_gradients_reach_ml_head_rank_norm_and_backbone() -> None:
    model = tiny_model().train()
    out = model(torch.randn(2, 3, 64, 64))
    assert not out.topk_index.requires_grad
    (out.pred_logits.square().mean() + out.pred_masks.mean() + out.ml_logits.mean()).backward()
    assert model.ml_norm.weight.grad.abs().sum() > 0
    assert model.ml_head.fc.W.grad.abs().sum() > 0
    assert model.class_embed.weight.grad.abs().sum() > 0
    assert model.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert model.rank_scale().shape == (KAPPA,)


def test_plus_mt_keeps_class_order_with_layernorm() -> None:
    model = tiny_model(select=False).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out.topk_index is None and out.pred_logits.shape[-1] == K + 1 and out.ml_logits is not None
    # LayerNorm over the K + 1 columns with unit affine at init: zero mean, unit variance per query
    torch.testing.assert_close(out.pred_logits.mean(-1), torch.zeros(1, TINY.num_queries), atol=1e-5, rtol=0)


def test_no_weight_decay_and_ml_branch_names() -> None:
    model = tiny_model(model="mask2former-swint")
    nwd, ml = no_weight_decay(model), ml_branch_names(model)
    assert "decoder.query_feat.weight" in nwd and "ml_norm.weight" in nwd and "ml_head.norm.weight" in nwd
    assert any(n.endswith("relative_position_bias_table") for n in nwd)
    assert "class_embed.weight" not in nwd and "decoder.mask_embed.layers.0.bias" not in nwd  # official: biases decay
    # The official fork's `"cls_emb" in module_name` never matches the ml head's class
    # embeddings (a parameter of the module "ml_head"): they decay at 0.05 there, and here.
    assert "ml_head.cls_emb" not in nwd
    cfg = TrainConfig()
    cfg.optim.ml_lr_mult, cfg.optim.ml_wd_mult = 0.1, 1.0  # the family's recipe
    groups = param_groups(model, cfg)
    assert groups["ml_head.cls_emb"] == (pytest.approx(0.1), 1.0) and groups["ml_norm.weight"][1] == 0.0
    assert ml and all(n.startswith("ml_head.") for n in ml) and "ml_head.fc.W" in ml
    assert "ml_norm.weight" not in ml
    dc = model.data_config()
    assert dc["mean"] == pytest.approx([123.675, 116.28, 103.53]) and dc["std"] == pytest.approx([58.395, 57.12, 57.375])


def test_official_exempt_states_the_forks_rule() -> None:
    """mask2former/train_net.py build_optimizer, on a hand-built (module name, module,
    parameter name) list: position tables by parameter name, norms / embeddings by module
    type, and `"cls_emb" in module_name` -- the MODULE name, so a parameter called cls_emb
    (the ml head's) is not exempt, while any parameter of a module named *cls_emb* would be."""
    lin, ln, emb = torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.Embedding(3, 2)
    cases = [
        (("sem_seg_head.predictor.ml_head", lin, "cls_emb"), False),  # the official ml head's
        (("ml_head", lin, "cls_emb"), False),
        (("ml_head.cls_emb", lin, "weight"), True),  # what the name test does match
        (("backbone.layers.0.blocks.0.attn", lin, "relative_position_bias_table"), True),
        (("backbone", lin, "absolute_pos_embed"), True),
        (("sem_seg_head.predictor.class_embed", lin, "bias"), False),  # biases decay
        (("sem_seg_head.predictor.class_embed", lin, "weight"), False),
        (("ml_head.norm", ln, "weight"), True),
        (("ml_norm", ln, "bias"), True),
        (("backbone.bn1", torch.nn.SyncBatchNorm(2), "weight"), True),
        (("pixel_decoder.gn", torch.nn.GroupNorm(1, 2), "weight"), True),
        (("sem_seg_head.predictor.query_feat", emb, "weight"), True),
        (("ml_norm", QueryRankNorm(3), "weight"), True),  # our stand-in for the official LayerNorm
    ]
    for (module_name, module, param_name), exempt in cases:
        assert official_exempt(module_name, module, param_name) is exempt, (module_name, param_name)


def test_config_errors_are_user_errors() -> None:
    bad = [{"m2f": {"task": "instance"}},  # instances are video tracks: clips only
           {"m2f": {"task": "video"}}, {"m2f": {"num_queries": 0}}, {"m2f": {"ml_query_layer": 4}},
           {"m2f": {"hidden_dim": 30}}, {"m2f": {"size_divisibility": 48}},
           {"clip_len": 2, "m2f": {"task": "panoptic"}},  # clips segment semantically or track instances
           {"m2f": {"importance_sample_ratio": 1.5}}, {"model": "mask2former-swinx"}]
    for kw in bad:
        with pytest.raises(UserError):
            MASK2FORMER.build(tiny_cfg(**kw))


def test_official_query_count_and_set_overrides() -> None:
    swinl, r50 = ModelConfig(model="mask2former-swinl"), ModelConfig(model="mask2former-r50")
    assert num_queries(swinl) == 100 and num_queries(r50) == 100
    swinl.mask2former.task = r50.mask2former.task = "panoptic"
    assert num_queries(swinl) == 200 and num_queries(r50) == 100
    cfg = TrainConfig()
    for text in ("model.model=mask2former-swinl", "model.mask2former.num_queries=50",
                 "model.mask2former.task=panoptic", "model.mask2former.cosine_logits=false"):
        key, value = parse_override(text)
        set_key(cfg, key, value)
    assert cfg.model.mask2former.num_queries == 50 and cfg.model.mask2former.task == "panoptic"
    assert cfg.model.mask2former.cosine_logits is False and family_of(cfg.model.model) is MASK2FORMER
    set_key(cfg, "model.mask2former.num_queries", "null")
    assert cfg.model.mask2former.num_queries is None
    import yaml

    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again.model == cfg.model
    with pytest.raises(UserError, match="did you mean"):
        parse_override("model.mask2former.num_querys=5")
    with pytest.raises(UserError):
        set_key(cfg, "model.mask2former.num_queries", "many")


def test_local_backbone_weights(tmp_path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("resnet50", pretrained=False, num_classes=7)
    path = tmp_path / "r50.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = MASK2FORMER.build(tiny_cfg(backbone_weights=str(path)))
    assert torch.equal(model.backbone.body.conv1.weight, src.conv1.weight)
    assert torch.equal(model.backbone.body.layer4[2].bn3.running_var, src.layer4[2].bn3.running_var)
    with pytest.raises(UserError, match="not found"):
        MASK2FORMER.build(tiny_cfg(backbone_weights=str(tmp_path / "nope.pth")))
    other = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="no key"):
        load_pyramid_weights(model.backbone, other)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0)
    wrong = tmp_path / "swin.pth"
    torch.save(swin.state_dict(), wrong)
    with pytest.raises(UserError):
        load_pyramid_weights(model.backbone, wrong)  # a Swin checkpoint into the ResNet


def test_swin_weights_load_through_timm_filter(tmp_path) -> None:
    import timm

    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=5)
    path = tmp_path / "swin.pth"
    torch.save({"model": src.state_dict()}, path)
    model = MASK2FORMER.build(tiny_cfg(model="mask2former-swint", backbone_weights=str(path)))
    body = model.backbone.body
    assert torch.equal(body.layers[2].blocks[1].attn.qkv.weight, src.layers[2].blocks[1].attn.qkv.weight)
    assert torch.equal(body.layers[0].blocks[0].attn.relative_position_bias_table,
                       src.layers[0].blocks[0].attn.relative_position_bias_table)


def test_model_config_family_and_segmenter_untouched() -> None:
    assert family_of(ModelConfig().model).name == "segmenter"
    assert family_of(ModelConfig(model="mask2former-r50").model).name == "mask2former"
    ModelConfig(model="mask2former-r50", clip_len=1).validate()
