"""ViT-Adapter as a Mask2Former backbone (model/mask2former/vit_adapter.py, the
mask2former-vitadapter family): each piece against a computation written here from the official
code (czczup/ViT-Adapter adapter_modules.py / beit_adapter.py), the paper's parameter counts,
the official checkpoint layout, the layer-decay groups, and a tiny run through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_MASK2FORMER_RUN, assert_one_line_error, make_synthetic, train_until_checkpoint
from timm.layers.pos_embed_rel import (
    gen_relative_position_index,
    resize_rel_pos_bias_table,
    resize_rel_pos_bias_table_simple,
)
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core import families
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config, dataset_defaults
from rankseg_core.engine.model_stats import count_parameters
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import MASK2FORMER_VITADAPTER, ml_branch_names
from rankseg_core.model.mask2former.vit_adapter import (
    AdapterGrid,
    Extractor,
    Injector,
    SpatialPriorModule,
    ViTAdapter,
    block_with_bias,
    load_vit_adapter_weights,
    resized_bias,
)

TINY = {"timm_name": "beit_base_patch16_224", "embed_dim": 32, "depth": 4, "num_heads": 2, "conv_inplane": 16,
        "deform_num_heads": 2}


def tiny_adapter(seed: int = 0, img_size: int = 64, **kw) -> ViTAdapter:
    torch.manual_seed(seed)
    return ViTAdapter(img_size=img_size, **{**TINY, **kw})


# ---------------------------------------------------------------------------------------
# The pieces


def test_spm_levels_have_strides_4_to_32_and_the_vit_width() -> None:
    spm = SpatialPriorModule(inplanes=8, dim=24).eval()
    c1, c2, c3, c4 = spm(torch.randn(2, 3, 64, 96))
    assert c1.shape == (2, 24, 16, 24)  # a map at stride 4
    assert [c.shape for c in (c2, c3, c4)] == [(2, 8 * 12, 24), (2, 4 * 6, 24), (2, 2 * 3, 24)]  # tokens, s = 8, 16, 32
    # Official widths: stem and conv2..4 at inplanes, 2x, 4x, 4x; every level projected to D by a biased 1x1 conv.
    assert [spm.fc1.in_channels, spm.fc2.in_channels, spm.fc3.in_channels, spm.fc4.in_channels] == [8, 16, 32, 32]
    grid = AdapterGrid.of(64, 96, torch.device("cpu"))
    assert grid.vit == (4, 6) and grid.levels == [(8, 12), (4, 6), (2, 3)]
    with pytest.raises(ValueError, match="multiple of 32"):
        AdapterGrid.of(48, 64, torch.device("cpu"))


def bilinear_at(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """C x H x W sampled at pixel coordinates (y, x) (pixel centres at integers), zeros outside:
    the hand-written bilinear of a deformable attention sample."""
    c, h, w = img.shape
    y0, x0 = int(torch.floor(torch.tensor(y))), int(torch.floor(torch.tensor(x)))
    out = torch.zeros(c)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def _point_at_reference(attn: torch.nn.Module) -> None:
    """Zero offsets and attention logits: every query reads its reference point, levels equally."""
    with torch.no_grad():
        for lin in (attn.sampling_offsets, attn.attention_weights):
            lin.weight.zero_()
            lin.bias.zero_()


def test_injector_reads_c_at_each_patch_centre() -> None:
    """n_points 1, no offsets: ViT token (i, j) reads each SPM level at its own patch centre,
    the three levels averaged (uniform attention), through value / output projections."""
    torch.manual_seed(0)
    d, b = 8, 2
    inj = Injector(d, heads=2, points=1, ratio=0.5, init_values=0.3).eval()
    _point_at_reference(inj.attn)
    grid = AdapterGrid.of(64, 64, torch.device("cpu"))  # ViT 4x4, levels 8x8, 4x4, 2x2
    x = torch.randn(b, 16, d)
    c = torch.randn(b, 64 + 16 + 4, d)
    out = inj(x, grid, c)

    v = inj.attn.value_proj(inj.feat_norm(c))  # b x S x (d / 2)
    maps = [v[:, :64].transpose(1, 2).reshape(b, -1, 8, 8), v[:, 64:80].transpose(1, 2).reshape(b, -1, 4, 4),
            v[:, 80:].transpose(1, 2).reshape(b, -1, 2, 2)]
    for n in range(b):
        for i in range(4):
            for j in range(4):
                # Patch centre ((j + .5) / 4, (i + .5) / 4) in pixels of a level of size s: p * s - .5
                reads = [bilinear_at(maps[lv][n], (i + .5) / 4 * s - .5, (j + .5) / 4 * s - .5)
                         for lv, s in enumerate((8, 4, 2))]
                # 8x8: the mean of a 2x2 block; 4x4: the pixel itself; 2x2: a 3/4 : 1/4 mix with zeros.
                assert torch.allclose(reads[0], maps[0][n, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean((1, 2)))
                assert torch.allclose(reads[1], maps[1][n, :, i, j])
                expect = x[n, i * 4 + j] + 0.3 * inj.attn.output_proj(sum(reads) / 3)
                assert torch.allclose(out[n, i * 4 + j], expect, atol=1e-5)


def dwconv_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """C x H x W depth-wise 3x3 conv, zero padding, as an explicit sum of shifted maps."""
    c, h, w = x.shape
    pad = F.pad(x, (1, 1, 1, 1))
    out = bias[:, None, None].expand(c, h, w).clone()
    for dy in range(3):
        for dx in range(3):
            out += weight[:, 0, dy, dx][:, None, None] * pad[:, dy:dy + h, dx:dx + w]
    return out


def test_extractor_reads_the_vit_tokens_then_a_conv_ffn_per_level() -> None:
    torch.manual_seed(1)
    d, b = 8, 1
    ext = Extractor(d, heads=2, points=1, ratio=0.5, cffn_ratio=0.5, drop_path=0.0).eval()
    _point_at_reference(ext.attn)
    grid = AdapterGrid.of(64, 64, torch.device("cpu"))
    c = torch.randn(b, 84, d)
    x = torch.randn(b, 16, d)
    out = ext(c, grid, x)

    vmap = ext.attn.value_proj(ext.feat_norm(x))[0].t().reshape(-1, 4, 4)  # the ViT grid
    q = []
    for lv, s in enumerate((8, 4, 2)):
        for i in range(s):
            for j in range(s):
                # A level-s token's centre on the 4x4 ViT grid; one level, one point: weight 1.
                q.append(bilinear_at(vmap, (i + .5) / s * 4 - .5, (j + .5) / s * 4 - .5))
    q1 = c[0] + ext.attn.output_proj(torch.stack(q))
    ffn = ext.ffn
    hid = ffn.fc1(ext.ffn_norm(q1))
    parts, start = [], 0
    for s in (8, 4, 2):  # the same 3x3 depth-wise conv on each level's map
        m = hid[start:start + s * s].t().reshape(-1, s, s)
        parts.append(dwconv_by_hand(m, ffn.dwconv.dwconv.weight, ffn.dwconv.dwconv.bias).reshape(-1, s * s).t())
        start += s * s
    expect = q1 + ffn.fc2(F.gelu(torch.cat(parts)))
    assert torch.allclose(out[0], expect, atol=1e-5)


def test_block_with_bias_is_timms_block_and_resizes_its_table() -> None:
    body = tiny_adapter(img_size=64).body  # 4 x 4 grid
    blk = body.blocks[1].eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()  # zeros at init would test nothing
        blk.gamma_1.fill_(0.7)
        blk.gamma_2.fill_(0.4)
    x = torch.randn(2, 17, 32)
    index = gen_relative_position_index((4, 4), class_token=True)
    bias = resized_bias(blk, (4, 4), index)
    assert torch.equal(bias, blk.attn._get_rel_pos_bias()[0])  # the built grid: the table as it is
    assert torch.allclose(block_with_bias(blk, x, bias), blk(x), atol=1e-5)
    # Another grid: the (2*4-1)^2 table resized to (2*3-1) x (2*5-1); the three cls entries kept.
    index35 = gen_relative_position_index((3, 5), class_token=True)
    b35 = resized_bias(blk, (3, 5), index35)
    table = blk.attn.relative_position_bias_table
    assert b35.shape == (2, 16, 16)
    assert torch.equal(b35[:, 0, 1:], table[-3][:, None].expand(2, 15))  # cls -> token
    assert torch.equal(b35[:, 1:, 0], table[-2][:, None].expand(2, 15))  # token -> cls
    # Offset (0, 0), the centre of the 7x7 table (row 3, col 3), is the centre of the 5x9 one, which
    # bicubic resizing (align_corners=False) maps exactly onto it: every token's bias to itself.
    assert torch.allclose(torch.diagonal(b35[:, 1:, 1:], dim1=1, dim2=2), table[3 * 7 + 3][:, None].expand(2, 15),
                          atol=1e-5)


def test_other_grids_run_timms_blocks_with_resized_tables() -> None:
    """At a grid the tables were not built for, the backbone equals one built for that grid
    (timm's own blocks) whose tables are the resized ones."""
    model = tiny_adapter(img_size=64).eval()  # tables for 4 x 4
    with torch.no_grad():
        for blk in model.body.blocks:
            blk.attn.relative_position_bias_table.normal_()
    other = tiny_adapter(seed=3, img_size=96).eval()  # built for 6 x 6
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("relative_position_bias_table")}
    other.load_state_dict(sd, strict=False)
    with torch.no_grad():
        for mine, theirs in zip(model.body.blocks, other.body.blocks):
            src = mine.attn.relative_position_bias_table
            theirs.attn.relative_position_bias_table.copy_(
                resize_rel_pos_bias_table_simple(src, (6, 6), tuple(theirs.attn.relative_position_bias_table.shape)))
    x = torch.randn(1, 3, 96, 96)
    for a, b in zip(model(x), other(x)):
        assert torch.allclose(a, b, atol=1e-4)


def test_backbone_outputs_compose_the_groups_as_the_official_code() -> None:
    """64 px: maps at strides 4..32 with D channels. With the injectors' gamma at 0 the ViT
    path is exactly timm's BEiT (blocks 0, 1, 2, 3 = one group each), and each output level
    is BN(c_level + the group's tokens resized), c1 adding the 2x up-sampled c2."""
    model = tiny_adapter().eval()
    assert model.channels == [32] * 4 and model.interaction_indexes == [[0, 0], [1, 1], [2, 2], [3, 3]]
    with torch.no_grad():
        for inter in model.interactions:
            inter.injector.gamma.zero_()
        for norm in (model.norm1, model.norm2, model.norm3, model.norm4):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 2.0)
    seen: list = []
    hooks = [i.register_forward_hook(lambda mod, inp, out: seen.append(out)) for i in model.interactions]
    spm_out: list = []
    hooks.append(model.spm.register_forward_hook(lambda mod, inp, out: spm_out.append(out)))
    x = torch.randn(2, 3, 64, 64)
    f1, f2, f3, f4 = model(x)
    for h in hooks:
        h.remove()
    assert [f.shape for f in (f1, f2, f3, f4)] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]

    ref = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=0, img_size=64, embed_dim=32,
                            depth=4, num_heads=2).eval()
    ref.load_state_dict(model.body.state_dict(), strict=False)
    taps = ref.forward_intermediates(x, indices=[0, 1, 2, 3], norm=False, intermediates_only=True)  # B x D x 4 x 4
    for (tokens, _, _), tap in zip(seen, taps):
        assert torch.allclose(tokens.transpose(1, 2).reshape(2, 32, 4, 4), tap, atol=1e-5)

    c = seen[-1][1]
    c2, c3, c4 = (c[:, :64], c[:, 64:80], c[:, 80:])
    def bn(norm, v):
        return (v - norm.running_mean[:, None, None]) / (norm.running_var[:, None, None] + norm.eps).sqrt() \
            * norm.weight[:, None, None] + norm.bias[:, None, None]
    def as_map(t, s):
        return t.transpose(1, 2).reshape(2, 32, s, s)
    up = F.conv_transpose2d(as_map(c2, 8), model.up.weight, model.up.bias, stride=2)
    for n in range(2):
        # The stride-32 level adds the mean of each 2x2 block of the last group's tokens
        # (bilinear 0.5x with align_corners=False samples exactly between them).
        pooled = taps[3][n].reshape(32, 2, 2, 2, 2).mean((2, 4))
        assert torch.allclose(f4[n], bn(model.norm4, as_map(c4, 2)[n] + pooled), atol=1e-5)
        assert torch.allclose(f3[n], bn(model.norm3, as_map(c3, 4)[n] + taps[2][n]), atol=1e-5)
    up2 = F.interpolate(taps[1], scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(f2, bn(model.norm2, as_map(c2, 8) + up2), atol=1e-5)
    up4 = F.interpolate(taps[0], scale_factor=4, mode="bilinear", align_corners=False)
    assert torch.allclose(f1, bn(model.norm1, spm_out[0][0] + up + up4), atol=1e-5)


def test_bad_architectures_are_refused() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        tiny_adapter(interaction_indexes=[[0, 1], [3, 3], [2, 2], [3, 3]])
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny_adapter(img_size=48)
    with pytest.raises(ValueError, match="deform_ratio"):
        tiny_adapter(deform_ratio=0.1)


# ---------------------------------------------------------------------------------------
# Parameters: the official layer shapes and the paper's Table 7 (units of 10^6)


def lin(a: int, b: int, bias: bool = True) -> int:
    return a * b + (b if bias else 0)


def msda(d: int, heads: int, levels: int, points: int, value_dim: int) -> int:
    """ViT-Adapter's / mmcv's MSDeformAttn: offsets, attention weights, value and output projections."""
    n = heads * levels * points
    return lin(d, 2 * n) + lin(d, n) + lin(d, value_dim) + lin(value_dim, d)


def official_vit_adapter_l(img: int = 896) -> int:
    """BEiTAdapter of mask2former_beit_adapter_large_896_80k_ade20k_ss.py, layer by layer."""
    d, depth, heads, win, p = 1024, 24, 16, img // 16, 64
    block = (2 * d + lin(d, 3 * d, bias=False) + 2 * d + ((2 * win - 1) ** 2 + 3) * heads + lin(d, d) + 2 * d
             + lin(d, 4 * d) + lin(4 * d, d) + 2 * d)  # norm1, qkv, q/v bias, table, proj, norm2, mlp, gammas
    beit = lin(3 * 16 * 16, d) + d + depth * block  # patch embedding, cls token
    spm = (3 * p * 9 + 2 * p + 2 * (p * p * 9 + 2 * p) + p * 2 * p * 9 + 4 * p + 2 * p * 4 * p * 9 + 8 * p
           + 4 * p * 4 * p * 9 + 8 * p + lin(p, d) + lin(2 * p, d) + 2 * lin(4 * p, d))
    hid, vd = d // 4, d // 2  # cffn_ratio 0.25, deform_ratio 0.5
    injector = 4 * d + msda(d, heads, 3, 4, vd) + d
    extractor = 4 * d + msda(d, heads, 1, 4, vd) + lin(d, hid) + 9 * hid + hid + lin(hid, d) + 2 * d
    adapter = 3 * d + spm + 4 * (injector + extractor) + 2 * extractor + lin(d * 4, d) + 4 * 2 * d
    return beit + adapter


def official_mmdet_head(k: int, queries: int = 200, f: int = 1024, ffn: int = 4096, heads: int = 32) -> int:
    """mmdet's Mask2FormerHead of the same config (MSDeformAttnPixelDecoder + 9 decoder layers)."""
    enc = msda(f, heads, 3, 4, f) + lin(f, ffn) + lin(ffn, f) + 4 * f
    pixel = 3 * (lin(1024, f) + 2 * f) + 3 * f + 6 * enc + 1024 * f + 2 * f + 9 * f * f + 2 * f + lin(f, f)
    mha = 3 * f * f + 3 * f + lin(f, f)
    dec = 9 * (2 * mha + lin(f, ffn) + lin(ffn, f) + 6 * f) + 2 * f + 2 * queries * f + 3 * f
    return pixel + dec + lin(f, k + 1) + 3 * lin(f, f)


def ml_head(k: int, in_dim: int, e: int) -> int:
    """RankSeg's ml head (proj, class tokens, one ViT block, norm, group-wise linear), the rank
    LayerNorm(K + 1), minus the class bias the cosine logits drop."""
    block = 4 * e + lin(e, 3 * e) + lin(e, e) + lin(e, 4 * e) + lin(4 * e, e)
    return lin(in_dim, e) + k * e + block + 2 * e + k * e + k + 2 * (k + 1) - (k + 1)


@pytest.mark.slow  # two builds of the 570M-parameter model on the meta device (1-5 s)
def test_parameters_equal_the_official_layers_and_table7() -> None:
    counts = {}
    for head in ("segmenter", "rankseg"):
        cfg = ModelConfig(model="mask2former-vitadapterl", num_classes=150, kappa=150, head=head, img_size=896)
        with torch.device("meta"):
            model = MASK2FORMER_VITADAPTER.build(cfg)
        counts[head] = count_parameters(model)
        assert count_parameters(model.backbone) == official_vit_adapter_l()
        assert model.num_queries == 200
    assert counts["segmenter"] == official_vit_adapter_l() + official_mmdet_head(150)
    assert counts["rankseg"] - counts["segmenter"] == ml_head(150, 1024, 1024)
    # Table 7 (ADE20K): 570.74M -> 584.71M, in units of 10^6 (2^20 would print 544.30).
    assert round(counts["segmenter"] / 1e6, 2) == 570.74
    # + RankSeg: 584.70M here, 0.01M (5-15 thousand parameters) under the paper; its ViT-Adapter
    # code is unreleased (docs: the ml head at the head's width 1024 is what matches).
    assert round(counts["rankseg"] / 1e6, 2) == 584.70
    assert abs(counts["rankseg"] / 1e6 - 584.71) < 0.016


# ---------------------------------------------------------------------------------------
# Weights


def official_layout(model: ViTAdapter) -> dict[str, torch.Tensor]:
    """The official segmentor checkpoint's names for our weights: backbone.blocks.*,
    backbone.spm.*, ..., with the index buffers the official BEiT saves, and a decode head."""
    sd = {"backbone." + k.removeprefix("body."): v.clone() for k, v in model.state_dict().items()}
    for i in range(len(model.body.blocks)):
        sd[f"backbone.blocks.{i}.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    sd["decode_head.query_embed.weight"] = torch.randn(3, 4)
    return sd


def test_official_checkpoint_layout_loads_back(tmp_path: Path) -> None:
    src = tiny_adapter(seed=1)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "mask2former_beit_adapter.pth"
    torch.save({"meta": {}, "state_dict": official_layout(src)}, path)
    dst = tiny_adapter(seed=2)
    missing, unexpected = load_vit_adapter_weights(dst, path)
    assert missing == [] and unexpected == ["decode_head.query_embed.weight"]
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in dst.state_dict().items())
    assert {k.split(".")[1] for k in official_layout(src) if k.startswith("backbone.")} >= {
        "blocks", "spm", "interactions", "level_embed", "up", "norm1", "norm4", "cls_token", "patch_embed"}

    # Through the family: model.backbone_weights is loaded when the model is built.
    cfg = ModelConfig(model="mask2former-vitadaptert", num_classes=6, kappa=3, img_size=64, backbone_weights=str(path))
    cfg.mask2former.num_queries = 4
    model = MASK2FORMER_VITADAPTER.build(cfg)
    assert torch.equal(model.backbone.spm.fc3.weight, src.spm.fc3.weight)


def test_beit_pretraining_checkpoint_seeds_the_vit(tmp_path: Path) -> None:
    """A BEiT pretraining file (shared relative table of a 2x2 grid, a classifier): the table
    goes to every block, resized to the 4x4 grid; the adapter's own weights are reported missing."""
    torch.manual_seed(0)
    pre = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, embed_dim=32, depth=4, num_heads=2,
                            use_rel_pos_bias=False, use_shared_rel_pos_bias=True, num_classes=5)
    with torch.no_grad():
        pre.rel_pos_bias.relative_position_bias_table.normal_()
    torch.save({"model": pre.state_dict()}, tmp_path / "beit.pth")
    dst = tiny_adapter()
    with pytest.warns(UserWarning, match="missing keys"):
        missing, unexpected = load_vit_adapter_weights(dst, tmp_path / "beit.pth")
    assert missing and all(k.split(".")[0] in {"spm", "interactions", "level_embed", "up", "norm1", "norm2", "norm3",
                                                  "norm4"} for k in missing)
    assert unexpected == []
    shared = pre.rel_pos_bias.relative_position_bias_table
    want = resize_rel_pos_bias_table(shared, new_window_size=(4, 4), new_bias_shape=(7 * 7 + 3, 2))
    for blk, ref in zip(dst.body.blocks, pre.blocks):
        assert torch.allclose(blk.attn.relative_position_bias_table, want)
        assert torch.equal(blk.attn.qkv.weight, ref.attn.qkv.weight)


def test_wrong_weight_files_are_user_errors(tmp_path: Path) -> None:
    model = tiny_adapter()
    with pytest.raises(UserError, match="not found"):
        load_vit_adapter_weights(model, tmp_path / "none.pth")
    big = tiny_adapter(embed_dim=64)
    torch.save({"state_dict": official_layout(big)}, tmp_path / "big.pth")
    with pytest.raises(UserError, match="does not fit this ViT-Adapter"):
        load_vit_adapter_weights(model, tmp_path / "big.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="no key"):
        load_vit_adapter_weights(model, tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------
# The family: recipe, parameter groups, the CLI


@pytest.fixture()
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family in families.FAMILIES (a no-op once rankseg_core/families/__init__.py lists it)."""
    if MASK2FORMER_VITADAPTER not in families.FAMILIES:
        monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, MASK2FORMER_VITADAPTER))


def test_the_family_is_registered() -> None:
    assert families.family_of("mask2former-vitadapterl") is MASK2FORMER_VITADAPTER, (
        "add MASK2FORMER_VITADAPTER to FAMILIES in rankseg_core/families/__init__.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("vitadapter") / "data", num_classes=40, images=6, val_images=2,
                          size=64)


TINY_RUN = ["model.model=mask2former-vitadaptert", *TINY_MASK2FORMER_RUN[1:]]


def test_recipe_is_the_official_vit_adapter_one(registered: None, data: Path) -> None:
    cfg = build_train_config(None, ["model.model=mask2former-vitadapterl"], data)
    o, s = cfg.optim, cfg.schedule
    assert (o.name, o.lr, o.weight_decay, o.grad_clip, o.ml_lr_mult) == ("adamw", 2e-5, 0.05, 0.0, 1.0)
    assert (s.power, s.min_lr, s.warmup_iters, s.batch_size) == (1.0, 0.0, 100, 8)  # synthetic: our CPU protocol
    m = cfg.model.mask2former  # the official head widths, recorded in config.yaml
    assert (m.hidden_dim, m.conv_dim, m.nheads, m.dim_feedforward, m.enc_dim_feedforward, m.ml_hidden_dim) == (
        1024, 1024, 32, 4096, 4096, 1024)
    assert cfg.aug.cat_max_ratio == 0.75
    ade = dataset_defaults("mask2former-vitadapterl", "ade20k")  # the official run, kappa = K as the paper
    assert {k: ade[k] for k in ("schedule.iters", "schedule.warmup_iters", "schedule.batch_size", "model.img_size",
                                "model.kappa", "eval.mode")} == {
        "schedule.iters": 80000, "schedule.warmup_iters": 1500, "schedule.batch_size": 16, "model.img_size": 896,
        "model.kappa": 150, "eval.mode": "whole"}
    tiny = build_train_config(None, TINY_RUN, data)  # explicit widths win over the official ones
    assert tiny.model.mask2former.hidden_dim == 32 and tiny.model.mask2former.num_queries == 8


def official_layer_id(name: str, depth: int) -> int:
    """ViT-Adapter's get_num_layer_for_vit on the official name of one of our parameters."""
    official = {"decoder.mask_embed": "decode_head.mask_embed", "class_embed": "decode_head.cls_embed",
                "decoder.level_embed": "decode_head.level_embed", "decoder.query_embed": "decode_head.query_embed",
                "decoder.query_feat": "decode_head.query_feat"}
    for ours, theirs in official.items():
        if name.startswith(ours + "."):
            return 0
    if name.startswith("backbone.body."):
        rest = name.removeprefix("backbone.body.")
        if rest in ("cls_token",) or rest.startswith("patch_embed"):
            return 0
        if rest.startswith("blocks."):
            return int(rest.split(".")[1]) + 1
    return depth + 1


def test_parameter_groups_are_the_official_layer_decay(registered: None, data: Path) -> None:
    cfg = build_train_config(None, [*TINY_RUN, "optim.ml_lr_mult=0.5"], data)
    model = MASK2FORMER_VITADAPTER.build(cfg.model)
    mults = MASK2FORMER_VITADAPTER.param_groups(model, cfg)
    ml = ml_branch_names(model)
    depth = 4
    assert ml and set(mults) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        lr = 0.9 ** (depth + 2 - official_layer_id(name, depth) - 1) * (0.5 if name in ml else 1.0)
        decay = 0.0 if p.ndim == 1 or name.endswith(".bias") else 1.0
        assert mults[name] == pytest.approx((lr, decay)), name
    assert mults["decoder.query_feat.weight"][0] == pytest.approx(0.9 ** 5)
    assert mults["backbone.spm.fc1.weight"] == (1.0, 1.0)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in runs.read_metrics(run) if r["type"] == "train"]


@pytest.mark.slow  # 2-7 s: two short runs, a resume and an evaluation at another grid
def test_cli_run_resumes_exactly_and_evaluates_at_another_size(registered: None, data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    sets = [*TINY_RUN, "schedule.iters=2", "ckpt_every=1"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    args = sum((["--set", s] for s in sets), [])
    res = runner.invoke(app, ["train", "--data", str(data), "--out", str(straight), *args])
    assert res.exit_code == 0, res.output
    assert "model: mask2former-vitadaptert" in (straight / "config.yaml").read_text()
    train_until_checkpoint(monkeypatch, 1, lambda: train(build_train_config(None, sets, data), cut, progress=False))
    res = runner.invoke(app, ["train", "--out", str(cut), "--resume", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert _losses(cut) == _losses(straight) and len(_losses(straight)) == 2
    a, b = runs.load_weights(straight / "model.safetensors"), runs.load_weights(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Whole-image evaluation at 1.5 x 64 = 96 px: a 6x6 ViT grid, not the 4x4 one of the tables.
    out = tmp_path / "eval.json"
    res = runner.invoke(app, ["eval", str(straight), "--device", "cpu", "--json", str(out), "--scales", "1.5"])
    assert res.exit_code == 0, res.output
    assert 0.0 <= json.loads(out.read_text())["miou"] <= 1.0


@pytest.mark.parametrize("extra, fragments", [
    (["model.img_size=80"], ("model.img_size=80", "multiple of 32")),
    (["model.clip_len=2"], ("model.clip_len=2", "segments images")),
])
def test_bad_options_are_one_line(registered: None, data: Path, tmp_path: Path, extra: list[str],
                                  fragments: tuple[str, ...]) -> None:
    args = sum((["--set", s] for s in [*TINY_RUN, *extra]), [])
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *args])
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_checkpointing_changes_memory_not_results() -> None:
    """with_cp (the official setting for ViT-Adapter-L): the same outputs and gradients in
    training mode, drop path included (the recomputation replays the random stream)."""
    grads = []
    for with_cp in (False, True):
        model = tiny_adapter(seed=4, drop_path=0.3, with_cp=with_cp).train()
        torch.manual_seed(5)
        outs = model(torch.randn(2, 3, 64, 64))
        sum(o.square().mean() for o in outs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(model.parameters()))
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
