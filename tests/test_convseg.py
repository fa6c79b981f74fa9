"""DeepLabv3 / UperNet + RankSeg models (rankseg_core/model/convseg/): every piece against an
independent computation.

References written here from what the official code does (mmsegmentation 0.x `ResNetV1c`,
`ASPPHead`, `FCNHead`, `BaseDecodeHead`; the RankSeg fork's `ASPPRankSegHead` and
`RankSegEncoderHead`): functional forwards on the modules' own tensors, layer-shape formulas
for the parameter counts, and the mmseg checkpoint layout written by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.convseg import ConvSegConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.convseg import aux_loss, beit_groups, deeplab_groups, swin_groups, with_official
from rankseg_core.model.convseg.aspp import ASPPHead
from rankseg_core.model.convseg.classifier import LinearClassifier, MultiLabelEncoder, RankSegClassifier
from rankseg_core.model.convseg.fcn_aux import FCNHead
from rankseg_core.model.convseg.model import ConvSegModel
from rankseg_core.model.convseg.resnet import ResNetPyramid, load_resnet_weights
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE

TINY = ConvSegConfig(channels=16, aux_channels=8, ml_dim=16, aspp_dilations=[1, 2], pool_scales=[1, 2])


def tiny_cfg(model: str = "deeplabv3-r18", head: str = "rankseg", k: int = 10, kappa: int = 4, **kw) -> ModelConfig:
    return ModelConfig(model=model, num_classes=k, kappa=kappa, head=head, img_size=kw.pop("img_size", 32),
                       convseg=dataclasses.replace(TINY, **kw.pop("convseg", {})), **kw)


def build(m: ModelConfig) -> ConvSegModel:
    model = family_of(m.model).build(m)
    assert isinstance(model, ConvSegModel)
    return model


def randomise(m: nn.Module, seed: int = 0) -> None:
    """Every float tensor random (BN statistics positive), so a swapped or skipped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g) * 0.5
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)


def cbr(x: Tensor, m: nn.Module, dilation: int = 1, padding: int = 0) -> Tensor:
    """mmcv ConvModule (eval): conv without bias, BN with running statistics, ReLU."""
    y = F.conv2d(x, m.conv.weight, None, padding=padding, dilation=dilation)
    y = F.batch_norm(y, m.bn.running_mean, m.bn.running_var, m.bn.weight, m.bn.bias, training=False, eps=1e-5)
    return F.relu(y)


# ---------------------------------------------------------------------------------------
# ResNetV1c


def mmseg_block_geometry(depth: int) -> list[tuple[str, int, int]]:
    """(module path, stride, dilation) of every 3x3 conv of mmseg's ResNetV1c with DeepLabv3's
    strides (1, 2, 1, 1), dilations (1, 1, 2, 4), contract_dilation=True; BasicBlock dilates
    only conv1, Bottleneck has one 3x3 conv (conv2)."""
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    out = []
    for stage, (n, s, d) in enumerate(zip(blocks, (1, 2, 1, 1), (1, 1, 2, 4)), start=1):
        for i in range(n):
            dil = d // 2 if i == 0 and d > 1 else d
            stride = s if i == 0 else 1
            if depth == 18:
                out += [(f"layer{stage}.{i}.conv1", stride, dil), (f"layer{stage}.{i}.conv2", 1, 1)]
            else:
                out.append((f"layer{stage}.{i}.conv2", stride, dil))
    return out


@pytest.mark.parametrize("depth, arch", [(18, "resnet18"), (50, "resnet50c")])
def test_resnet_pyramid_has_mmseg_strides_and_dilations(depth: int, arch: str) -> None:
    net = ResNetPyramid(arch)
    mods = dict(net.body.named_modules())
    for path, stride, dil in mmseg_block_geometry(depth):
        conv = mods[path]
        assert (conv.stride, conv.dilation, conv.padding) == ((stride, stride), (dil, dil), (dil, dil)), path
    # The deep stem: 3 -> 32 -> 32 -> 64, the first conv with stride 2.
    stem = [m for m in net.body.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in stem] == [(3, 32, (2, 2)), (32, 32, (1, 1)),
                                                                         (32, 64, (1, 1))]
    with torch.no_grad():
        maps = net.eval()(torch.zeros(1, 3, 64, 40))
    exp = 4 if depth == 50 else 1
    assert [tuple(m.shape[1:]) for m in maps] == [(64 * exp, 16, 10), (128 * exp, 8, 5), (256 * exp, 8, 5),
                                                  (512 * exp, 8, 5)]
    assert net.strides == [4, 8, 8, 8] and net.channels == [64 * exp, 128 * exp, 256 * exp, 512 * exp]


def resnet_v1c_params(depth: int) -> int:
    """Parameters of mmseg's ResNetV1c-50/101 (no fc) from its layer shapes."""
    bn = 2  # weight + bias per channel
    total = 3 * 32 * 9 + 32 * 32 * 9 + 32 * 64 * 9 + bn * (32 + 32 + 64)
    inplanes = 64
    for planes, n in zip((64, 128, 256, 512), {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]):
        for i in range(n):
            total += inplanes * planes + 9 * planes * planes + planes * 4 * planes + bn * 6 * planes
            if i == 0:
                total += inplanes * 4 * planes + bn * 4 * planes
            inplanes = 4 * planes
    return total


@pytest.mark.parametrize("depth", [50, 101])
def test_resnet_parameters_equal_mmseg_layer_shapes(depth: int) -> None:
    with torch.device("meta"):  # counting needs no values
        net = ResNetPyramid(f"resnet{depth}c")
    assert sum(p.numel() for p in net.parameters()) == resnet_v1c_params(depth)
    assert resnet_v1c_params(101) == 42_519_392


# ---------------------------------------------------------------------------------------
# Decode heads


def test_aspp_head_matches_mmseg_aspp_reference() -> None:
    head = ASPPHead(6, channels=5, dilations=(1, 2, 3)).eval()
    randomise(head, 1)
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        out = head([torch.zeros(1), x])  # only the last map is read
        pooled = cbr(x.mean((2, 3), keepdim=True), head.image_pool[1]).expand(-1, -1, 9, 7)
        branches = [cbr(x, head.aspp_modules[0])]
        branches += [cbr(x, m, dilation=d, padding=d) for m, d in zip(head.aspp_modules[1:], (2, 3))]
        ref = cbr(torch.cat([pooled, *branches], 1), head.bottleneck, padding=1)
    assert head.aspp_modules[0].conv.kernel_size == (1, 1) and head.aspp_modules[1].conv.kernel_size == (3, 3)
    torch.testing.assert_close(out, ref)
    assert set(head.state_dict()) >= {"image_pool.1.conv.weight", "aspp_modules.2.bn.running_mean",
                                      "bottleneck.conv.weight"}  # mmseg's names


def test_fcn_aux_head_matches_reference() -> None:
    head = FCNHead(6, 4, num_classes=3).eval()
    randomise(head, 2)
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        ref = F.conv2d(cbr(x, head.convs[0], padding=1), head.conv_seg.weight, head.conv_seg.bias)
        torch.testing.assert_close(head(x), ref)
    assert head.conv_seg.kernel_size == (1, 1) and head.convs[0].conv.bias is None


# ---------------------------------------------------------------------------------------
# Pixel classifiers


def ml_reference(ml: MultiLabelEncoder, feats: Tensor, emb: Tensor) -> Tensor:
    """The fork's RankSegEncoderHead, written out: pool, depthwise + pointwise 1x1 conv with
    ReLUs, [tokens; projected class tokens] through one pre-norm block, LayerNorm, GroupWiseLinear."""
    x = F.adaptive_avg_pool2d(feats, ml.pool.output_size) if ml.pool is not None else feats
    dw, pw = ml.proj_dec.depthwise_conv, ml.proj_dec.pointwise_conv
    x = F.relu(F.conv2d(F.relu(F.conv2d(x, dw.weight, dw.bias, groups=x.shape[1])), pw.weight, pw.bias))
    tokens = x.flatten(2).transpose(1, 2)
    cls = emb @ ml.cls_proj.weight.t()
    x = torch.cat([tokens, cls.expand(len(tokens), -1, -1)], 1)
    blk = ml.block
    b, n, d = x.shape
    heads = blk.attn.num_heads
    y = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, 1e-5)
    q, k, v = (y @ blk.attn.qkv.weight.t() + blk.attn.qkv.bias).reshape(b, n, 3, heads, d // heads).unbind(2)
    att = torch.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(d // heads)
    y = torch.einsum("bhqk,bkhc->bqhc", att.softmax(-1), v).reshape(b, n, d)
    x = x + y @ blk.attn.proj.weight.t() + blk.attn.proj.bias
    y = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, 1e-5)
    x = x + F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    cls = F.layer_norm(x[:, -emb.shape[1]:], (d,), ml.norm.weight, ml.norm.bias, 1e-5)
    return (ml.fc.W * cls).sum(-1) + ml.fc.b


@pytest.mark.parametrize("pool", [0, 3])
def test_ml_branch_matches_the_forks_encoder_head(pool: int) -> None:
    torch.manual_seed(0)
    ml = MultiLabelEncoder(12, 16, num_classes=7, dropout=0.1, pool=pool).eval()
    randomise(ml, 3)
    feats, emb = torch.randn(2, 12, 5, 6), torch.randn(1, 7, 16)
    with torch.no_grad():
        torch.testing.assert_close(ml(feats, emb), ml_reference(ml, feats, emb), rtol=1e-4, atol=1e-4)
    own = MultiLabelEncoder(12, 16, num_classes=7, dropout=0.0, own_embedding=True).eval()
    with torch.no_grad():  # BEiT's: class tokens of its own, whatever is shared
        torch.testing.assert_close(own(feats, emb), own(feats, None))


def rankseg_clf(k: int = 9, kappa: int = 4, c: int = 6, **kw) -> RankSegClassifier:
    torch.manual_seed(1)
    oracle = kw.pop("oracle", False)
    ml = None if oracle else MultiLabelEncoder(5, c, k, 0.0, pool=2)
    clf = RankSegClassifier(c, k, kappa, 0.0, ml, kw.pop("selects", True), oracle=oracle, **kw).eval()
    randomise(clf, 4)
    return clf


def layer_norm_by_hand(s: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)
    return (s - mean) / torch.sqrt(var + 1e-5) * gamma + beta


def test_rankseg_classifier_selects_the_top_kappa_and_normalises_over_ranks() -> None:
    clf = rankseg_clf()
    pixels, feats = torch.randn(2, 6, 3, 4), torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        out = clf(pixels, feats)
        ml = ml_reference(clf.ml_head, feats, clf.cls_emb)
    torch.testing.assert_close(out.ml_logits, ml, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.topk_index, torch.topk(out.ml_logits, 4).indices)
    e, b = clf.cls_emb[0, out.topk_index], clf.cls_bias[0, out.topk_index]  # the ORIGINAL embeddings
    s = torch.einsum("bchw,brc->bhwr", pixels, e) + b[:, None, None, :]
    ref = layer_norm_by_hand(s, clf.norm.weight, clf.norm.bias).permute(0, 3, 1, 2)
    assert out.mask_logits.shape == (2, 4, 3, 4) and out.valid is None
    torch.testing.assert_close(out.mask_logits, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # an eval kappa above the trained one repeats the last rank's gamma / beta
        wide = clf(pixels, feats, Selection(kappa=6))
    s6 = torch.einsum("bchw,brc->bhwr", pixels, clf.cls_emb[0, wide.topk_index]) + clf.cls_bias[0, wide.topk_index][:, None, None]
    g = torch.cat([clf.norm.weight, clf.norm.weight[-1:].repeat(2)])
    bb = torch.cat([clf.norm.bias, clf.norm.bias[-1:].repeat(2)])
    torch.testing.assert_close(wide.mask_logits, layer_norm_by_hand(s6, g, bb).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


def test_cosine_variant_normalises_both_embeddings() -> None:
    clf = rankseg_clf(cosine=True, tau_shared=True)
    pixels, feats = torch.randn(1, 6, 2, 2), torch.randn(1, 5, 4, 4)
    with torch.no_grad():
        out = clf(pixels, feats)
    e = F.normalize(clf.cls_emb[0, out.topk_index], dim=-1)
    s = torch.einsum("bchw,brc->bhwr", F.normalize(pixels, dim=1), e) + clf.cls_bias[0, out.topk_index][:, None, None]
    ref = layer_norm_by_hand(s, clf.norm.weight.expand(4), clf.norm.bias.expand(4)).permute(0, 3, 1, 2)
    assert clf.norm.weight.numel() == 1  # shared tau: one scalar
    torch.testing.assert_close(out.mask_logits, ref, rtol=1e-4, atol=1e-4)


def test_mt_variant_keeps_class_order_and_layernorm_over_k() -> None:
    clf = rankseg_clf(selects=False)
    pixels, feats = torch.randn(2, 6, 3, 3), torch.randn(2, 5, 4, 4)
    with torch.no_grad():
        out = clf(pixels, feats)
    s = torch.einsum("bchw,kc->bhwk", pixels, clf.cls_emb[0]) + clf.cls_bias[0]
    ref = layer_norm_by_hand(s, clf.norm.weight, clf.norm.bias).permute(0, 3, 1, 2)
    assert out.topk_index is None and out.ml_logits.shape == (2, 9) and clf.norm.weight.numel() == 9
    torch.testing.assert_close(out.mask_logits, ref, rtol=1e-4, atol=1e-4)


def test_oracle_selects_gt_classes_by_id_and_padding_changes_nothing() -> None:
    clf = rankseg_clf(oracle=True)
    pixels, feats = torch.randn(2, 6, 3, 3), torch.randn(2, 5, 4, 4)
    gt = [torch.tensor([7, 2, 5]), torch.tensor([4])]
    with torch.no_grad():
        both = clf(pixels, feats, Selection(gt_classes=gt))
        alone = [clf(pixels[i:i + 1], feats[i:i + 1], Selection(gt_classes=[gt[i]])) for i in range(2)]
    assert clf.ml_head is None and both.ml_logits is None
    assert both.topk_index[0].tolist() == [2, 5, 7] and both.topk_index[1, 0] == 4
    assert both.valid.tolist() == [[True] * 3, [True, False, False]]
    torch.testing.assert_close(both.mask_logits[0], alone[0].mask_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both.mask_logits[1, :1], alone[1].mask_logits[0], rtol=1e-5, atol=1e-5)


def test_baseline_is_a_1x1_conv_and_gt_eval_restricts_its_argmax() -> None:
    clf = LinearClassifier(6, 5, dropout=0.1).eval()
    randomise(clf, 5)
    pixels = torch.randn(2, 6, 3, 3)
    with torch.no_grad():
        out = clf(pixels, pixels)
        torch.testing.assert_close(out.mask_logits, F.conv2d(pixels, clf.conv_seg.weight, clf.conv_seg.bias))
        sel = clf(pixels, pixels, Selection(override=[torch.tensor([1, 3]), torch.tensor([0])]))
    assert out.topk_index is None and out.ml_logits is None
    assert set(sel.mask_logits[0].argmax(0).unique().tolist()) <= {1, 3} and (sel.mask_logits[1].argmax(0) == 0).all()


# ---------------------------------------------------------------------------------------
# The whole model


def test_deeplab_forward_train_and_eval() -> None:
    torch.manual_seed(0)
    model = build(tiny_cfg())
    out = model.train()(torch.randn(2, 3, 32, 32))
    # Output stride 8 for the decoder, and the stage-3 map (stride 8 too, dilated) for the aux head.
    assert out.mask_logits.shape == (2, 4, 4, 4) and out.aux_logits.shape == (2, 10, 4, 4)
    assert out.ml_logits.shape == (2, 10) and out.topk_index.shape == (2, 4)
    with torch.no_grad():
        ev = model.eval()(torch.randn(1, 3, 30, 21))
    assert ev.aux_logits is None and ev.mask_logits.shape == (1, 4, 4, 3)  # any size, no padding
    base = build(tiny_cfg(head="segmenter", convseg={"aux_weight": 0.0}))
    assert base.auxiliary_head is None and isinstance(base.classifier, LinearClassifier)
    assert not any(n.startswith("classifier.ml_head") for n, _ in base.named_parameters())


def test_beit_upernet_pads_small_inputs_and_crops_the_logits() -> None:
    torch.manual_seed(0)
    model = build(tiny_cfg("upernet-beitt")).eval()
    assert model.classifier.ml_head.cls_emb is not None  # BEiT's ml branch has its own class tokens
    x = torch.randn(1, 3, 20, 27)
    with torch.no_grad():
        out = model(x)
        padded = model.forward_head(model.forward_features(F.pad(x, (0, 5, 0, 12))))
    # UperNet predicts at stride 4: ceil(20 / 4) x ceil(27 / 4) cells of the 32 x 32 padded input.
    assert out.mask_logits.shape == (1, 4, 5, 7)
    torch.testing.assert_close(out.mask_logits, padded.mask_logits[..., :5, :7])
    with pytest.raises(ValueError, match="img_size 32"):
        model(torch.randn(1, 3, 48, 32))


def test_swin_upernet_forward() -> None:
    torch.manual_seed(0)
    model = build(tiny_cfg("upernet-swint", img_size=64)).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.mask_logits.shape == (2, 4, 16, 16) and out.aux_logits.shape == (2, 10, 4, 4)


# ---------------------------------------------------------------------------------------
# Options, losses, parameter groups


@pytest.mark.parametrize("change, fragment", [
    ({"head": "essnet"}, "--head segmenter (baseline) or rankseg"),
    ({"ml_head": "gap"}, "use --ml-head tranenc"),
    ({"clip_len": 2}, "use clip_len=1"),
    ({"convseg": {"channels": 0}}, "model.convseg.channels=0 must be >= 1"),
    ({"convseg": {"ml_dim": 32}}, "model.convseg.ml_dim=32: an ml branch that shares"),
    ({"convseg": {"aspp_dilations": []}}, "model.convseg.aspp_dilations"),
    ({"convseg": {"aux_weight": -1.0}}, "model.convseg.aux_weight=-1.0 must be >= 0"),
    ({"convseg": {"layer_decay": 0.0}}, "model.convseg.layer_decay=0.0"),
])
def test_bad_options_are_one_line_user_errors(change: dict, fragment: str) -> None:
    m = tiny_cfg(**{k: v for k, v in change.items() if k != "convseg"}, convseg=change.get("convseg", {}))
    with pytest.raises(UserError) as err:
        family_of(m.model).validate(m)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_official_values_fill_only_what_the_user_left_none() -> None:
    m = ModelConfig(model="upernet-beitl")
    c = with_official(m).convseg
    assert (c.channels, c.ml_dim, c.ml_pool, c.ml_own_embedding, c.backbone_drop_path, c.layer_decay) == \
        (1024, 1024, 0, True, 0.2, 0.95)
    c = with_official(ModelConfig(model="deeplabv3-r101", convseg=ConvSegConfig(channels=64))).convseg
    assert (c.channels, c.ml_dim, c.ml_pool, c.aux_channels) == (64, 64, 16, 256)  # a shared width follows
    assert m.convseg.channels is None  # a copy


def test_criterion_adds_the_weighted_aux_cross_entropy() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(model=tiny_cfg())
    cfg.loss.ml_loss, cfg.loss.asl_gamma_neg = "asl", 2.0
    crit = family_of("deeplabv3-r18").criterion(cfg)
    model = build(cfg.model).train()
    labels = torch.randint(0, 10, (2, 32, 32))
    labels[0, :5] = IGNORE
    out = model(torch.randn(2, 3, 32, 32))
    parts = crit(out, {"label": labels})
    up = F.interpolate(out.aux_logits, size=(32, 32), mode="bilinear", align_corners=False)
    lab = labels.clone()
    lab[lab == IGNORE] = -1
    hand = F.cross_entropy(up, lab, ignore_index=-1, reduction="sum") / labels.numel()  # mmseg: / all pixels
    torch.testing.assert_close(parts["aux"], hand.detach())
    torch.testing.assert_close(aux_loss(out.aux_logits, labels, 10, "official"), hand)
    torch.testing.assert_close(parts["loss"], parts["seg"] + 10.0 * parts["ml"] + 0.4 * parts["aux"])


def test_parameter_groups() -> None:
    cfg = TrainConfig(model=tiny_cfg())
    cfg.optim.ml_lr_mult, cfg.optim.ml_wd_mult = 0.1, 3.0
    model = build(cfg.model)
    groups = deeplab_groups(model, cfg)
    assert groups["backbone.body.conv1.1.weight"] == (1.0, 1.0)  # mmseg decays BatchNorm too
    assert groups["classifier.ml_head.fc.W"] == (0.1, 3.0) and groups["classifier.cls_emb"] == (1.0, 1.0)
    # The fork's keys name the ml block and classifier only.
    assert groups["classifier.ml_head.block.mlp.fc1.weight"] == (0.1, 3.0)
    assert groups["classifier.ml_head.proj_dec.pointwise_conv.weight"] == (1.0, 1.0)

    cfg = TrainConfig(model=tiny_cfg("upernet-swint", img_size=64))
    cfg.optim.ml_lr_mult, cfg.optim.ml_wd_mult = 0.1, 1.0
    model = build(cfg.model)
    groups = swin_groups(model, cfg)
    assert groups["backbone.body.layers.0.blocks.0.norm1.weight"] == (1.0, 0.0)
    assert groups["backbone.body.layers.0.blocks.0.attn.relative_position_bias_table"] == (1.0, 0.0)
    assert groups["backbone.body.layers.0.blocks.0.attn.qkv.weight"] == (1.0, 1.0)
    assert groups["classifier.norm.weight"] == (1.0, 0.0) and groups["decode_head.bottleneck.bn.weight"] == (1.0, 1.0)
    # mmcv: the longer ml key beats "norm", so the ml block's norms decay (at the ml lr).
    assert groups["classifier.ml_head.block.norm1.weight"] == (cfg.optim.ml_lr_mult, 1.0)
    assert groups["classifier.ml_head.norm.weight"] == (1.0, 0.0)

    cfg = TrainConfig(model=tiny_cfg("upernet-beitt"))
    cfg.optim.ml_lr_mult, cfg.optim.ml_wd_mult = 0.5, 2.0
    model = build(cfg.model)
    groups = beit_groups(model, cfg)
    rate, layers = 0.9, 12  # the official BEiT-B rule this model takes
    assert groups["backbone.body.blocks.0.attn.qkv.weight"] == pytest.approx((rate ** layers, 1.0))
    assert groups["backbone.body.patch_embed.proj.weight"] == pytest.approx((rate ** (layers + 1), 1.0))
    assert groups["classifier.ml_head.block.attn.qkv.weight"] == pytest.approx((0.5, 2.0))
    assert groups["classifier.cls_emb"] == pytest.approx((1.0, 1.0))


# ---------------------------------------------------------------------------------------
# Weights


def mmseg_names(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ResNet names -> mmseg ResNetV1c names (written from mmseg's `_make_stem_layer`:
    stem = Sequential(conv, bn, relu, conv, bn, relu, conv, bn, relu))."""
    stem = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
            "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    out = {}
    for k, v in sd.items():
        for old, new in stem.items():
            if k.startswith(old):
                k = new + k[len(old):]
        out[k] = v
    return out


def test_resnet_loads_timm_and_mmseg_checkpoints(tmp_path) -> None:
    torch.manual_seed(0)
    src = ResNetPyramid("resnet18")
    randomise(src, 6)
    own = src.body.state_dict()
    timm_file, mmseg_file, imagenet_file = tmp_path / "timm.pth", tmp_path / "mmseg.pth", tmp_path / "v1c.pth"
    torch.save({**own, "fc.weight": torch.zeros(1000, 512)}, timm_file)
    whole = {f"backbone.{k}": v for k, v in mmseg_names(own).items()}
    whole["decode_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    del whole["backbone.layer4.1.bn2.bias"]
    torch.save({"meta": {}, "state_dict": whole}, mmseg_file)  # mmcv's checkpoint layout
    torch.save({"state_dict": {**mmseg_names(own), "fc.weight": torch.zeros(1000, 512)}}, imagenet_file)
    assert any(k.startswith("backbone.stem.7.") for k in whole)

    for path, missing, unexpected in ((timm_file, [], []), (imagenet_file, [], []),
                                      (mmseg_file, ["layer4.1.bn2.bias"], ["decode_head.conv_seg.weight"])):
        dst = ResNetPyramid("resnet18")
        with pytest.warns(UserWarning) if missing else contextlib.nullcontext():
            got = load_resnet_weights(dst, path)
        assert got == (missing, unexpected), path
        for k, v in dst.body.state_dict().items():
            if k not in missing:
                assert torch.equal(v, own[k]), (path, k)


def test_wrong_resnet_files_are_one_line_user_errors(tmp_path) -> None:
    dst = ResNetPyramid("resnet18")
    with torch.device("meta"):
        r50 = ResNetPyramid("resnet50c")
    bad = tmp_path / "r50.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in r50.body.state_dict().items()}, bad)
    for path, fragment in ((bad, "shape mismatch"), (tmp_path / "none.pth", "not found"),
                           (tmp_path / "w.npz", "suffix '.npz'")):
        if path.suffix == ".npz":
            path.write_bytes(b"")
        with pytest.raises(UserError) as err:
            load_resnet_weights(dst, path)
        assert fragment in str(err.value) and "\n" not in str(err.value)


def test_build_loads_backbone_weights_from_the_config(tmp_path) -> None:
    src = ResNetPyramid("resnet18")
    randomise(src, 7)
    path = tmp_path / "w.pth"
    torch.save(src.body.state_dict(), path)
    model = build(tiny_cfg(backbone_weights=str(path)))
    assert torch.equal(model.backbone.body.layer3[1].conv2.weight, src.body.layer3[1].conv2.weight)


# ---------------------------------------------------------------------------------------
# Table 7: parameters (units of 10^6, the auxiliary head counted, as mmseg's get_flops counts
# every parameter) and the FLOPs trend


def aspp_params(c_in: int, c: int, n_dilated: int) -> int:
    """ASPPHead: image pool 1x1, one 1x1 branch, n 3x3 branches, 3x3 bottleneck (convs without
    bias, BN weight + bias)."""
    return 2 * (c_in * c + 2 * c) + n_dilated * (9 * c_in * c + 2 * c) + 9 * (n_dilated + 2) * c * c + 2 * c


def uperhead_params(c_in: list[int], c: int, n_scales: int = 4) -> int:
    """UPerHead: PPM 1x1 convs, 3x3 bottleneck, 1x1 laterals, 3x3 FPN convs, 3x3 fpn_bottleneck."""
    return (n_scales * (c_in[-1] * c + 2 * c) + 9 * (c_in[-1] + n_scales * c) * c + 2 * c
            + sum(ci * c + 2 * c for ci in c_in[:-1]) + (len(c_in) - 1) * (9 * c * c + 2 * c)
            + 9 * len(c_in) * c * c + 2 * c)


def rankseg_params(k: int, kappa: int, c: int, c_in: int, d: int, own: bool) -> int:
    """What RankSeg adds in place of conv_seg (c x K + K): class embeddings + bias, the rank
    LayerNorm(kappa), and the ml branch: depthwise + pointwise 1x1 convs, the bias-free d x d
    class-token projection, one transformer block (12 d^2 + 13 d), LayerNorm, GroupWiseLinear."""
    ml = 2 * c_in + c_in * d + d + d * d + 12 * d * d + 13 * d + 2 * d + d * k + k + (d * k if own else 0)
    return c * k + k + 2 * kappa + ml


def table7_formula(model: str, k: int, kappa: int, head: str, backbone: int) -> int:
    if model == "deeplabv3-r101":
        body, c, aux_in, c_in, d, own = aspp_params(2048, 512, 3), 512, 1024, 2048, 512, False
    elif model == "upernet-swinb":
        body, c, aux_in, c_in, d, own = uperhead_params([128, 256, 512, 1024], 512), 512, 512, 1024, 512, False
    else:  # BEiT-L: decoder width 1024, an ml branch of its own 1024 wide
        body, c, aux_in, c_in, d, own = uperhead_params([1024] * 4, 1024), 1024, 1024, 1024, 1024, True
    aux = 9 * aux_in * 256 + 2 * 256 + 256 * k + k
    cls = c * k + k if head == "segmenter" else rankseg_params(k, kappa, c, c_in, d, own)
    return backbone + body + aux + cls


# (model, crop, K, kappa, head, printed in Table 7, our count - printed in 10^6 units when it
# does not round to it: docs/architectures.md says why)
TABLE7 = [
    ("deeplabv3-r101", 512, 150, 50, "segmenter", 87.21, None),
    ("deeplabv3-r101", 512, 150, 50, "rankseg", 91.87, -0.12),
    ("deeplabv3-r101", 512, 171, 50, "segmenter", 87.22, None),
    ("deeplabv3-r101", 512, 171, 50, "rankseg", 91.75, 0.03),
    ("deeplabv3-r101", 512, 1284, 100, "segmenter", 88.08, None),
    ("deeplabv3-r101", 512, 1284, 100, "rankseg", 93.21, None),
    ("upernet-swinb", 512, 150, 50, "segmenter", 121.42, None),
    ("upernet-swinb", 512, 150, 50, "rankseg", 125.43, None),
    ("upernet-swinb", 512, 171, 50, "segmenter", 121.34, 0.09),
    ("upernet-swinb", 512, 171, 50, "rankseg", 125.46, None),
    ("upernet-swinb", 512, 1284, 100, "segmenter", 122.29, None),
    ("upernet-swinb", 512, 1284, 100, "rankseg", 126.89, None),
    ("upernet-beitl", 640, 150, 50, "segmenter", 441.27, None),
    ("upernet-beitl", 640, 150, 50, "rankseg", 456.28, None),
    ("upernet-beitl", 640, 171, 50, "segmenter", 441.30, None),
    ("upernet-beitl", 640, 171, 50, "rankseg", 456.35, None),
]


@pytest.mark.parametrize("model, crop, k, kappa, head, printed, diff", TABLE7)
def test_table7_parameters(model: str, crop: int, k: int, kappa: int, head: str, printed: float,
                           diff: float | None) -> None:
    m = ModelConfig(model=model, num_classes=k, kappa=kappa, head=head, img_size=crop)
    with torch.device("meta"):  # the family's own build; counting needs no values
        net = build(m)
    count = sum(p.numel() for p in net.parameters())
    backbone = sum(p.numel() for p in net.backbone.parameters())
    if model == "deeplabv3-r101":
        assert backbone == resnet_v1c_params(101)
    assert count == table7_formula(model, k, kappa, head, backbone)
    if diff is None:
        assert round(count / 1e6, 2) == printed
    else:
        assert round(count / 1e6 - printed, 2) == diff


@pytest.mark.slow
@pytest.mark.parametrize("model, k, kappa, paper_increment", [
    ("deeplabv3-r101", 150, 50, 349.17 - 347.64),
    ("upernet-swinb", 1284, 100, 306.53 - 309.34),
])
def test_table7_flops_trend(model: str, k: int, kappa: int, paper_increment: float) -> None:
    """RankSeg's GFLOPs minus the baseline's, in MACs as mmcv counts them: the same direction and
    size as the paper's (absolute numbers differ: we also count attention matmuls)."""
    from rankseg_core.engine.model_stats import count_flops

    macs = {}
    for head in ("segmenter", "rankseg"):
        m = ModelConfig(model=model, num_classes=k, kappa=kappa, head=head, img_size=512)
        with torch.device("meta"):
            net = build(m)
        macs[head] = count_flops(net, m)["macs"] / 1e9
    increment = macs["rankseg"] - macs["segmenter"]
    assert increment == pytest.approx(paper_increment, abs=0.65)
    assert (increment > 0) == (paper_increment > 0)
