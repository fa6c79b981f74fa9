"""MaskFormer (+ RankSeg) as a configuration of the Mask2Former family (issue 19).

Every check compares with an independent computation: DETR's post-norm decoder layer and the
whole standard decoder re-implemented here from the modules' raw weights; the FPN pixel
decoders likewise (nearest upsampling as pixel repetition); focal + dice on a hand-built
2-mask case from their formulas; the matching cost from a per-pair loop and the assignment by
brute force over permutations; the parameter counts from a formula of the official layer
shapes (and MaskFormer's published sizes); the engine through the CLI (train, exact resume,
eval, both heads, one-line errors).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, m2f_semantic_map, make_synthetic, overfit, train_until_checkpoint
from torch import Tensor, nn
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.mask2former import Mask2FormerConfig, MaskFormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine import runs
from rankseg_core.engine.model_stats import count_parameters, model_stats
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import MASK2FORMER
from rankseg_core.losses.maskformer import MaskFormerCriterion, maskformer_cost, maskformer_match
from rankseg_core.losses.targets import targets_from_semantic
from rankseg_core.model.mask2former.maskformer import (
    DetrDecoderLayer,
    FPNPixelDecoder,
    StandardTransformerDecoder,
    TransformerEncoderPixelDecoder,
)
from rankseg_core.model.mask2former.model import Mask2FormerOutput

runner = CliRunner()
TINY_MF = Mask2FormerConfig(hidden_dim=32, conv_dim=32, mask_dim=32, nheads=4, num_queries=6, dim_feedforward=64,
                            enc_layers=1, ml_hidden_dim=32, ml_query_layer=2, freeze_bn=False,
                            maskformer=MaskFormerConfig(dec_layers=3))


def tiny_cfg(head: str = "rankseg", task: str = "semantic", num_classes: int = 10, kappa: int = 4) -> ModelConfig:
    m2f = copy.deepcopy(TINY_MF)  # tests change nested options in place
    m2f.task = task
    return ModelConfig(model="maskformer-r50", num_classes=num_classes, kappa=kappa, head=head, img_size=64,
                       mask2former=m2f)


# ---------------------------------------------------------------------------------------
# Reference forwards, written from the official modules' definitions (raw weights only)


def ref_layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def ref_attention(q: Tensor, k: Tensor, v: Tensor, attn: nn.MultiheadAttention) -> Tensor:
    """Multi-head scaled dot-product attention (B x N x D inputs) from the packed weights."""
    d, h = q.shape[-1], attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    qs, ks, vs = (x @ w[i * d:(i + 1) * d].t() + b[i * d:(i + 1) * d] for i, x in enumerate((q, k, v)))

    def split(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], h, d // h).transpose(1, 2)

    a = torch.softmax(split(qs) @ split(ks).transpose(-1, -2) / math.sqrt(d // h), -1)
    o = (a @ split(vs)).transpose(1, 2).reshape(q.shape)
    return o @ attn.out_proj.weight.t() + attn.out_proj.bias


def ref_ffn(x: Tensor, ffn: nn.Module) -> Tensor:
    return torch.relu(x @ ffn.linear1.weight.t() + ffn.linear1.bias) @ ffn.linear2.weight.t() + ffn.linear2.bias


def ref_detr_layer(layer: DetrDecoderLayer, tgt: Tensor, memory: Tensor, pos: Tensor, qpos: Tensor,
                   order: str = "post") -> Tensor:
    """DETR's TransformerDecoderLayer: forward_post (the official PRE_NORM False) or
    forward_pre; order "cross_first" is Mask2Former's order, to show the test tells them apart."""
    sa, ca, ff = layer.self_attn, layer.cross_attn, layer.ffn
    if order == "pre":
        t2 = ref_layer_norm(tgt, sa.norm)
        t = tgt + ref_attention(t2 + qpos, t2 + qpos, t2, sa.self_attn)
        t2 = ref_layer_norm(t, ca.norm)
        t = t + ref_attention(t2 + qpos, memory + pos, memory, ca.multihead_attn)
        return t + ref_ffn(ref_layer_norm(t, ff.norm), ff)
    if order == "cross_first":
        t = ref_layer_norm(tgt + ref_attention(tgt + qpos, memory + pos, memory, ca.multihead_attn), ca.norm)
        t = ref_layer_norm(t + ref_attention(t + qpos, t + qpos, t, sa.self_attn), sa.norm)
        return ref_layer_norm(t + ref_ffn(t, ff), ff.norm)
    t = ref_layer_norm(tgt + ref_attention(tgt + qpos, tgt + qpos, tgt, sa.self_attn), sa.norm)
    t = ref_layer_norm(t + ref_attention(t + qpos, memory + pos, memory, ca.multihead_attn), ca.norm)
    return ref_layer_norm(t + ref_ffn(t, ff), ff.norm)


def ref_sine(h: int, w: int, dim: int) -> Tensor:
    """DETR's PositionEmbeddingSine(dim / 2, normalize=True) of an unpadded h x w map, as it is
    written there (cumulative sums of the not-mask): (h*w) x dim."""
    not_mask = torch.ones(1, h, w)
    y, x = not_mask.cumsum(1), not_mask.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    npf = dim // 2
    dim_t = 10000 ** (2 * (torch.arange(npf, dtype=torch.float32) // 2) / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3)[0].reshape(h * w, dim)


def ref_conv_gn(x: Tensor, block: nn.Sequential, relu: bool) -> Tensor:
    conv, gn = block[0], block[1]
    y = F.group_norm(F.conv2d(x, conv.weight, padding=conv.weight.shape[-1] // 2), gn.num_groups, gn.weight, gn.bias,
                     gn.eps)
    return torch.relu(y) if relu else y


def ref_encoder_layer(layer: nn.Module, src: Tensor, pos: Tensor) -> Tensor:
    """DETR's TransformerEncoderLayer.forward_post."""
    sa, ff = layer.self_attn, layer.ffn
    s = ref_layer_norm(src + ref_attention(src + pos, src + pos, src, sa.self_attn), sa.norm)
    return ref_layer_norm(s + ref_ffn(s, ff), ff.norm)


def ref_pixel_decoder(pd: FPNPixelDecoder, feats: list[Tensor]) -> tuple[Tensor, Tensor]:
    """BasePixelDecoder / TransformerEncoderPixelDecoder.forward_features: (mask features, memory)."""
    res5 = feats[-1]
    if isinstance(pd, TransformerEncoderPixelDecoder):
        x = F.conv2d(res5, pd.input_proj.weight, pd.input_proj.bias)
        b, d, h, w = x.shape
        src = x.flatten(2).transpose(1, 2)
        for layer in pd.encoder:
            src = ref_encoder_layer(layer, src, ref_sine(h, w, d)[None])
        memory = src.transpose(1, 2).reshape(b, d, h, w)
    else:
        memory = res5
    y = ref_conv_gn(memory, pd.top, relu=True)
    for i in (2, 1, 0):
        up = y.repeat_interleave(2, -2).repeat_interleave(2, -1)  # nearest x2 = repeat every pixel
        y = ref_conv_gn(ref_conv_gn(feats[i], pd.laterals[i], relu=False) + up, pd.outputs[i], relu=True)
    return F.conv2d(y, pd.mask_features.weight, pd.mask_features.bias, padding=1), memory


def ref_decoder(dec: StandardTransformerDecoder, x: Tensor, mask_features: Tensor) -> list[tuple[Tensor, Tensor]]:
    """TransformerPredictor (ENC_LAYERS 0, deep supervision): per layer (normed queries, masks)."""
    b, _, h, w = x.shape
    d = dec.query_embed.weight.shape[1]
    if dec.input_proj is not None:
        x = F.conv2d(x, dec.input_proj.weight, dec.input_proj.bias)
    memory = x.flatten(2).transpose(1, 2)
    pos = ref_sine(h, w, d)[None]
    qpos = dec.query_embed.weight[None].expand(b, -1, -1)
    t = torch.zeros_like(qpos)
    outs = []
    for layer in dec.layers:
        t = ref_detr_layer(layer, t, memory, pos, qpos)
        e = ref_layer_norm(t, dec.decoder_norm)
        m = e
        for i, lin in enumerate(dec.mask_embed.layers):
            m = m @ lin.weight.t() + lin.bias
            m = torch.relu(m) if i < 2 else m
        outs.append((e, torch.einsum("bqc,bchw->bqhw", m, mask_features)))
    return outs


# ---------------------------------------------------------------------------------------
# Modules


def test_detr_decoder_layer_is_post_norm_self_cross_ffn() -> None:
    torch.manual_seed(0)
    layer = DetrDecoderLayer(16, 4, 32, 0.1).eval()
    tgt, qpos = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    memory, pos = torch.randn(2, 12, 16), torch.randn(2, 12, 16)
    with torch.no_grad():
        ours = layer(tgt, memory, pos, qpos)
        assert torch.allclose(ours, ref_detr_layer(layer, tgt, memory, pos, qpos), atol=1e-5)
        # The reference tells the orders apart: pre-norm and Mask2Former's cross-first differ.
        for order in ("pre", "cross_first"):
            assert not torch.allclose(ours, ref_detr_layer(layer, tgt, memory, pos, qpos, order), atol=1e-2)
    # xavier_uniform on every matrix (DETR's _reset_parameters): bound sqrt(6 / (fan_in + fan_out))
    w = layer.ffn.linear1.weight
    assert w.abs().max() <= math.sqrt(6 / (16 + 32)) and w.abs().max() > 0.8 * math.sqrt(6 / (16 + 32))


@pytest.mark.parametrize("kind", ["fpn", "transformer_fpn"])
def test_pixel_decoder_and_standard_decoder_equal_the_reference(kind: str) -> None:
    torch.manual_seed(1)
    cfg = dataclasses.replace(TINY_MF, maskformer=MaskFormerConfig(pixel_decoder=kind, dec_layers=3))
    channels = [8, 16, 24, 40]
    feats = [torch.randn(2, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate(channels)]  # strides 4..32 of 64 px
    from rankseg_core.model.mask2former.maskformer import build_maskformer_heads

    pd, dec = build_maskformer_heads(channels, cfg, num_queries=5)
    pd.eval()
    dec.eval()
    assert isinstance(pd, TransformerEncoderPixelDecoder if kind == "transformer_fpn" else FPNPixelDecoder)
    with torch.no_grad():
        mask_features, scales = pd(feats)
        ref_mf, ref_memory = ref_pixel_decoder(pd, feats)
        assert mask_features.shape == (2, 32, 16, 16)
        assert torch.allclose(mask_features, ref_mf, atol=1e-4)
        # The decoder reads res5 itself (fpn: 40 channels, projected) or the encoder's map (32 = hidden: no projection).
        assert len(scales) == 1 and torch.allclose(scales[0], ref_memory, atol=1e-5)
        assert (dec.input_proj is None) == (kind == "transformer_fpn")
        out = dec(scales, mask_features)
        ref = ref_decoder(dec, ref_memory, ref_mf)
    assert len(out.embeds) == len(out.masks) == len(out.queries) == 3  # one prediction per layer, none before
    for (e, m), emb, masks in zip(ref, out.embeds, out.masks):
        assert emb.shape == (2, 5, 32) and masks.shape == (2, 5, 16, 16)
        assert torch.allclose(emb, e, atol=1e-4) and torch.allclose(masks, m, atol=1e-3)
    # The top FPN conv reads res5 (fpn) or the conv_dim encoder map (transformer_fpn).
    assert pd.top[0].weight.shape[1] == (32 if kind == "transformer_fpn" else 40)


def test_family_builds_maskformer_for_maskformer_names_with_both_heads() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    base = MASK2FORMER.build(tiny_cfg(head="segmenter")).eval()
    rank = MASK2FORMER.build(tiny_cfg(head="rankseg", kappa=4)).eval()
    with torch.no_grad():
        b, r = base(x), rank(x)
        # RankSeg: the ml head reads the raw queries after layer ml_query_layer (2).
        mask_features, scales = rank.pixel_decoder(rank.forward_features(x).maps)
        queries = rank.decoder(scales, mask_features).queries
        assert torch.allclose(r.ml_logits, rank.ml_head(queries[1]), atol=1e-5)
        assert not torch.allclose(r.ml_logits, rank.ml_head(queries[2]), atol=1e-3)
    assert isinstance(base.decoder, StandardTransformerDecoder) and type(base.pixel_decoder) is FPNPixelDecoder
    assert b.pred_logits.shape == (2, 6, 11) and r.pred_logits.shape == (2, 6, 5)  # K + 1 vs kappa + 1 columns
    assert b.pred_masks.shape == r.pred_masks.shape == (2, 6, 16, 16)
    assert len(b.aux) == len(r.aux) == 2 and b.ml_logits is None
    assert torch.equal(r.topk_index, r.ml_logits.argsort(-1, descending=True)[:, :4])
    pan = MASK2FORMER.build(tiny_cfg(task="panoptic"))
    assert isinstance(pan.pixel_decoder, TransformerEncoderPixelDecoder)  # the panoptic config's default


def test_panoptic_prediction_keeps_queries_at_maskformers_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """The panoptic task predicts segments with MaskFormer's keep threshold (0.7, the ADE20K
    panoptic config), not Mask2Former's 0.8."""
    import rankseg_core.families.mask2former as fam
    from rankseg_core.config.train import TrainConfig
    from rankseg_core.families.base import InferenceProtocol
    from rankseg_core.model.selection import NO_SELECTION

    seen = []

    def spy(out, size, things, keep, overlap):
        seen.append((keep, overlap))
        return [(torch.zeros(size, dtype=torch.int32), [])]

    monkeypatch.setattr(fam, "panoptic_inference", spy)
    cfg = TrainConfig(model=tiny_cfg(task="panoptic"))
    model = MASK2FORMER.build(cfg.model).eval()
    pred = MASK2FORMER.predict(model, cfg, torch.randn(1, 3, 64, 64), [(64, 64)], InferenceProtocol(), NO_SELECTION)
    assert seen == [(0.7, 0.8)] and pred.panoptic is not None and pred.semantic[0].shape == (64, 64)


def test_options_are_checked_in_one_line() -> None:
    def refused(cfg: ModelConfig, *fragments: str) -> None:
        with pytest.raises(UserError) as err:
            MASK2FORMER.build(cfg)
        assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)

    bad = tiny_cfg()
    bad.mask2former.dec_layers = 3  # Mask2Former's layer count: a MaskFormer would ignore it
    refused(bad, "model.mask2former.dec_layers=3", "model.mask2former.maskformer.dec_layers")
    bad = tiny_cfg()
    bad.mask2former.maskformer.pixel_decoder = "msdeform"
    refused(bad, "pixel_decoder='msdeform'", "fpn, transformer_fpn")
    bad = tiny_cfg()
    bad.mask2former.maskformer.dec_layers = 1  # below ml_query_layer 2
    refused(bad, "ml_query_layer=2", "maskformer.dec_layers=1")
    m2f = ModelConfig(model="mask2former-r50", mask2former=Mask2FormerConfig(maskformer=MaskFormerConfig(dropout=0.2)))
    refused(m2f, "maskformer.*", "maskformer-r50")
    clip = dataclasses.replace(tiny_cfg(), clip_len=2)
    refused(clip, "model.clip_len=2", "maskformer-r50")


# ---------------------------------------------------------------------------------------
# Loss and matching


def hand_output(logits: Tensor, masks: Tensor, k: int) -> Mask2FormerOutput:
    """One image, the same prediction as the last layer and one auxiliary layer."""
    return Mask2FormerOutput(pred_logits=logits, pred_masks=masks, aux=[(logits, masks)], ml_logits=None,
                             topk_index=None, valid=None, image_size=(masks.shape[-2] * 4, masks.shape[-1] * 4),
                             num_classes=k)


def test_focal_and_dice_on_two_hand_built_masks() -> None:
    """Query 0 predicts p = 1/2 everywhere for a left-half GT, query 1 p = 3/4 for an all-ones
    GT; the full-resolution focal (alpha 1/4, gamma 2) and dice follow from their formulas."""
    k = 2
    crit = MaskFormerCriterion(tiny_cfg(head="segmenter", num_classes=k))
    masks = torch.stack([torch.zeros(4, 4), torch.full((4, 4), math.log(3.0))])[None]  # 1 x 2 x 4 x 4
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]]])
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, :, :8] = True
    gt[1] = True
    res = crit(hand_output(logits, masks, k), [{"labels": torch.tensor([0, 1]), "masks": gt}])
    a, ln2 = 0.25, math.log(2.0)
    focal_0 = (a * ln2 * 0.25 + (1 - a) * ln2 * 0.25) / 2  # half the pixels positive, p_t = 1/2
    focal_1 = a * -math.log(0.75) * 0.25**2  # all positive, p_t = 3/4
    dice_0 = 1 - (2 * 0.5 * 128 + 1) / (0.5 * 256 + 128 + 1)
    dice_1 = 1 - (2 * 0.75 * 256 + 1) / (0.75 * 256 + 256 + 1)
    ce = -math.log(math.exp(5) / (math.exp(5) + 2))  # both queries matched to their class
    focal, dice = (focal_0 + focal_1) / 2, (dice_0 + dice_1) / 2  # / N = 2 masks
    assert float(res["mask"]) == pytest.approx(focal, rel=1e-5)
    assert float(res["dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(res["ce"]) == pytest.approx(ce, rel=1e-5)
    # Two prediction steps with MaskFormer's weights: CE 1, focal 20, dice 1.
    assert float(res["loss"]) == pytest.approx(2 * (ce + 20 * focal + dice), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_cost_and_assignment_by_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, n, c = 5, 3, 4
    logits = torch.randn(q, c + 1, generator=g) * 2
    masks = torch.randn(q, 4, 4, generator=g) * 3
    tgt = torch.rand(n, 16, 16, generator=g) > 0.5
    labels = torch.randint(0, c, (n,), generator=g)
    # Independent cost: per pair, the GT at the prediction's grid is its every 4th pixel (nearest).
    expected = np.zeros((q, n))
    prob = np.exp(logits.double().numpy())
    prob /= prob.sum(1, keepdims=True)
    for i in range(q):
        p = 1 / (1 + np.exp(-masks[i].double().numpy().ravel()))
        for j in range(n):
            t = tgt[j, ::4, ::4].double().numpy().ravel()
            focal = np.mean(0.25 * (1 - p) ** 2 * -np.log(p) * t + 0.75 * p**2 * -np.log(1 - p) * (1 - t))
            dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
            expected[i, j] = 20 * focal - prob[i, labels[j]] + dice
    cost = maskformer_cost(logits, masks, labels, tgt, 1.0, 20.0, 1.0)
    assert np.allclose(cost.double().numpy(), expected, atol=1e-5)
    best = min(itertools.permutations(range(q), n), key=lambda rows: sum(expected[r, j] for j, r in enumerate(rows)))
    (rows, cols), = maskformer_match(logits[None], masks[None], [{"labels": labels, "masks": tgt}], 1.0, 20.0, 1.0)
    assert sorted(zip(cols.tolist(), rows.tolist())) == sorted(enumerate(best))


# ---------------------------------------------------------------------------------------
# Training


def two_class_image() -> tuple[Tensor, Tensor]:
    """64 x 64: class 3 on top, class 7 bottom-left, class 1 bottom-right, each its own colour."""
    lab = torch.full((64, 64), 1, dtype=torch.long)
    lab[:32] = 3
    lab[32:, :24] = 7
    img = torch.zeros(1, 3, 64, 64)
    for cls, rgb in {1: (1.0, -1.0, 0.0), 3: (-1.0, 1.0, 0.5), 7: (0.0, 0.5, -1.0)}.items():
        img[0, :, lab == cls] = torch.tensor(rgb)[:, None]
    return img, lab


@pytest.mark.slow  # ~4 s of CPU each
@pytest.mark.parametrize("head", ["rankseg", "segmenter"])
def test_tiny_maskformer_overfits_one_image(head: str) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg(head=head, kappa=4)
    cfg.mask2former.maskformer.dropout = 0.0  # an overfit check: dropout would only add noise
    model = MASK2FORMER.build(cfg).train()
    # The backbone stays fixed: AdamW over ResNet-50's 23M weights would dominate the time, and
    # what is new here is everything after it.
    model.backbone.requires_grad_(False)
    img, lab = two_class_image()
    losses = overfit(model, MaskFormerCriterion(cfg), img, [targets_from_semantic(lab, 10, 255)], steps=60)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.2 * sum(losses[:3]) / 3, losses
    model.eval()
    with torch.no_grad():
        out = model(img)
    assert (m2f_semantic_map(out, (64, 64))[0] == lab).float().mean() > 0.95
    if head == "rankseg":
        assert {1, 3, 7} <= set(out.topk_index[0].tolist())  # the ml head learned the image's classes


# The CLI run's tiny widths (as conftest's TINY_MASK2FORMER_RUN, with MaskFormer's own layer count).
TINY_RUN = ["model.model=maskformer-r50", "model.img_size=64", "model.kappa=6", "model.mask2former.hidden_dim=32",
            "model.mask2former.conv_dim=32", "model.mask2former.mask_dim=32", "model.mask2former.nheads=4",
            "model.mask2former.num_queries=8", "model.mask2former.maskformer.dec_layers=2",
            "model.mask2former.dim_feedforward=64", "model.mask2former.ml_hidden_dim=32",
            "model.mask2former.ml_query_layer=1", "model.mask2former.freeze_bn=false", "schedule.batch_size=2",
            "optim.lr=1e-3", "data.num_workers=0", "eval.num_workers=0", "log_every=1", "device=cpu",
            "eval.short_side=64", "data.val_split=", "ckpt_every=1000"]


def sets(*extra: str) -> list[str]:
    return sum((["--set", s] for s in [*TINY_RUN, *extra]), [])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("mf") / "data", num_classes=40, images=8, val_images=2, size=64)


@pytest.mark.slow  # ~15 s: three short training processes and an evaluation
def test_cli_train_resumes_exactly_and_evaluates(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`rankseg train --model maskformer-r50 --head rankseg`: an interrupted run resumed from
    last.pt ends bit-identical to an uninterrupted one; `rankseg eval` scores it."""
    args = ["train", "--data", str(data), "--head", "rankseg", *sets("schedule.iters=2")]
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "straight")])
    assert res.exit_code == 0, res.output
    assert "maskformer-r50 rankseg kappa=6" in res.output

    def cut() -> None:
        runner.invoke(app, [*args, "--out", str(tmp_path / "cut"), "--set", "ckpt_every=1"],
                      catch_exceptions=False)

    train_until_checkpoint(monkeypatch, 1, cut)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert res.exit_code == 0, res.output
    a = runs.load_weights(tmp_path / "straight" / "model.safetensors")
    b = runs.load_weights(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("decoder.layers.1.cross_attn") for k in a) and not any("deform" in k for k in a)
    records = [r for r in runs.read_metrics(tmp_path / "straight") if r["type"] == "train"]
    assert [r["iter"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    assert {"ce", "mask", "dice", "ml", "kept"} <= set(records[0])

    res = runner.invoke(app, ["eval", str(tmp_path / "straight"), "--split", "val", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["num_images"] == 2 and report["config"]["model"] == "maskformer-r50"
    assert 0.0 <= report["miou"] <= 1.0 and 0.0 <= report["map"] <= 1.0 and report["config"]["kappa"] == 6


@pytest.mark.slow  # ~6 s
def test_cli_baseline_trains_and_bad_options_are_one_line(tmp_path: Path, data: Path) -> None:
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "base"), "--head", "segmenter",
                              *sets("schedule.iters=1")])
    assert res.exit_code == 0, res.output
    cfg = (tmp_path / "base" / "config.yaml").read_text()
    assert "model: maskformer-r50" in cfg and "head: segmenter" in cfg
    w = runs.load_weights(tmp_path / "base" / "model.safetensors")
    assert w["class_embed.bias"].shape == (41,) and not any(k.startswith("ml_head.") for k in w)
    res = runner.invoke(app, ["eval", str(tmp_path / "base"), "--split", "val"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "bad"),
                              *sets("model.mask2former.dec_layers=4")])
    assert_one_line_error(res, "model.mask2former.dec_layers=4", "model.mask2former.maskformer.dec_layers")
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "bad"),
                              *sets("model.mask2former.maskformer.pixel_decoder=deformable")])
    assert_one_line_error(res, "model.mask2former.maskformer.pixel_decoder='deformable'", "fpn, transformer_fpn")


# ---------------------------------------------------------------------------------------
# Cost: parameters vs the official layer shapes and MaskFormer's published sizes

# MaskFormer paper Table 1 / model zoo (ADE20K semantic, 150 classes, 100 queries), in 10^6.
PUBLISHED_M = {"maskformer-r50": 41, "maskformer-swinb": 102, "maskformer-swinl": 212}
SWIN = {"maskformer-swinb": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
        "maskformer-swinl": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)}


def resnet50_frozen_bn_params() -> int:
    """Conv weights of ResNet-50 without the classifier (frozen BN holds buffers, not parameters)."""
    total = 3 * 64 * 7 * 7
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for i in range(blocks):
            total += cin * width + width * width * 9 + width * 4 * width + (cin * 4 * width if i == 0 else 0)
            cin = 4 * width
    return total


def swin_pyramid_params(embed: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int) -> int:
    """Swin (patch 4, MLP ratio 4) with D2SwinTransformer's four output LayerNorms, no final norm / head."""
    total = 3 * embed * 16 + embed + 2 * embed  # patch embedding conv + its LayerNorm
    for stage, (depth, h) in enumerate(zip(depths, heads)):
        c = embed * 2**stage
        if stage:  # patch merging: LayerNorm(4C') + Linear(4C' -> 2C') without bias, C' = c / 2
            total += 2 * 2 * c + 2 * c * c
        block = 2 * (2 * c) + (3 * c * c + 3 * c) + (c * c + c) + (2 * window - 1) ** 2 * h + (4 * c * c + 4 * c) + (
            4 * c * c + c)
        total += depth * block + 2 * c  # + the stage's output LayerNorm
    return total


def maskformer_head_params(k: int, kappa: int, rankseg: bool, in_ch: list[int], m: Mask2FormerConfig,
                           pixel: str) -> int:
    """Everything after the backbone from the official MaskFormer layer shapes (independent of the code)."""
    d, hd, md, f, q = m.conv_dim, m.hidden_dim, m.mask_dim, m.dim_feedforward, m.num_queries or 100

    def conv(cin: int, cout: int, ks: int, bias: bool) -> int:
        return cin * cout * ks * ks + (cout if bias else 0)

    def lin(a: int, b: int, bias: bool = True) -> int:
        return a * b + (b if bias else 0)

    def mha(x: int) -> int:
        return 3 * x * x + 3 * x + lin(x, x)

    gn = ln = 2  # x channels
    pixel_params = sum(conv(c, d, 1, False) + gn * d + conv(d, d, 3, False) + gn * d for c in in_ch[:-1])
    pixel_params += conv(d, md, 3, True)  # mask_features
    if pixel == "fpn":
        pixel_params += conv(in_ch[-1], d, 3, False) + gn * d  # layer_4 on res5
        memory = in_ch[-1]
    else:  # layer_4 on the encoder's map, input_proj, encoder layers
        pixel_params += conv(d, d, 3, False) + gn * d + conv(in_ch[-1], d, 1, True)
        pixel_params += m.enc_layers * (mha(d) + lin(d, f) + lin(f, d) + 2 * ln * d)
        memory = d
    predictor = (conv(memory, hd, 1, True) if memory != hd else 0) + q * hd + ln * hd
    predictor += m.maskformer.dec_layers * (2 * mha(hd) + lin(hd, f) + lin(f, hd) + 3 * ln * hd)
    predictor += 2 * lin(hd, hd) + lin(hd, md) + lin(hd, k + 1, bias=not rankseg)
    ml = 0
    if rankseg:
        e = m.ml_hidden_dim
        block = 2 * ln * e + lin(e, 3 * e) + lin(e, e) + lin(e, 4 * e) + lin(4 * e, e)
        ml = lin(hd, e) + k * e + block + ln * e + (k * e + k) + 2 * (kappa + 1)
    return pixel_params + predictor + ml


@pytest.mark.slow  # builds Swin-L (~210M parameters): ~10 s together
@pytest.mark.parametrize("name", list(PUBLISHED_M))
def test_parameter_counts_equal_the_official_shapes_and_published_sizes(name: str) -> None:
    cfg = ModelConfig(model=name, num_classes=150, kappa=150, head="segmenter")
    stats = model_stats(cfg, flops=False)
    if name == "maskformer-r50":
        backbone, channels = resnet50_frozen_bn_params(), [256, 512, 1024, 2048]
    else:
        embed = SWIN[name][0]
        backbone, channels = swin_pyramid_params(*SWIN[name]), [embed * 2**i for i in range(4)]
    m = cfg.mask2former
    assert stats["params_backbone"] == backbone
    assert stats["params"] == backbone + maskformer_head_params(150, 150, False, channels, m, "fpn")
    assert round(stats["params_m"]) == PUBLISHED_M[name]  # the published sizes are in 10^6
    assert stats["decoder"] == "StandardTransformerDecoder" and stats["queries"] == 100
    if name == "maskformer-r50":  # + RankSeg, and the panoptic config's transformer-encoder FPN
        rank = model_stats(dataclasses.replace(cfg, head="rankseg"), flops=False)
        assert rank["params"] == backbone + maskformer_head_params(150, 150, True, channels, m, "fpn")
        pan_cfg = dataclasses.replace(cfg, mask2former=Mask2FormerConfig(task="panoptic"))
        pan = count_parameters(MASK2FORMER.build(pan_cfg))
        assert pan == backbone + maskformer_head_params(150, 150, False, channels, m, "transformer_fpn")


def test_cli_stats_model_maskformer() -> None:
    res = runner.invoke(app, ["stats", "model", "--model", "maskformer-r50", "--num-classes", "150", "--kappa", "150",
                              "--no-flops", "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert stats["pixel_decoder"] == "FPNPixelDecoder" and stats["queries"] == 100
    m = Mask2FormerConfig()  # + RankSeg with kappa = K: the ml head and LayerNorm(151) on top
    assert stats["params"] == resnet50_frozen_bn_params() + maskformer_head_params(150, 150, True, [256, 512, 1024, 2048],
                                                                                   m, "fpn")
    assert stats["params_ml_head"] > 3e6


def test_maskformer_recipes_are_the_official_optimizers_under_the_dataset_protocol() -> None:
    from rankseg_core.engine.configure import dataset_defaults

    r50 = dataset_defaults("maskformer-r50", "ade20k")
    assert r50["optim.weight_decay"] == 1e-4 and r50["optim.backbone_lr_mult"] == 0.1 and r50["model.img_size"] == 512
    swinb = dataset_defaults("maskformer-swinb", "ade20k")
    assert (swinb["optim.lr"], swinb["optim.weight_decay"], swinb["optim.backbone_lr_mult"]) == (6e-5, 0.01, 1.0)
    assert swinb["schedule.warmup_iters"] == 1500 and swinb["model.img_size"] == 640
    assert dataset_defaults("maskformer-swint", "ade20k")["model.img_size"] == 512
    # The dataset's own recipe stays on top (the CPU protocol of the synthetic data), and
    # Mask2Former models keep Mask2Former's optimizer.
    assert dataset_defaults("maskformer-swinl", "synthetic")["model.img_size"] == 128
    assert dataset_defaults("mask2former-swinb", "ade20k")["optim.weight_decay"] == 0.05
