"""BEiT pyramid for UperNet: features equal to mmseg's BEiT + Feature2Pyramid, layer-wise lr
decay equal to mmseg's LayerDecayOptimizerConstructor, weights in every layout.

The reference is written from mmsegmentation 0.x `BEiT` (`BEiTAttention`: qkv without bias
plus cat(q_bias, 0, v_bias), scale head_dim^-0.5, the relative position index with its three
cls entries; `BEiTTransformerEncoderLayer`: x + gamma_1 * attn(ln1 x), x + gamma_2 * ffn(ln2 x);
taps drop the cls token, no final norm) and `Feature2Pyramid` (rescales 4, 2, 1, 0.5). It
reads weights in mmseg's names, made here from our model as mmseg's `beit2mmseg.py` renames a
timm / unilm checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankseg_core.errors import UserError
from rankseg_core.model.convseg.upernet import UperHead
from rankseg_core.model.convseg.vit_pyramid import BeitPyramid, layer_decay_multipliers, load_beit_pyramid_weights

TINY = {"img_size": 64, "embed_dim": 32, "depth": 4, "num_heads": 2, "out_indices": (0, 1, 2, 3), "drop_path": 0.1}


def tiny(**kw: object) -> BeitPyramid:
    return BeitPyramid(**{**TINY, **kw})  # type: ignore[arg-type]


def _randomise(m: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                r = torch.randn(t.shape, generator=g) * 0.3
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)


@pytest.fixture(scope="module")
def beit() -> BeitPyramid:
    m = tiny().eval()
    _randomise(m, 0)  # bias tables, q/v biases, gamma, BN statistics: nothing left at its init
    return m


def to_mmseg(model: BeitPyramid) -> dict[str, torch.Tensor]:
    """Our weights in mmseg's names (beit2mmseg.py on the backbone, `neck.` for the neck)."""
    out = {}
    for k, v in model.body.state_dict().items():
        if k.startswith("blocks"):
            k = k.replace("blocks", "layers")
            if "norm" in k:
                k = k.replace("norm", "ln")
            elif "mlp.fc1" in k:
                k = k.replace("mlp.fc1", "ffn.layers.0.0")
            elif "mlp.fc2" in k:
                k = k.replace("mlp.fc2", "ffn.layers.1")
        elif k.startswith("patch_embed"):
            k = k.replace("patch_embed.proj", "patch_embed.projection")
        out["backbone." + k] = v.clone()
    out |= {"neck." + k: v.clone() for k, v in model.neck.state_dict().items()}
    return out


def _mmseg_rel_index(wh: int, ww: int) -> torch.Tensor:
    """BEiTAttention._init_rel_pos_embedding's index, (wh*ww + 1)^2 into a ((2wh-1)(2ww-1) + 3) table."""
    n_rel = (2 * wh - 1) * (2 * ww - 1) + 3
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    idx = torch.zeros((wh * ww + 1,) * 2, dtype=torch.long)
    idx[1:, 1:] = rel.sum(-1)
    idx[0, 0:], idx[0:, 0], idx[0, 0] = n_rel - 3, n_rel - 2, n_rel - 1
    return idx


def _mmseg_beit(sd: dict[str, torch.Tensor], img: torch.Tensor, depth: int, heads: int,
                taps: tuple[int, ...]) -> list[torch.Tensor]:
    s = {k.removeprefix("backbone."): v for k, v in sd.items()}
    x = F.conv2d(img, s["patch_embed.projection.weight"], s["patch_embed.projection.bias"], stride=16)
    b, c, h, w = x.shape
    x = torch.cat([s["cls_token"].expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    n = x.shape[1]
    idx = _mmseg_rel_index(h, w).view(-1)
    feats = []
    for i in range(depth):
        p = f"layers.{i}."
        y = F.layer_norm(x, (c,), s[p + "ln1.weight"], s[p + "ln1.bias"], eps=1e-6)
        bias = torch.cat([s[p + "attn.q_bias"], torch.zeros_like(s[p + "attn.v_bias"]), s[p + "attn.v_bias"]])
        qkv = F.linear(y, s[p + "attn.qkv.weight"], bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] * (c // heads) ** -0.5) @ qkv[1].transpose(-2, -1)
        attn = attn + s[p + "attn.relative_position_bias_table"][idx].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        y = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(b, n, c)
        x = x + s[p + "gamma_1"] * F.linear(y, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
        y = F.layer_norm(x, (c,), s[p + "ln2.weight"], s[p + "ln2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s[p + "ffn.layers.0.0.weight"], s[p + "ffn.layers.0.0.bias"])),
                     s[p + "ffn.layers.1.weight"], s[p + "ffn.layers.1.bias"])
        x = x + s[p + "gamma_2"] * y
        if i in taps:
            feats.append(x[:, 1:].reshape(b, h, w, c).permute(0, 3, 1, 2))

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, s[p + "running_mean"], s[p + "running_var"], s[p + "weight"], s[p + "bias"], False,
                            eps=1e-5)

    up4 = F.conv_transpose2d(feats[0], s["neck.upsample_4x.0.weight"], s["neck.upsample_4x.0.bias"], stride=2)
    up4 = F.conv_transpose2d(F.gelu(bn(up4, "neck.upsample_4x.1.")), s["neck.upsample_4x.3.weight"],
                             s["neck.upsample_4x.3.bias"], stride=2)
    up2 = F.conv_transpose2d(feats[1], s["neck.upsample_2x.0.weight"], s["neck.upsample_2x.0.bias"], stride=2)
    return [up4, up2, feats[2], F.max_pool2d(feats[3], 2, 2)]


def test_features_equal_mmseg_beit_and_neck(beit: BeitPyramid) -> None:
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = beit(img)
        ref = _mmseg_beit(to_mmseg(beit), img, depth=4, heads=2, taps=(0, 1, 2, 3))
    assert [tuple(f.shape) for f in ours] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_taps_follow_out_indices() -> None:
    """A 6-block model tapped at blocks 1, 2, 4, 5: the outputs of exactly those blocks."""
    m = tiny(depth=6, out_indices=(1, 2, 4, 5)).eval()
    _randomise(m, 3)
    img = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = _mmseg_beit(to_mmseg(m), img, depth=6, heads=2, taps=(1, 2, 4, 5))
        for a, b in zip(m(img), ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_neck_scales_sizes_and_recipe() -> None:
    m = tiny()
    assert m.strides == [4, 8, 16, 32] and m.channels == [32] * 4 and m.num_layers == 4
    with pytest.raises(ValueError, match="64x64"):
        m(torch.randn(1, 3, 48, 64))
    assert m.data_config()["mean"] == pytest.approx([123.675, 116.28, 103.53])
    with torch.device("meta"):
        large = BeitPyramid()  # mmseg's upernet_beit-large ADE20K recipe
        base = BeitPyramid("beit_base_patch16_224")
    assert large.indices == [7, 11, 15, 23] and base.indices == [3, 5, 7, 11]
    assert large.body.blocks[0].attn.relative_position_bias_table.shape == (79 * 79 + 3, 16)  # 640 / 16 = 40
    assert large.body.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match="out_indices"):
        BeitPyramid(**{**TINY, "depth": 6, "out_indices": None})  # type: ignore[arg-type]


class _Seg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = tiny()
        self.decode_head = UperHead([32] * 4, channels=8)
        self.conv_seg = nn.Conv2d(8, 5, 1)


def test_layer_decay_multipliers_hand_values() -> None:
    """decay 0.5, 4 layers: id 0 -> 0.5^5, block i -> 0.5^(4 - i), heads 0.5^0; no decay for
    1-D tensors and `.bias` only (mmseg's literal rule)."""
    model = _Seg()
    model.decode_head.fpn_bottleneck.conv.weight.requires_grad_(False)  # frozen: no group
    mult = layer_decay_multipliers(model, 0.5, 4)
    expect = {
        "backbone.body.cls_token": (1 / 32, 1.0),
        "backbone.body.patch_embed.proj.weight": (1 / 32, 1.0),
        "backbone.body.patch_embed.proj.bias": (1 / 32, 0.0),
        "backbone.body.blocks.0.attn.qkv.weight": (1 / 16, 1.0),
        "backbone.body.blocks.0.attn.q_bias": (1 / 16, 0.0),
        "backbone.body.blocks.1.attn.relative_position_bias_table": (1 / 8, 1.0),
        "backbone.body.blocks.2.gamma_1": (1 / 4, 0.0),
        "backbone.body.blocks.3.mlp.fc2.weight": (1 / 2, 1.0),
        "backbone.body.blocks.3.norm2.weight": (1 / 2, 0.0),
        "backbone.neck.upsample_4x.0.weight": (1.0, 1.0),
        "backbone.neck.upsample_4x.1.weight": (1.0, 0.0),
        "decode_head.bottleneck.conv.weight": (1.0, 1.0),
        "decode_head.bottleneck.bn.bias": (1.0, 0.0),
        "conv_seg.weight": (1.0, 1.0),
        "conv_seg.bias": (1.0, 0.0),
    }
    for name, value in expect.items():
        assert mult[name] == pytest.approx(value), name
    assert "decode_head.fpn_bottleneck.conv.weight" not in mult
    assert len(mult) == sum(p.requires_grad for p in model.parameters())
    # every block's parameters share its scale
    for name, (lr, _) in mult.items():
        if ".blocks." in name:
            assert lr == 0.5 ** (4 - int(name.split(".")[3])), name


def test_layer_decay_refuses_a_wrong_depth_or_rate() -> None:
    model = _Seg()
    with pytest.raises(ValueError, match="block 3"):
        layer_decay_multipliers(model, 0.9, 3)
    with pytest.raises(UserError, match="layer_decay_rate"):
        layer_decay_multipliers(model, 1.5, 4)


def _assert_loaded(src: BeitPyramid, dst: BeitPyramid, parts: tuple[str, ...] = ("body", "neck")) -> None:
    a, b = src.state_dict(), dst.state_dict()
    for k in a:
        if k.startswith(parts):
            assert torch.equal(a[k], b[k]), k


def test_loads_whole_mmseg_upernet_checkpoint(beit: BeitPyramid, tmp_path: Path) -> None:
    sd = to_mmseg(beit)
    sd["backbone.layers.0.attn.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)  # mmseg keeps it
    sd["decode_head.conv_seg.weight"] = torch.zeros(5, 8, 1, 1)
    torch.save({"state_dict": sd, "meta": {}}, tmp_path / "upernet_beit.pth")
    fresh = tiny()
    missing, unexpected = load_beit_pyramid_weights(fresh, tmp_path / "upernet_beit.pth")
    assert missing == [] and unexpected == ["decode_head.conv_seg.weight"]
    _assert_loaded(beit, fresh)


def test_loads_timm_and_rankseg_fork_layouts(beit: BeitPyramid, tmp_path: Path) -> None:
    # timm / unilm pretraining: backbone only, with the classifier parts a pyramid drops.
    body = dict(beit.body.state_dict()) | {"fc_norm.weight": torch.ones(32), "head.weight": torch.zeros(10, 32)}
    torch.save({"model": body}, tmp_path / "timm.pth")
    fresh = tiny()
    missing, unexpected = load_beit_pyramid_weights(fresh, tmp_path / "timm.pth")
    # (BatchNorm never reports num_batches_tracked as missing: it defaults to 0)
    neck_keys = [f"neck.{k}" for k in fresh.neck.state_dict() if not k.endswith("num_batches_tracked")]
    assert unexpected == [] and sorted(missing) == sorted(neck_keys)
    _assert_loaded(beit, fresh, ("body",))
    # The RankSeg fork's segmentor (unilm BEiT): the neck lives in the backbone as fpn1 / fpn2.
    fork = {f"backbone.{k}": v for k, v in beit.body.state_dict().items()}
    fork |= {f"backbone.fpn1.{k}": v for k, v in beit.neck.upsample_4x.state_dict().items()}
    fork |= {f"backbone.fpn2.{k}": v for k, v in beit.neck.upsample_2x.state_dict().items()}
    torch.save({"state_dict": fork}, tmp_path / "rankseg_fork.pth")
    fresh = tiny()
    missing, unexpected = load_beit_pyramid_weights(fresh, tmp_path / "rankseg_fork.pth")
    assert missing == [] and unexpected == []
    _assert_loaded(beit, fresh)


@pytest.mark.filterwarnings("ignore:torch.searchsorted", "ignore:Using a non-tuple sequence")  # inside timm
def test_shared_table_of_another_grid_is_copied_and_resized(tmp_path: Path) -> None:
    """A pretraining checkpoint (shared rel_pos_bias, 32 px = 2x2 grid) into a 64 px model
    (4x4): every block gets the table, resampled to 7x7 + 3; the zero offset and the three cls
    entries keep their values (the resampling passes through the source grid's nodes)."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randn(3 * 3 + 3, 2, generator=g)
    src = tiny(img_size=32)
    sd = {k: v for k, v in src.body.state_dict().items() if "relative_position" not in k}
    sd["rel_pos_bias.relative_position_bias_table"] = shared
    torch.save(sd, tmp_path / "pt.pth")
    fresh = tiny()
    load_beit_pyramid_weights(fresh, tmp_path / "pt.pth")
    for blk in fresh.body.blocks:  # type: ignore[union-attr]
        t = blk.attn.relative_position_bias_table
        assert t.shape == (7 * 7 + 3, 2)
        torch.testing.assert_close(t[-3:], shared[-3:])
        torch.testing.assert_close(t[3 * 7 + 3], shared[1 * 3 + 1])  # offset (0, 0): centre of each grid
        torch.testing.assert_close(t[0], shared[0])  # offset (-3, -3) <- (-1, -1): the outermost nodes


def test_wrong_files_are_refused_in_one_line(beit: BeitPyramid, tmp_path: Path) -> None:
    torch.save({"stages.0.blocks.0.attn.w_msa.qkv.weight": torch.zeros(9, 3)}, tmp_path / "swin.pth")
    wide = tiny(embed_dim=48)
    torch.save(wide.body.state_dict(), tmp_path / "wide.pth")
    neck = to_mmseg(beit)
    neck["neck.upsample_2x.0.weight"] = torch.zeros(8, 8, 2, 2)
    torch.save(neck, tmp_path / "neck.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    fresh = copy.deepcopy(beit)
    for name, fragment in [("swin.pth", "no key"), ("wide.pth", "shape mismatch"), ("neck.pth", "neck"),
                           ("w.npz", "suffix"), ("absent.pth", "not found")]:
        with pytest.raises(UserError) as e:
            load_beit_pyramid_weights(fresh, tmp_path / name)
        assert fragment in str(e.value) and "\n" not in str(e.value) and "backbone_weights" in str(e.value)
