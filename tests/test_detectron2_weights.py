"""detectron2 checkpoints: the restricted .pkl reader, backbone layouts (torchvision- and
MSRA-converted R-50.pkl, a trained model's `backbone.*`, D2SwinTransformer) and whole official
Mask2Former / MaskFormer (+ RankSeg fork) models.

The references are written here from the official code, not from our rule table:
- the official names of a tiny config, listed from the official modules' structure
  (detectron2 `resnet.py`, Mask2Former `swin.py` / `msdeformattn.py` /
  `mask2former_transformer_decoder.py`, MaskFormer `pixel_decoder.py` /
  `transformer_predictor.py` / `transformer.py`, the fork's `multilabel_head.py`), and one
  hand-typed official -> ours pair per component (same-shaped roles, such as self- vs
  cross-attention, that a name-set or round-trip check cannot tell apart);
- detectron2's `tools/convert-torchvision-to-d2.py` renaming, re-implemented on timm's
  (= torchvision's) ResNet names; MSRA's Caffe2 format (BN folded into scale / bias, BGR
  input with std 1) built by hand from a reference network;
- the original Swin release's names (downsample at the end of a stage) from timm's Swin.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_M2F
from test_maskformer import tiny_cfg as tiny_mf_cfg
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine.warm_start import warm_start
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import MASK2FORMER
from rankseg_core.model.mask2former import detectron2_weights as d2w
from rankseg_core.model.mask2former.backbone import PyramidBackbone, load_pyramid_weights
from rankseg_core.model.mask2former.detectron2_weights import (
    caffe2_names,
    detectron2_names,
    detectron2_warm_start,
    load_detectron2_mask2former,
    model_rules,
    read_detectron2,
    rename,
)

K, KAPPA = 10, 4
WB = ("weight", "bias")
NORM4 = ("weight", "bias", "running_mean", "running_var")  # detectron2's FrozenBatchNorm2d buffers
ATTN = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")  # nn.MultiheadAttention
R50_BLOCKS = (3, 4, 6, 3)
SWIN_T_DEPTHS = (2, 2, 6, 2)
PD, PR = "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."


def _m2f_cfg(model: str, head: str) -> ModelConfig:
    return ModelConfig(model=model, num_classes=K, kappa=KAPPA, head=head, img_size=64,
                       mask2former=dataclasses.replace(TINY_M2F))


def _build(cfg: ModelConfig, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MASK2FORMER.build(copy.deepcopy(cfg)).eval()


# The four official layouts: (name, config). MaskFormer configs come from test_maskformer.py.
CONFIGS = {
    "mask2former-r50-rankseg": _m2f_cfg("mask2former-r50", "rankseg"),
    "mask2former-swint-baseline": _m2f_cfg("mask2former-swint", "segmenter"),
    "maskformer-r50-fpn-rankseg": tiny_mf_cfg(head="rankseg"),
    "maskformer-r50-transformer-fpn-baseline": tiny_mf_cfg(head="segmenter", task="panoptic"),
}


@pytest.fixture(scope="module")
def source_models() -> dict[str, nn.Module]:
    """One model per layout with random weights (and random BN statistics, so that a lost
    statistic shows)."""
    out = {}
    for name, cfg in CONFIGS.items():
        model = _build(cfg, seed=0)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for key, value in model.state_dict().items():
                if key.endswith("running_mean"):
                    value.copy_(torch.randn(value.shape, generator=g) * 0.1)
                elif key.endswith("running_var"):
                    value.copy_(torch.rand(value.shape, generator=g) + 0.5)
        out[name] = model
    return out


# ---------------------------------------------------------------------------------------
# Official names, listed from the official modules' structure


def official_resnet50() -> set[str]:
    """detectron2 build_resnet_backbone (depth 50, FrozenBN): BasicStem.conv1 and res2..res5
    of BottleneckBlocks (conv1..3, a shortcut in each stage's first block), every Conv2d with
    its `norm`."""
    names = {"stem.conv1.weight"} | {f"stem.conv1.norm.{b}" for b in NORM4}
    for s, blocks in enumerate(R50_BLOCKS, start=2):
        for b in range(blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if b == 0 else [])
            for c in convs:
                names |= {f"res{s}.{b}.{c}.weight"} | {f"res{s}.{b}.{c}.norm.{n}" for n in NORM4}
    return names


def official_swin_t(buffers: bool = True) -> set[str]:
    """D2SwinTransformer (Swin-T): PatchEmbed (proj + norm), BasicLayers of
    SwinTransformerBlocks with a PatchMerging at the end of stages 0..2, norm0..norm3."""
    names = {f"patch_embed.{m}.{p}" for m in ("proj", "norm") for p in WB}
    for i, depth in enumerate(SWIN_T_DEPTHS):
        for j in range(depth):
            blk = f"layers.{i}.blocks.{j}."
            names |= {blk + "attn.relative_position_bias_table"}
            names |= {blk + "attn.relative_position_index"} if buffers else set()
            names |= {f"{blk}{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                      for p in WB}
        if i < 3:
            names |= {f"layers.{i}.downsample.reduction.weight"} | {f"layers.{i}.downsample.norm.{p}" for p in WB}
        names |= {f"norm{i}.{p}" for p in WB}
    return names


def official_ml_head() -> set[str]:
    """The RankSeg fork's MultiLabelHead (share_embedding False) and ml_norm = LayerNorm(TOPK+1)."""
    names = {"ml_head.cls_emb", "ml_head.fc.W", "ml_head.fc.b"}
    names |= {f"ml_head.{m}.{p}" for m in ("proj_dec", "norm", "block.norm1", "block.norm2", "block.attn.qkv",
                                            "block.attn.proj", "block.mlp.fc1", "block.mlp.fc2") for p in WB}
    return names | {f"ml_norm.{p}" for p in WB}


def official_mask2former_heads(enc_layers: int, dec_layers: int, class_bias: bool) -> set[str]:
    """MSDeformAttnPixelDecoder (input_proj = Conv2d + GroupNorm per level, the encoder-only
    deformable transformer, one FPN level adapter_1 / layer_1) and
    MultiScaleMaskedTransformerDecoder (no input_proj when conv_dim == hidden_dim)."""
    names = {PD + "transformer.level_embed"}
    names |= {f"{PD}input_proj.{i}.{j}.{p}" for i in range(3) for j in (0, 1) for p in WB}
    for layer in range(enc_layers):
        names |= {f"{PD}transformer.encoder.layers.{layer}.{m}.{p}" for p in WB
                  for m in ("self_attn.sampling_offsets", "self_attn.attention_weights", "self_attn.value_proj",
                            "self_attn.output_proj", "norm1", "linear1", "linear2", "norm2")}
    names |= {PD + "adapter_1.weight", PD + "layer_1.weight"}
    names |= {f"{PD}{m}.norm.{p}" for m in ("adapter_1", "layer_1") for p in WB}
    names |= {f"{PD}mask_features.{p}" for p in WB}
    for layer in range(dec_layers):
        names |= {f"{PR}transformer_self_attention_layers.{layer}.self_attn.{a}" for a in ATTN}
        names |= {f"{PR}transformer_cross_attention_layers.{layer}.multihead_attn.{a}" for a in ATTN}
        names |= {f"{PR}transformer_{kind}_attention_layers.{layer}.norm.{p}" for kind in ("self", "cross")
                  for p in WB}
        names |= {f"{PR}transformer_ffn_layers.{layer}.{m}.{p}" for m in ("linear1", "linear2", "norm") for p in WB}
    names |= {f"{PR}decoder_norm.{p}" for p in WB}
    names |= {PR + "query_feat.weight", PR + "query_embed.weight", PR + "level_embed.weight"}
    names |= {f"{PR}mask_embed.layers.{i}.{p}" for i in range(3) for p in WB}
    return names | {PR + "class_embed.weight"} | ({PR + "class_embed.bias"} if class_bias else set())


def official_maskformer_heads(dec_layers: int, enc_layers: int | None, predictor_proj: bool,
                              class_bias: bool) -> set[str]:
    """BasePixelDecoder (layer_4 on res5; adapter_1..3 / layer_1..3 on res2..res4; a 3x3
    mask_features), TransformerEncoderPixelDecoder when `enc_layers` is given (+ input_proj
    and DETR encoder layers), TransformerPredictor (DETR decoder, ENC_LAYERS 0)."""
    names = {PD + "layer_4.weight"} | {f"{PD}layer_4.norm.{p}" for p in WB}
    for i in (1, 2, 3):
        names |= {f"{PD}adapter_{i}.weight", f"{PD}layer_{i}.weight"}
        names |= {f"{PD}{m}_{i}.norm.{p}" for m in ("adapter", "layer") for p in WB}
    names |= {f"{PD}mask_features.{p}" for p in WB}
    if enc_layers is not None:
        names |= {f"{PD}input_proj.{p}" for p in WB}
        for layer in range(enc_layers):
            enc = f"{PD}transformer.encoder.layers.{layer}."
            names |= {f"{enc}self_attn.{a}" for a in ATTN}
            names |= {f"{enc}{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2") for p in WB}
    for layer in range(dec_layers):
        dec = f"{PR}transformer.decoder.layers.{layer}."
        names |= {f"{dec}{attn}.{a}" for attn in ("self_attn", "multihead_attn") for a in ATTN}
        names |= {f"{dec}{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3") for p in WB}
    names |= {f"{PR}transformer.decoder.norm.{p}" for p in WB} | {PR + "query_embed.weight"}
    names |= {f"{PR}input_proj.{p}" for p in WB} if predictor_proj else set()
    names |= {f"{PR}mask_embed.layers.{i}.{p}" for i in range(3) for p in WB}
    return names | {PR + "class_embed.weight"} | ({PR + "class_embed.bias"} if class_bias else set())


def official_names(name: str) -> set[str]:
    m, mf = TINY_M2F, CONFIGS["maskformer-r50-fpn-rankseg"].mask2former
    if name == "mask2former-r50-rankseg":
        return ({f"backbone.{n}" for n in official_resnet50()} | official_ml_head()
                | official_mask2former_heads(m.enc_layers, m.dec_layers, class_bias=False))  # cosine: no bias
    if name == "mask2former-swint-baseline":
        return ({f"backbone.{n}" for n in official_swin_t(buffers=False)}
                | official_mask2former_heads(m.enc_layers, m.dec_layers, class_bias=True))
    heads = (official_maskformer_heads(mf.maskformer.dec_layers, None, predictor_proj=True, class_bias=False)
             | official_ml_head() if name == "maskformer-r50-fpn-rankseg" else
             official_maskformer_heads(mf.maskformer.dec_layers, mf.enc_layers, predictor_proj=False, class_bias=True))
    return {f"backbone.{n}" for n in official_resnet50()} | heads


# One official -> ours pair per role, typed from reading both code bases.
ROLES = {
    "mask2former-r50-rankseg": {
        "backbone.stem.conv1.weight": "backbone.body.conv1.weight",
        "backbone.stem.conv1.norm.running_var": "backbone.body.bn1.running_var",
        "backbone.res2.0.conv3.norm.bias": "backbone.body.layer1.0.bn3.bias",
        "backbone.res3.0.shortcut.weight": "backbone.body.layer2.0.downsample.0.weight",
        "backbone.res5.0.shortcut.norm.running_mean": "backbone.body.layer4.0.downsample.1.running_mean",
        "backbone.res4.5.conv2.weight": "backbone.body.layer3.5.conv2.weight",
        PD + "transformer.level_embed": "pixel_decoder.level_embed",
        PD + "input_proj.0.1.weight": "pixel_decoder.input_proj.0.1.weight",  # res5's GroupNorm
        PD + "transformer.encoder.layers.0.norm1.weight": "pixel_decoder.layers.0.norm1.weight",
        PD + "transformer.encoder.layers.0.self_attn.sampling_offsets.bias":
            "pixel_decoder.layers.0.self_attn.sampling_offsets.bias",
        PD + "adapter_1.weight": "pixel_decoder.lateral_conv.weight",
        PD + "adapter_1.norm.weight": "pixel_decoder.lateral_norm.weight",
        PD + "layer_1.weight": "pixel_decoder.output_conv.weight",
        PD + "layer_1.norm.bias": "pixel_decoder.output_norm.bias",
        PD + "mask_features.weight": "pixel_decoder.mask_features.weight",
        PR + "transformer_self_attention_layers.1.self_attn.in_proj_weight":
            "decoder.self_layers.1.self_attn.in_proj_weight",
        PR + "transformer_cross_attention_layers.1.multihead_attn.in_proj_weight":
            "decoder.cross_layers.1.multihead_attn.in_proj_weight",
        PR + "transformer_cross_attention_layers.2.norm.weight": "decoder.cross_layers.2.norm.weight",
        PR + "transformer_ffn_layers.0.linear2.bias": "decoder.ffn_layers.0.linear2.bias",
        PR + "query_feat.weight": "decoder.query_feat.weight",
        PR + "query_embed.weight": "decoder.query_embed.weight",
        PR + "level_embed.weight": "decoder.level_embed.weight",
        PR + "decoder_norm.weight": "decoder.decoder_norm.weight",
        PR + "mask_embed.layers.2.weight": "decoder.mask_embed.layers.2.weight",
        PR + "class_embed.weight": "class_embed.weight",
        "ml_head.fc.W": "ml_head.fc.W",
        "ml_head.block.attn.qkv.weight": "ml_head.block.attn.qkv.weight",
        "ml_norm.bias": "ml_norm.bias",
    },
    "mask2former-swint-baseline": {
        "backbone.patch_embed.proj.weight": "backbone.body.patch_embed.proj.weight",
        "backbone.layers.2.blocks.5.attn.relative_position_bias_table":
            "backbone.body.layers.2.blocks.5.attn.relative_position_bias_table",
        "backbone.layers.0.downsample.reduction.weight": "backbone.body.layers.1.downsample.reduction.weight",
        "backbone.layers.2.downsample.norm.bias": "backbone.body.layers.3.downsample.norm.bias",
        "backbone.norm0.weight": "backbone.out_norms.0.weight",
        "backbone.norm3.bias": "backbone.out_norms.3.bias",
        PR + "class_embed.bias": "class_embed.bias",
    },
    "maskformer-r50-fpn-rankseg": {
        PD + "layer_4.weight": "pixel_decoder.top.0.weight",
        PD + "layer_4.norm.weight": "pixel_decoder.top.1.weight",
        PD + "adapter_1.weight": "pixel_decoder.laterals.0.0.weight",  # res2
        PD + "adapter_3.norm.bias": "pixel_decoder.laterals.2.1.bias",  # res4
        PD + "layer_1.weight": "pixel_decoder.outputs.0.0.weight",
        PD + "layer_3.norm.weight": "pixel_decoder.outputs.2.1.weight",
        PD + "mask_features.weight": "pixel_decoder.mask_features.weight",
        PR + "transformer.decoder.layers.0.self_attn.in_proj_weight":
            "decoder.layers.0.self_attn.self_attn.in_proj_weight",
        PR + "transformer.decoder.layers.0.multihead_attn.in_proj_weight":
            "decoder.layers.0.cross_attn.multihead_attn.in_proj_weight",
        PR + "transformer.decoder.layers.1.norm1.weight": "decoder.layers.1.self_attn.norm.weight",
        PR + "transformer.decoder.layers.1.norm2.weight": "decoder.layers.1.cross_attn.norm.weight",
        PR + "transformer.decoder.layers.2.norm3.bias": "decoder.layers.2.ffn.norm.bias",
        PR + "transformer.decoder.layers.2.linear1.weight": "decoder.layers.2.ffn.linear1.weight",
        PR + "transformer.decoder.norm.weight": "decoder.decoder_norm.weight",
        PR + "query_embed.weight": "decoder.query_embed.weight",
        PR + "input_proj.weight": "decoder.input_proj.weight",
        PR + "mask_embed.layers.0.bias": "decoder.mask_embed.layers.0.bias",
        "ml_head.cls_emb": "ml_head.cls_emb",
    },
    "maskformer-r50-transformer-fpn-baseline": {
        PD + "input_proj.weight": "pixel_decoder.input_proj.weight",
        PD + "transformer.encoder.layers.0.self_attn.in_proj_weight":
            "pixel_decoder.encoder.0.self_attn.self_attn.in_proj_weight",
        PD + "transformer.encoder.layers.0.norm1.weight": "pixel_decoder.encoder.0.self_attn.norm.weight",
        PD + "transformer.encoder.layers.0.norm2.weight": "pixel_decoder.encoder.0.ffn.norm.weight",
        PD + "transformer.encoder.layers.0.linear2.weight": "pixel_decoder.encoder.0.ffn.linear2.weight",
        PD + "layer_4.weight": "pixel_decoder.top.0.weight",
    },
}

# Shapes the official constructors give (conv_dim = hidden = 32, res2 has 256 channels, res5 2048).
SHAPES = {
    "mask2former-r50-rankseg": {PD + "adapter_1.weight": (32, 256, 1, 1), PD + "layer_1.weight": (32, 32, 3, 3),
                                PD + "input_proj.0.0.weight": (32, 2048, 1, 1), PD + "mask_features.weight":
                                (32, 32, 1, 1), "ml_norm.weight": (KAPPA + 1,), PR + "class_embed.weight": (K + 1, 32)},
    "maskformer-r50-fpn-rankseg": {PD + "layer_4.weight": (32, 2048, 3, 3), PD + "adapter_1.weight": (32, 256, 1, 1),
                                   PD + "mask_features.weight": (32, 32, 3, 3), PR + "input_proj.weight":
                                   (32, 2048, 1, 1)},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_names_of_a_tiny_config(source_models: dict[str, nn.Module], name: str) -> None:
    model = source_models[name]
    names = detectron2_names(model)
    ours = {n for n in names if not n.endswith("num_batches_tracked")}  # BatchNorm2d (freeze_bn off) only
    assert {names[n] for n in ours} == official_names(name)
    rules = model_rules(model)
    sd = model.state_dict()
    for official, own in ROLES[name].items():
        assert rename(official, rules) == own, official
        assert names[own] == official
    for official, shape in SHAPES.get(name, {}).items():
        assert tuple(sd[rename(official, rules) or ""].shape) == shape, official


# ---------------------------------------------------------------------------------------
# Whole official models


def _official_state(model: nn.Module, extras: bool = True) -> dict[str, np.ndarray]:
    """The model's weights under the official names, as numpy arrays (a model zoo .pkl), plus
    what official files hold and no model of ours has."""
    names = detectron2_names(model)
    out = {names[k]: v.numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    if extras:
        out["criterion.empty_weight"] = np.ones(K + 1, np.float32)  # the loss's class weights
        for name in official_swin_t():
            if name.endswith("relative_position_index") and "backbone.patch_embed.proj.weight" in out:
                out[f"backbone.{name}"] = np.zeros((49, 49), np.int64)
    return out


def _write_pkl(path: Path, model: dict, **extra) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Mask2Former", **extra}, f)
    return path


def _outputs_equal(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        oa, ob = a(x), b(x)
    assert torch.equal(oa.pred_logits, ob.pred_logits) and torch.equal(oa.pred_masks, ob.pred_masks)
    if oa.ml_logits is not None:
        assert torch.equal(oa.ml_logits, ob.ml_logits) and torch.equal(oa.topk_index, ob.topk_index)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_whole_official_model_loads_with_equal_outputs(source_models: dict[str, nn.Module], name: str,
                                                       tmp_path: Path) -> None:
    src = source_models[name]
    path = _write_pkl(tmp_path / "model_final.pkl", _official_state(src))
    fresh = _build(CONFIGS[name], seed=5)
    assert not torch.equal(fresh.class_embed.weight, src.class_embed.weight)
    missing, unexpected = load_detectron2_mask2former(fresh, path)
    assert missing == [] and unexpected == []
    _outputs_equal(src, fresh)


def test_the_video_model_loads_the_same_file(source_models: dict[str, nn.Module], tmp_path: Path) -> None:
    """Mask2Former-VIS keeps the image model's parameter names (so does our clip model)."""
    src = source_models["mask2former-r50-rankseg"]
    path = _write_pkl(tmp_path / "model_final.pkl", _official_state(src))
    video = _build(dataclasses.replace(CONFIGS["mask2former-r50-rankseg"], clip_len=2), seed=5)
    assert type(video).__name__ == "VideoMask2FormerModel"
    assert load_detectron2_mask2former(video, path) == ([], [])
    for k, v in src.state_dict().items():
        assert torch.equal(video.state_dict()[k], v), k


def test_older_official_layouts_and_unknown_names(source_models: dict[str, nn.Module], tmp_path: Path) -> None:
    """MaskFormerHead v1 kept the pixel decoder directly under sem_seg_head, the masked decoder
    v1 named query_feat `static_query` (both converted by the official _load_from_state_dict);
    a name no rule knows is reported in the file's spelling."""
    src = source_models["mask2former-r50-rankseg"]
    state = {(k.replace(PD, "sem_seg_head.", 1).replace(PR + "query_feat.", PR + "static_query.")): v
             for k, v in _official_state(src).items()}
    state[PR + "extra_thing.weight"] = np.zeros(3, np.float32)
    fresh = _build(CONFIGS["mask2former-r50-rankseg"], seed=5)
    missing, unexpected = load_detectron2_mask2former(fresh, _write_pkl(tmp_path / "v1.pkl", state))
    assert missing == [] and unexpected == [PR + "extra_thing.weight"]
    _outputs_equal(src, fresh)


def test_a_partial_file_reports_missing_names(source_models: dict[str, nn.Module], tmp_path: Path) -> None:
    """A baseline checkpoint into a RankSeg model: the ml head is missing, the linear head's
    bias (cosine logits have none) unexpected."""
    base = _official_state(source_models["mask2former-r50-rankseg"])
    base = {k: v for k, v in base.items() if not k.startswith(("ml_head.", "ml_norm."))}
    base[PR + "class_embed.bias"] = np.zeros(K + 1, np.float32)
    fresh = _build(CONFIGS["mask2former-r50-rankseg"], seed=5)
    missing, unexpected = load_detectron2_mask2former(fresh, _write_pkl(tmp_path / "base.pkl", base))
    assert set(missing) == {k for k in fresh.state_dict() if k.startswith(("ml_head.", "ml_norm."))}
    assert unexpected == [PR + "class_embed.bias"]


@pytest.mark.parametrize(("key", "shape", "fragments"), [
    (PR + "class_embed.weight", (151, 32), ("sem_seg_head.predictor.class_embed.weight", "[151, 32]",
                                             "model.num_classes")),
    (PR + "query_feat.weight", (100, 32), ("sem_seg_head.predictor.query_feat.weight", "num_queries")),
    ("ml_norm.weight", (51,), ("ml_norm.weight", "model.kappa")),
])
def test_shape_mismatch_is_one_line_naming_the_first_tensor(source_models: dict[str, nn.Module], tmp_path: Path,
                                                             key: str, shape: tuple[int, ...],
                                                             fragments: tuple[str, ...]) -> None:
    state = _official_state(source_models["mask2former-r50-rankseg"])
    state[key] = np.zeros(shape, np.float32)
    path = _write_pkl(tmp_path / "other.pkl", state)
    with pytest.raises(UserError) as err:
        load_detectron2_mask2former(copy.deepcopy(source_models["mask2former-r50-rankseg"]), path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for f in fragments:
        assert f in msg, msg


def test_another_architectures_checkpoint_is_refused(source_models: dict[str, nn.Module], tmp_path: Path) -> None:
    m2f = _write_pkl(tmp_path / "m2f.pkl", _official_state(source_models["mask2former-r50-rankseg"]))
    mf = _write_pkl(tmp_path / "mf.pkl", _official_state(source_models["maskformer-r50-fpn-rankseg"]))
    with pytest.raises(UserError, match="Mask2Former checkpoint .* mask2former-"):
        load_detectron2_mask2former(copy.deepcopy(source_models["maskformer-r50-fpn-rankseg"]), m2f)
    with pytest.raises(UserError, match="MaskFormer checkpoint .* maskformer-"):
        load_detectron2_mask2former(copy.deepcopy(source_models["mask2former-r50-rankseg"]), mf)
    with pytest.raises(UserError, match="resnet backbone; this model's is a swin"):
        load_detectron2_mask2former(copy.deepcopy(source_models["mask2former-swint-baseline"]), m2f)
    backbone_only = _write_pkl(tmp_path / "r50.pkl", {k.removeprefix("backbone."): v for k, v in
                                                        _official_state(source_models["mask2former-r50-rankseg"]).items()
                                                        if k.startswith("backbone.")})
    with pytest.raises(UserError, match="not a whole Mask2Former.*--backbone-weights"):
        load_detectron2_mask2former(copy.deepcopy(source_models["mask2former-r50-rankseg"]), backbone_only)


def test_warm_start_reads_official_files_through_the_family_reader(source_models: dict[str, nn.Module],
                                                                   tmp_path: Path) -> None:
    """--init-from: the engine asks the reader it is given; mismatched tensors (another K) are
    skipped and reported as for any source, not refused."""
    src = source_models["mask2former-r50-rankseg"]
    state = _official_state(src)
    path = _write_pkl(tmp_path / "model_final.pkl", state)
    fresh = _build(CONFIGS["mask2former-r50-rankseg"], seed=5)
    rep = warm_start(fresh, path, foreign=detectron2_warm_start)
    assert rep.missing == [] and rep.mismatched == [] and len(rep.loaded) == len(fresh.state_dict())
    _outputs_equal(src, fresh)
    state[PR + "class_embed.weight"] = np.zeros((151, 32), np.float32)
    state[PR + "unknown.weight"] = np.zeros(2, np.float32)
    rep = warm_start(_build(CONFIGS["mask2former-r50-rankseg"], seed=5), _write_pkl(tmp_path / "k151.pkl", state),
                     foreign=detectron2_warm_start)
    assert rep.mismatched == [("class_embed.weight", (151, 32), (K + 1, 32))]
    assert rep.missing == [] and rep.unexpected == [PR + "unknown.weight"]
    with pytest.raises(UserError, match="unknown weights format '.pkl'"):
        warm_start(fresh, path)  # without the family's reader the engine knows no .pkl


# ---------------------------------------------------------------------------------------
# Backbones


def _random_stats(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if key.endswith(("running_mean", "bias")) and value.ndim == 1:
                value.copy_(torch.randn(value.shape, generator=g) * 0.1)
            elif key.endswith(("running_var", "weight")) and value.ndim == 1:
                value.copy_(torch.rand(value.shape, generator=g) + 0.5)


def _pyramid(arch: str, seed: int) -> PyramidBackbone:
    torch.manual_seed(seed)
    return PyramidBackbone(arch, Mask2FormerConfig()).eval()


def torchvision_to_d2(sd: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """detectron2's tools/convert-torchvision-to-d2.py on a torchvision ResNet state dict."""
    out = {}
    for k, v in sd.items():
        if "layer" not in k:
            k = "stem." + k
        for t in (1, 2, 3, 4):
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in (1, 2, 3):
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[k] = v.numpy().copy()
    return out


@pytest.fixture(scope="module")
def r50() -> PyramidBackbone:
    bb = _pyramid("resnet50", 0)
    _random_stats(bb, 1)
    return bb


def _features_close(a: nn.Module, b: nn.Module, x: Tensor, tol: float = 0.0) -> None:
    with torch.no_grad():
        fa, fb = a(x), b(x)
    for u, v in zip(fa, fb):
        assert torch.allclose(u, v, rtol=tol, atol=tol * float(u.abs().max())), float((u - v).abs().max())


@pytest.mark.parametrize("layout", ["torchvision R-50.pkl", "trained model_final.pth"])
def test_resnet_in_detectron2_layouts(r50: PyramidBackbone, layout: str, tmp_path: Path) -> None:
    """The ImageNet R-50.pkl the official R50 configs start from (torchvision weights through
    detectron2's converter, classifier kept as stem.fc), and a detectron2 run's torch file of a
    whole model (`backbone.res2...`, FrozenBN buffers, an iteration counter beside)."""
    tv = dict(r50.body.state_dict())
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    d2 = torchvision_to_d2(tv)
    assert "stem.conv1.norm.running_var" in d2 and "res2.0.shortcut.norm.weight" in d2 and "stem.fc.weight" in d2
    if layout.endswith(".pkl"):
        path = tmp_path / "R-50.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": d2, "__author__": "torchvision", "matching_heuristics": True}, f)
    else:
        path = tmp_path / "model_final.pth"
        torch.save({"model": {f"backbone.{k}": torch.from_numpy(v) for k, v in d2.items() if "fc" not in k},
                    "iteration": 9}, path)
    fresh = _pyramid("resnet50", 7)
    missing, unexpected = load_pyramid_weights(fresh, path)
    assert missing == [] and unexpected == []
    _features_close(r50, fresh, torch.randn(1, 3, 64, 64))
    if layout.endswith(".pkl"):  # model.backbone_weights (--backbone-weights) reaches it too
        built = MASK2FORMER.build(dataclasses.replace(_m2f_cfg("mask2former-r50", "segmenter"),
                                                      backbone_weights=str(path)))
        assert torch.equal(built.backbone.body.layer3[4].bn2.running_var, r50.body.layer3[4].bn2.running_var)


def test_msra_caffe2_resnet(r50: PyramidBackbone, tmp_path: Path) -> None:
    """MSRA's R-50.pkl: Caffe2 blob names, BN as a folded scale / bias, an input in BGR on
    0..255 minus the mean with std 1 (detectron2's defaults for it). Built here from a
    reference network so that, on that input, it computes what the reference computes on
    ours; loaded, our backbone must equal the reference (the stride of MSRA's blocks in the
    1x1 conv is not reproduced: warned)."""
    ref = r50.body
    std = torch.tensor([0.229, 0.224, 0.225]) * 255.0
    blobs: dict[str, np.ndarray] = {}

    def fold(bn: nn.Module, prefix: str) -> None:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        blobs[f"{prefix}_bn_s"] = scale.numpy().copy()
        blobs[f"{prefix}_bn_b"] = (bn.bias - bn.running_mean * scale).numpy().copy()

    with torch.no_grad():
        # our conv1 sees (x - mean) / std in RGB; MSRA's sees x - mean in BGR
        blobs["conv1_w"] = (ref.conv1.weight / std.view(1, 3, 1, 1)).flip(1).numpy().copy()
        fold(ref.bn1, "res_conv1")
        for s, layer in enumerate((ref.layer1, ref.layer2, ref.layer3, ref.layer4), start=2):
            for b, block in enumerate(layer):
                for branch, conv, bn in (("branch2a", block.conv1, block.bn1), ("branch2b", block.conv2, block.bn2),
                                         ("branch2c", block.conv3, block.bn3)):
                    blobs[f"res{s}_{b}_{branch}_w"] = conv.weight.numpy().copy()
                    fold(bn, f"res{s}_{b}_{branch}")
                if block.downsample is not None:
                    blobs[f"res{s}_{b}_branch1_w"] = block.downsample[0].weight.numpy().copy()
                    fold(block.downsample[1], f"res{s}_{b}_branch1")
    blobs["fc1000_w"], blobs["fc1000_b"] = np.zeros((1000, 2048), np.float32), np.zeros(1000, np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros(1, np.float32)  # solver state: dropped, as detectron2 does
    assert caffe2_names(["res_conv1_bn_s", "conv1_w", "res3_0_branch1_bn_b", "res4_2_branch2c_w", "fc1000_w"]) == {
        "res_conv1_bn_s": "stem.conv1.norm.weight", "conv1_w": "stem.conv1.weight",
        "res3_0_branch1_bn_b": "res3.0.shortcut.norm.bias", "res4_2_branch2c_w": "res4.2.conv3.weight",
        "fc1000_w": "fc1000.weight"}
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(blobs, f, protocol=2)  # Detectron1-era files: no "model", no "__author__"
    fresh = _pyramid("resnet50", 7)
    with pytest.warns(UserWarning, match="STRIDE_IN_1X1"):
        missing, unexpected = load_pyramid_weights(fresh, path)
    assert missing == [] and unexpected == []
    _features_close(r50, fresh, torch.randn(1, 3, 64, 64), tol=1e-4)
    # Each BN is exactly the stored affine (detectron2's FrozenBatchNorm2d keeps var = 1 - eps).
    x = torch.randn(1, 256, 4, 4)
    s, b = (torch.from_numpy(blobs[f"res2_0_branch2c_bn_{p}"]).view(1, -1, 1, 1) for p in "sb")
    with torch.no_grad():
        assert torch.allclose(fresh.body.layer1[0].bn3(x), x * s + b, rtol=1e-6, atol=1e-7)
    # The stem alone, against the convention MSRA's weights expect: BGR, 0..255 minus the mean.
    img = torch.rand(1, 3, 32, 32) * 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255.0
    ours = F.conv2d((img - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), fresh.body.conv1.weight, stride=2, padding=3)
    theirs = F.conv2d((img - mean.view(1, 3, 1, 1)).flip(1), torch.from_numpy(blobs["conv1_w"]), stride=2, padding=3)
    assert torch.allclose(ours, theirs, atol=1e-3)


def original_swin_names(body_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm Swin names -> the original release's: patch merging at the end of stage i."""
    out = {}
    for k, v in body_sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    return out


@pytest.fixture(scope="module")
def swin_t() -> PyramidBackbone:
    bb = _pyramid("swin_tiny_patch4_window7_224", 0)
    _random_stats(bb.out_norms, 2)
    return bb


def test_d2_swin_of_a_whole_model(swin_t: PyramidBackbone, tmp_path: Path) -> None:
    """D2SwinTransformer in a Mask2Former model: `backbone.` + the original names, the
    relative_position_index buffers and one LayerNorm per output (norm0..3)."""
    sd = original_swin_names(dict(swin_t.body.state_dict()))
    sd |= {f"norm{i}.{p}": getattr(n, p).detach() for i, n in enumerate(swin_t.out_norms) for p in WB}
    sd |= {n: torch.zeros(49, 49, dtype=torch.long) for n in official_swin_t() if n.endswith("_index")}
    assert set(sd) == official_swin_t()
    path = _write_pkl(tmp_path / "m2f_swin.pkl", {f"backbone.{k}": v.numpy().copy() for k, v in sd.items()}
                      | {PR + "query_feat.weight": np.zeros((100, 256), np.float32)})
    fresh = _pyramid("swin_tiny_patch4_window7_224", 7)
    missing, unexpected = load_pyramid_weights(fresh, path)
    assert missing == [] and unexpected == []
    _features_close(swin_t, fresh, torch.randn(1, 3, 64, 96))


def test_swin_from_mask2formers_conversion_tool(swin_t: PyramidBackbone, tmp_path: Path) -> None:
    """tools/convert-pretrained-swin-model-to-d2.py: the original ImageNet release's state
    dict, torch tensors pickled as they are, under "model" (author "third_party"). Its final
    norm and classifier are not the pyramid's; the output norms are not in it."""
    sd = OrderedDict(original_swin_names(dict(swin_t.body.state_dict())))
    sd["norm.weight"], sd["norm.bias"] = torch.ones(768), torch.zeros(768)
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, 768), torch.zeros(1000)
    path = tmp_path / "swin_tiny_patch4_window7_224.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": sd, "__author__": "third_party", "matching_heuristics": True}, f)
    fresh = _pyramid("swin_tiny_patch4_window7_224", 7)
    with pytest.warns(UserWarning, match="missing keys"):
        missing, unexpected = load_pyramid_weights(fresh, path)
    assert sorted(missing) == sorted(f"out_norms.{i}.{p}" for i in range(4) for p in WB) and unexpected == []
    for k, v in swin_t.body.state_dict().items():
        assert torch.equal(fresh.body.state_dict()[k], v), k


# ---------------------------------------------------------------------------------------
# The reader


ARRAYS = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.index": np.arange(4, dtype=np.int64),
          "c.scale": np.float32(2.5), "d.half": np.ones(3, np.float16)}


def _check_arrays(tensors: dict[str, Tensor]) -> None:
    assert set(tensors) == set(ARRAYS)
    for k, v in ARRAYS.items():
        assert np.array_equal(tensors[k].numpy(), np.asarray(v)) and tensors[k].numpy().dtype == np.asarray(v).dtype


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reader_reads_numpy_pickles(protocol: int, tmp_path: Path) -> None:
    data = pickle.dumps({"model": ARRAYS, "__author__": "x"}, protocol=protocol)
    if protocol == 2:  # numpy 1 (and Python 2) spell numpy's private module numpy.core: accepted too
        data = data.replace(b"numpy._core", b"numpy.core")
        assert b"numpy.core.multiarray" in data
    path = tmp_path / "w.pkl"
    path.write_bytes(data)
    ckpt = read_detectron2(path)
    assert ckpt.author == "x" and not ckpt.caffe2
    _check_arrays(ckpt.tensors)


def test_reader_reads_pickled_torch_tensors_and_caffe2_blobs(tmp_path: Path) -> None:
    path = tmp_path / "t.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": OrderedDict((k, torch.from_numpy(np.asarray(v))) for k, v in ARRAYS.items()),
                     "__author__": "third_party"}, f)
    _check_arrays(read_detectron2(path).tensors)
    with open(path, "wb") as f:
        pickle.dump({"blobs": ARRAYS | {"a_momentum": np.zeros(1)}, "other": 1}, f)  # a Detectron1 detector
    ckpt = read_detectron2(path)
    assert ckpt.caffe2
    _check_arrays(ckpt.tensors)


class _Payload:
    """A pickle that, loaded by pickle.load, would run a shell command."""

    def __init__(self, fn: object, marker: Path) -> None:
        self.fn, self.marker = fn, marker

    def __reduce__(self) -> tuple:
        if self.fn is os.system:
            return (os.system, (f"touch {self.marker}",))
        return (self.fn, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("fn", [os.system, exec], ids=["os.system", "builtins.exec"])
def test_reader_refuses_code_before_running_it(fn: object, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.zeros(2)}, "x": _Payload(fn, marker)}))
    with pytest.raises(UserError) as err:
        read_detectron2(path, "--init-from")
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "--init-from" in msg
    assert ("system" if fn is os.system else "exec") in msg
    assert not marker.exists()


def test_reader_refuses_oversized_corrupt_and_foreign_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.pkl"
    path.write_bytes(pickle.dumps({"model": ARRAYS, "__author__": "x"}))
    with pytest.raises(UserError, match="not found"):
        read_detectron2(tmp_path / "missing.pkl")
    monkeypatch.setattr(d2w, "MAX_CHECKPOINT_BYTES", 64)
    with pytest.raises(UserError, match="over rankseg's limit"):
        read_detectron2(path)
    monkeypatch.undo()
    path.write_bytes(pickle.dumps({"model": ARRAYS, "__author__": "x"})[:40])
    with pytest.raises(UserError, match="corrupt"):
        read_detectron2(path)
    path.write_bytes(pickle.dumps({"model": {"w": "text"}, "__author__": "x"}))
    with pytest.raises(UserError, match="not an array of numbers"):
        read_detectron2(path)
    pth = tmp_path / "run.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": Path("configs/x.yaml")}, pth)  # an object, not weights
    with pytest.raises(UserError, match="holds more than weights"):
        read_detectron2(pth)
    torch.save({"model": {"module.w": torch.ones(2)}, "iteration": 3}, pth)
    assert list(read_detectron2(pth).tensors) == ["w"]


def test_train_init_from_an_official_pkl_through_the_cli(tmp_path: Path) -> None:
    """`rankseg train --init-from model_final.pkl`: the Mask2Former family hands its reader to
    the engine (Family.foreign_weights), every tensor of the run's model is loaded from the
    official names, and the first training loss equals that of a run started from the same
    weights in our own layout (.safetensors)."""
    from conftest import TINY_MASK2FORMER_RUN, make_synthetic, train_rows
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from rankseg_cli.app import app
    from rankseg_core.engine.configure import build_train_config

    data = make_synthetic(tmp_path / "data", images=6, val_images=2, num_classes=40, size=64)
    sets = TINY_MASK2FORMER_RUN + ["schedule.iters=1", "data.val_split="]
    torch.manual_seed(7)
    src = MASK2FORMER.build(build_train_config(None, sets, data).model)
    pkl = _write_pkl(tmp_path / "model_final.pkl", _official_state(src, extras=False))
    ours = tmp_path / "ours.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(ours))
    losses = []
    for name, init in (("a", pkl), ("b", ours)):
        res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / name), "--init-from",
                                       str(init), *[f"--set={s}" for s in sets]])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        n = len(src.state_dict())
        counters = sum(k.endswith("num_batches_tracked") for k in src.state_dict())  # no official file has them
        loaded = n - (counters if name == "a" else 0)
        assert f"loaded {loaded} of the model's {n} tensors" in text
        assert f"missing (kept as initialised) {n - loaded}" in text and "shape mismatch (skipped) 0" in text
        losses.append(train_rows(tmp_path / name)[0]["loss"])
    assert losses[0] == losses[1]
