"""SeMask Swin as a Mask2Former backbone (model/mask2former/semask.py, losses/semask.py, the
mask2former-semask* models): each piece against a computation written here from the official
code (Picsart-AI-Research/SeMask-Segmentation, SeMask-Mask2Former: semask_swin.py
SemanticAttention / SWSeMaskBlock / SeMaskBlock / BasicLayer, branch_mask_former_head.py
SemanticHead, criterion.py loss_cate), the parameter count of the official layer shapes, the
official checkpoint layout, the recipe and a tiny run through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    TINY_MASK2FORMER_RUN,
    assert_one_line_error,
    make_synthetic,
    tiny_m2f_cfg,
    train_resume_eval_predict,
)
from test_mask2former_stats import head_formula
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine.configure import build_train_config, dataset_defaults
from rankseg_core.engine.model_stats import count_parameters
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import MASK2FORMER, SEMASK_SIZES
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.semask import SEMANTIC_PRIOR_WEIGHT, SemanticPriorCriterion, semantic_prior_loss
from rankseg_core.model.mask2former.semask import (
    SemanticAttention,
    SemanticLayer,
    SeMaskSwin,
    load_semask_weights,
    semantic_prior,
    windowed_stages,
)

TINY_SWIN = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 4}


def tiny_semask(num_classes: int = 5, seed: int = 0, live: bool = True) -> SeMaskSwin:
    """A small SeMask Swin in eval mode; `live`: random gamma / mlp_res, so the attention
    branch contributes (the official init zeroes both)."""
    torch.manual_seed(seed)
    model = SeMaskSwin("swin_tiny_patch4_window7_224", num_classes, Mask2FormerConfig(), **TINY_SWIN).eval()
    if live:
        with torch.no_grad():
            for layer in model.semantic_layers:
                for blk in layer.class_injection:
                    blk.gamma.fill_(0.7)
                    blk.mlp_res.weight.normal_(0, 0.3)
                    blk.mlp_res.bias.normal_(0, 0.1)
    return model


# ---------------------------------------------------------------------------------------
# The official forward, written here


def official_attention(blk: SemanticAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SemanticAttention.forward on ONE group of tokens x (N x C), in eval mode:
    seg_map = mlp_cls_q(x), seg_ft = mlp_cls_k(x), softmax(seg_map @ seg_ft^T) @ mlp_v(x) ->
    mlp_res -> gamma * . + x."""
    q = x @ blk.mlp_cls_q.weight.T + blk.mlp_cls_q.bias
    k = x @ blk.mlp_cls_k.weight.T + blk.mlp_cls_k.bias
    v = x @ blk.mlp_v.weight.T + blk.mlp_v.bias
    p = torch.softmax(q @ k.T, dim=-1)
    res = (p @ v) @ blk.mlp_res.weight.T + blk.mlp_res.bias
    return q, blk.gamma * res + x


def official_layer(layer: SemanticLayer, x: torch.Tensor, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SWSeMaskBlock (window) / SeMaskBlock (None) on ONE image x (H x W x C): norm1, zero-pad to
    whole windows, each window's tokens (row-major) through the attentions in turn, crop."""
    h, w, c = x.shape
    y = F.layer_norm(x, (c,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    k = layer.num_classes

    def run(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seg = tokens
        for blk in layer.class_injection:
            seg, tokens = official_attention(blk, tokens)
        return seg, tokens

    if window is None:
        seg, out = run(y.reshape(h * w, c))
        return out.reshape(h, w, c), seg.reshape(h, w, k)
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    padded = torch.zeros(hp, wp, c)
    padded[:h, :w] = y
    out, seg_map = torch.zeros(hp, wp, c), torch.zeros(hp, wp, k)
    for r in range(0, hp, window):
        for col in range(0, wp, window):
            seg, o = run(padded[r:r + window, col:col + window].reshape(-1, c))
            out[r:r + window, col:col + window] = o.reshape(window, window, c)
            seg_map[r:r + window, col:col + window] = seg.reshape(window, window, k)
    return out[:h, :w], seg_map[:h, :w]


def test_semantic_attention_is_the_official_one_window_two_classes() -> None:
    """1 window of 4 tokens, C = 3, K = 2, written out element by element."""
    torch.manual_seed(0)
    blk = SemanticAttention(3, 2).eval()
    with torch.no_grad():
        blk.gamma.fill_(0.5)
        blk.mlp_res.weight.normal_()
        blk.mlp_res.bias.normal_()
    x = torch.randn(4, 3)
    with torch.no_grad():
        seg, out = blk(x[None])
    wq, bq, wk, bk, wv, bv, wr, br = (p.detach() for p in (
        blk.mlp_cls_q.weight, blk.mlp_cls_q.bias, blk.mlp_cls_k.weight, blk.mlp_cls_k.bias,
        blk.mlp_v.weight, blk.mlp_v.bias, blk.mlp_res.weight, blk.mlp_res.bias))
    for n in range(4):
        q_n = [sum(float(wq[j, c] * x[n, c]) for c in range(3)) + float(bq[j]) for j in range(2)]
        assert seg[0, n].tolist() == pytest.approx(q_n, abs=1e-5)
        scores = []
        for m in range(4):
            k_m = [sum(float(wk[j, c] * x[m, c]) for c in range(3)) + float(bk[j]) for j in range(2)]
            scores.append(sum(q_n[j] * k_m[j] for j in range(2)))  # no 1/sqrt(K) scale
        e = [math.exp(s - max(scores)) for s in scores]
        p = [v / sum(e) for v in e]
        mixed = [sum(p[m] * (sum(float(wv[d, c] * x[m, c]) for c in range(3)) + float(bv[d])) for m in range(4))
                 for d in range(3)]
        res = [sum(float(wr[d, c]) * mixed[c] for c in range(3)) + float(br[d]) for d in range(3)]
        assert out[0, n].tolist() == pytest.approx([float(x[n, d]) + 0.5 * res[d] for d in range(3)], abs=1e-5)


def test_official_init_leaves_the_residual_branch_closed() -> None:
    """Official init_weight: zero mlp_res and gamma, so the output is the input; each is the
    other's only gradient path, so both (and mlp_cls_k / mlp_v) get zero gradient there."""
    torch.manual_seed(1)
    blk = SemanticAttention(8, 3)
    assert blk.gamma.item() == 0 and not blk.mlp_res.weight.any() and not blk.mlp_res.bias.any()
    x = torch.randn(2, 5, 8)
    seg, out = blk(x)
    assert torch.equal(out, x)
    (seg.square().sum() + (out * torch.randn_like(out)).sum()).backward()
    for p in (blk.gamma, blk.mlp_res.weight, blk.mlp_res.bias, blk.mlp_cls_k.weight, blk.mlp_v.weight):
        assert p.grad is not None and not p.grad.any()
    assert blk.mlp_cls_q.weight.grad is not None and blk.mlp_cls_q.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("window, blocks", [(2, 1), (2, 2), (None, 1)])
def test_semantic_layer_is_the_official_block(window: int | None, blocks: int) -> None:
    """A 3 x 5 map: windows of 2 pad it to 4 x 6 with zeros after the norm (padding tokens join
    the softmax); None = SeMaskBlock over all 15 tokens; two blocks chain inside each window."""
    torch.manual_seed(2)
    layer = SemanticLayer(6, 3, window, num_blocks=blocks).eval()
    with torch.no_grad():
        for blk in layer.class_injection:
            blk.gamma.fill_(0.9)
            blk.mlp_res.weight.normal_()
        layer.norm1.weight.normal_()
    x = torch.randn(2, 3, 5, 6)
    out, seg = layer(x)
    assert out.shape == (2, 3, 5, 6) and seg.shape == (2, 3, 5, 3)
    for b in range(2):
        ref_out, ref_seg = official_layer(layer, x[b], window)
        assert torch.allclose(out[b], ref_out, atol=1e-5) and torch.allclose(seg[b], ref_seg, atol=1e-5)


def test_last_stage_is_global_exactly_at_k150() -> None:
    """BasicLayer: index_list = [0, 1, 2] if n_cls == 150 else [0, 1, 2, 3]."""
    assert windowed_stages(150) == [True, True, True, False]
    assert windowed_stages(151) == windowed_stages(10) == [True] * 4
    assert [sl.window for sl in tiny_semask(150).semantic_layers] == [4, 4, 4, None]
    assert [sl.window for sl in tiny_semask(10).semantic_layers] == [4] * 4
    sem6 = SeMaskSwin("swin_tiny_patch4_window7_224", 10, Mask2FormerConfig(), sem_window=6, **TINY_SWIN)
    assert [sl.window for sl in sem6.semantic_layers] == [6] * 4  # SEM_WINDOW_SIZE apart from the Swin's


@pytest.mark.parametrize("num_classes", [5, 150])
def test_backbone_is_the_official_stage_chain(num_classes: int) -> None:
    """Stage i = Swin blocks -> semantic layer -> (patch merging into stage i + 1); res_i =
    norm_i(semantic layer output); the class map = the layer's mlp_cls_q logits. 64 x 96 input:
    stages 16 x 24 ... 2 x 3, the last padded to a window of 4 (or global at K = 150)."""
    model = tiny_semask(num_classes)
    img = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats, classes = model(img)
        assert [tuple(f.shape) for f in feats] == [(2, 16 * 2**i, 16 // 2**i, 24 // 2**i) for i in range(4)]
        assert [tuple(c.shape) for c in classes] == [(2, num_classes, 16 // 2**i, 24 // 2**i) for i in range(4)]
        assert model.channels == [16, 32, 64, 128]
        x = model.body.patch_embed(img)
        for i, (stage, layer, norm) in enumerate(zip(model.body.layers, model.semantic_layers, model.out_norms)):
            x = stage(x)
            outs = [official_layer(layer, x[b], layer.window) for b in range(2)]
            x = torch.stack([o for o, _ in outs])
            ref_feat = F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
            assert torch.allclose(feats[i], ref_feat, atol=1e-4), i
            assert torch.allclose(classes[i], torch.stack([s for _, s in outs]).permute(0, 3, 1, 2), atol=1e-4), i


def test_semantic_prior_is_the_semantic_head() -> None:
    """Maps linear in the normalised coordinates are reproduced exactly by bilinear,
    align_corners=True upsampling, so the prior is the sum of the four planes sampled at
    u = y / (H - 1), v = x / (W - 1); random maps follow the official chain of x2 nn.Upsample."""
    h, w = 64, 96
    coeffs = torch.randn(4, 3, 3)  # stage x class x (a, b, c)
    maps = []
    for i in range(4):
        hs, ws = h // 4 // 2**i, w // 4 // 2**i
        u = torch.linspace(0, 1, hs)[:, None].expand(hs, ws)
        v = torch.linspace(0, 1, ws)[None, :].expand(hs, ws)
        maps.append(torch.stack([a * u + b * v + c for a, b, c in coeffs[i]])[None])
    prior = semantic_prior(maps)
    assert prior.shape == (1, 3, h, w)
    u = torch.linspace(0, 1, h)[:, None]
    v = torch.linspace(0, 1, w)[None, :]
    total = coeffs.sum(0)
    want = torch.stack([a * u + b * v + c for a, b, c in total])[None]
    assert torch.allclose(prior, want, atol=1e-4)

    rnd = [torch.randn(2, 3, 16 // 2**i, 24 // 2**i) for i in range(4)]
    up = torch.nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    acc = rnd[0]
    for i in range(1, 4):
        m = rnd[i]
        for _ in range(i):
            m = up(m)
        acc = acc + m
    ref = F.interpolate(acc, size=(64, 96), mode="bilinear", align_corners=True)
    assert torch.allclose(semantic_prior(rnd), ref, atol=1e-5)


# ---------------------------------------------------------------------------------------
# The loss


def constant_maps(per_stage: list[tuple[float, float]], b: int, h: int, w: int) -> list[torch.Tensor]:
    """Stage maps with constant class logits: the prior is their sum everywhere."""
    return [torch.tensor(v).view(1, 2, 1, 1).expand(b, 2, h // 4 // 2**i, w // 4 // 2**i).clone()
            for i, v in enumerate(per_stage)]


def test_semantic_prior_loss_by_hand() -> None:
    """K = 2, constant logits s = (0.5, -0.3) + (0.1, 0.2) + (0, 0.4) + (-0.2, 0.1) = (0.4, 0.4)
    in image 0 ... written out: CE mean over the labelled pixels of the unpadded 60 x 62 crop."""
    maps = constant_maps([(0.5, -0.3), (0.1, 0.2), (0.0, 0.4), (-0.2, 1.1)], 2, 64, 64)
    s0, s1 = 0.4, 1.4
    labels = torch.full((2, 60, 62), 9, dtype=torch.long)  # 9 = ignore here
    labels[0, :10, :] = 0  # 620 pixels of class 0
    labels[1, :5, :4] = 1  # 20 of class 1
    loss = semantic_prior_loss(maps, labels, ignore_index=9)
    ce0 = math.log(1 + math.exp(s1 - s0))  # -log softmax(s)[0]
    ce1 = math.log(1 + math.exp(s0 - s1))
    assert loss.item() == pytest.approx((620 * ce0 + 20 * ce1) / 640, rel=1e-5)
    # Nothing labelled: 0 (the official mean would be NaN), still differentiable.
    maps = [m.requires_grad_() for m in maps]
    zero = semantic_prior_loss(maps, torch.full((2, 60, 62), 9), ignore_index=9)
    zero.backward()
    assert zero.item() == 0.0 and maps[0].grad is not None


def test_criterion_adds_the_prior_with_the_official_weight() -> None:
    """The family's criterion of a SeMask model = the Mask2Former criterion + 0.4 x the prior CE."""
    assert SEMANTIC_PRIOR_WEIGHT == 0.4  # MODEL.MASK_FORMER.CATE_WEIGHT
    cfg = tiny_m2f_cfg(model="mask2former-semaskt", num_classes=6, kappa=3)
    torch.manual_seed(3)
    model = MASK2FORMER.build(cfg).eval()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 6, (2, 64, 64))
    labels[:, :8] = 65535
    out = model(images)
    assert out.sem_logits is not None and len(out.sem_logits) == 4
    batch = {"image": images, "label": labels}
    targets = [{"labels": torch.unique(lab[lab < 6]), "masks": torch.stack([lab == c for c in torch.unique(lab[lab < 6])])}
               for lab in labels]
    torch.manual_seed(4)
    base = Mask2FormerCriterion(cfg)(out, targets)
    torch.manual_seed(4)
    parts = SemanticPriorCriterion(lambda o, b: Mask2FormerCriterion(cfg)(o, targets), ignore_index=65535)(out, batch)
    prior = semantic_prior(out.sem_logits)
    keep = labels != 65535
    ce = F.cross_entropy(prior.permute(0, 2, 3, 1)[keep], labels[keep])
    assert parts["sem"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(base["loss"].item() + 0.4 * ce.item(), rel=1e-5)
    # Outputs of other backbones pass through.
    plain = MASK2FORMER.build(tiny_m2f_cfg(num_classes=6, kappa=3))(images)
    assert plain.sem_logits is None
    assert "sem" not in SemanticPriorCriterion(lambda o, b: {"loss": torch.zeros(())}, 65535)(plain, batch)


# ---------------------------------------------------------------------------------------
# Parameters (the official layer shapes)


def lin(a: int, b: int, bias: bool = True) -> int:
    return a * b + (b if bias else 0)


def swin_params(embed: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int) -> int:
    """D2SwinTransformer without head: patch embedding (conv 4x4 + LayerNorm), per block 2
    LayerNorms, qkv, the (2w-1)^2 x heads bias table, proj, MLP x4; patch merging (LayerNorm 4C,
    4C -> 2C without bias) after stages 0-2; output norms norm0..3."""
    n = lin(4 * 4 * 3, embed) + 2 * embed
    for i, (d, h) in enumerate(zip(depths, heads)):
        c = embed * 2**i
        n += d * (4 * c + lin(c, 3 * c) + (2 * window - 1) ** 2 * h + lin(c, c) + lin(c, 4 * c) + lin(4 * c, c))
        n += (2 * 4 * c + lin(4 * c, 2 * c, bias=False)) if i < 3 else 0
        n += 2 * c
    return n


def semantic_params(channels: list[int], k: int, blocks: int = 1) -> int:
    """Per stage: norm1 + per semantic attention mlp_cls_q / _k (C -> K), mlp_v / mlp_res (C -> C), gamma."""
    return sum(2 * c + blocks * (2 * lin(c, k) + 2 * lin(c, c) + 1) for c in channels)


def test_parameters_equal_the_official_layers() -> None:
    """SeMask-L + Mask2Former, K = 150 (built on the meta device): Swin-L + 7,143,604 semantic
    parameters + the Mask2Former head; + RankSeg adds 3,438,893, as for Mask2Former Swin-L, at
    100 (semantic) and 200 queries alike."""
    channels = [192, 384, 768, 1536]
    counts = {}
    for head in ("segmenter", "rankseg"):
        for queries in (100, 200):
            cfg = ModelConfig(model="mask2former-semaskl", num_classes=150, kappa=150, head=head, img_size=640,
                              mask2former=Mask2FormerConfig(num_queries=None if queries == 100 else queries))
            with torch.device("meta"):
                model = MASK2FORMER.build(cfg)
            assert model.num_queries == queries
            assert [sl.window for sl in model.backbone.semantic_layers] == [12, 12, 12, None]
            counts[head, queries] = n = count_parameters(model)
            assert count_parameters(model.backbone) == swin_params(192, (2, 2, 18, 2), (6, 12, 24, 48), 12) + \
                semantic_params(channels, 150)
            assert n == count_parameters(model.backbone) + head_formula(150, queries, 150, head == "rankseg",
                                                                        channels, cfg.mask2former)
    assert semantic_params(channels, 150) == 7_143_604
    assert counts["segmenter", 100] == 222_632_383  # the SeMask README's "222M" (10^6 units)
    assert int(counts["segmenter", 100] / 1e6) == 222
    for q in (100, 200):
        assert counts["rankseg", q] - counts["segmenter", q] == 3_438_893


@pytest.mark.parametrize("window", [4, None])
def test_semantic_layer_flops(window: int | None) -> None:
    """FLOPs of one layer = 2 x MACs: four projections per (padded) token, 2CK + 2C^2, and the
    attention, N (K + C) per token for groups of N tokens: the +14.43 GMACs of SeMask-L at 640
    in the docs are this sum over the four stages."""
    from torch.utils.flop_counter import FlopCounterMode

    c, k, h, w = 8, 5, 6, 10
    layer = SemanticLayer(c, k, window).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(torch.randn(1, h, w, c))
    tokens = (8 * 12) if window else h * w  # padded to whole windows of 4
    group = window * window if window else h * w
    assert counter.get_total_flops() == 2 * tokens * (2 * c * k + 2 * c * c + group * (k + c))


# ---------------------------------------------------------------------------------------
# Weights


def official_layout(model: SeMaskSwin) -> dict[str, torch.Tensor]:
    """Our backbone's weights in the official D2 checkpoint's names (model_final.pth "model"):
    downsample at the END of stage i, semantic_layer inside layers.i, norm0..3, saved
    relative_position_index buffers, and the head / criterion keys of the whole model."""
    sd: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if parts[0] == "body" and parts[2:4] and parts[1] == "layers" and parts[3] == "downsample":
            name = f"layers.{int(parts[2]) - 1}.downsample." + ".".join(parts[4:])
        elif parts[0] == "body":
            name = ".".join(parts[1:])
        elif parts[0] == "semantic_layers":
            name = f"layers.{parts[1]}.semantic_layer." + ".".join(parts[2:])
        else:
            assert parts[0] == "out_norms"
            name = f"norm{parts[1]}.{parts[2]}"
        sd["backbone." + name] = v.clone()
    for i, stage in enumerate(model.body.layers):
        for j in range(len(stage.blocks)):
            sd[f"backbone.layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    sd["sem_seg_head.predictor.query_feat.weight"] = torch.randn(3, 4)
    sd["criterion.empty_weight"] = torch.ones(6)
    return sd


def test_official_checkpoint_layout_loads_back(tmp_path: Path) -> None:
    src = tiny_semask(6, seed=1)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "semask_model_final.pth"
    official = official_layout(src)
    assert {"backbone.layers.0.semantic_layer.class_injection.0.mlp_cls_q.weight", "backbone.norm3.bias",
            "backbone.layers.0.downsample.reduction.weight"} <= set(official)
    torch.save({"model": official, "iteration": 160000}, path)
    dst = tiny_semask(6, seed=2)
    missing, unexpected = load_semask_weights(dst, path)
    assert missing == [] and sorted(unexpected) == ["criterion.empty_weight", "sem_seg_head.predictor.query_feat.weight"]
    ref = src.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in dst.state_dict().items())
    img = torch.randn(1, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(dst.eval()(img)[0] + dst(img)[1], src.eval()(img)[0] + src(img)[1]))

    # Through the family: model.backbone_weights is loaded when the model is built.
    cfg = tiny_m2f_cfg(model="mask2former-semaskt", num_classes=6, kappa=3, backbone_weights=str(path))
    model = MASK2FORMER.build(cfg)
    assert torch.equal(model.backbone.semantic_layers[2].class_injection[0].mlp_v.weight,
                       src.semantic_layers[2].class_injection[0].mlp_v.weight)


def test_swin_release_seeds_the_swin_and_wrong_files_are_user_errors(tmp_path: Path) -> None:
    """An original Swin classification release (layers with downsample at the end, final norm,
    head): the Swin loads, the semantic layers and output norms are reported missing."""
    src = tiny_semask(6, seed=3)
    release = {k.removeprefix("backbone."): v for k, v in official_layout(src).items()
               if k.startswith("backbone.") and ".semantic_layer." not in k and not k.startswith("backbone.norm")}
    release.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128), "head.weight": torch.randn(7, 128),
                    "head.bias": torch.zeros(7)})
    torch.save({"model": release}, tmp_path / "swin.pth")
    dst = tiny_semask(6, seed=4)
    with pytest.warns(UserWarning, match="missing keys"):
        missing, unexpected = load_semask_weights(dst, tmp_path / "swin.pth")
    assert unexpected == [] and missing and all(k.startswith(("semantic_layers.", "out_norms.")) for k in missing)
    assert torch.equal(dst.body.layers[2].downsample.reduction.weight, src.body.layers[2].downsample.reduction.weight)

    with pytest.raises(UserError, match="not found"):
        load_semask_weights(dst, tmp_path / "none.pth")
    torch.save({"model": official_layout(tiny_semask(9))}, tmp_path / "k9.pth")
    with pytest.raises(UserError, match="does not fit this SeMask Swin"):
        load_semask_weights(dst, tmp_path / "k9.pth")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="no key"):
        load_semask_weights(dst, tmp_path / "other.pth")


# ---------------------------------------------------------------------------------------
# The family: names, recipe, the CLI


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("semask") / "data", num_classes=40, images=6, val_images=2, size=64)


TINY_RUN = ["model.model=mask2former-semaskt", *TINY_MASK2FORMER_RUN[1:]]


def test_names_and_the_official_recipe(data: Path) -> None:
    assert MASK2FORMER.arch("mask2former-semaskl") == "swin_large_patch4_window12_384"
    assert set(SEMASK_SIZES) == {"mask2former-semaskl", "mask2former-semaskt"}
    ade = dataset_defaults("mask2former-semaskl", "ade20k")
    want = {"optim.name": "adamw", "optim.lr": 1e-4, "optim.weight_decay": 0.05, "optim.backbone_lr_mult": 0.1,
            "optim.grad_clip": 0.01, "schedule.min_lr": 0.0, "schedule.batch_size": 16, "schedule.iters": 160000,
            "model.img_size": 640, "loss.ml_weight": 10.0, "eval.mode": "whole"}
    assert {k: ade[k] for k in want} == want
    cfg = build_train_config(None, TINY_RUN, data)
    assert cfg.model.model == "mask2former-semaskt" and cfg.model.mask2former.backbone_drop_path == 0.3
    model = MASK2FORMER.build(cfg.model)
    mults = MASK2FORMER.param_groups(model, cfg)
    # detectron2's groups: the semantic layers are backbone (lr x 0.1); their LayerNorm does not decay, gamma does.
    assert mults["backbone.semantic_layers.0.norm1.weight"] == (0.1, 0.0)
    assert mults["backbone.semantic_layers.3.class_injection.0.gamma"] == (0.1, 1.0)


@pytest.mark.slow  # 3-8 s: two short runs, a resume, an evaluation and a prediction
def test_cli_run_resumes_exactly(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, report, _ = train_resume_eval_predict(data, tmp_path, monkeypatch, TINY_RUN, iters=2)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "model: mask2former-semaskt" in (tmp_path / "full" / "config.yaml").read_text()
    assert 0.0 <= report["miou"] <= 1.0


@pytest.mark.parametrize("extra, fragments", [
    (["model.mask2former.task=panoptic"], ("model.mask2former.task=panoptic", "task=semantic")),
    (["model.clip_len=2"], ("model.clip_len=2", "clip_len=1")),
])
def test_bad_options_are_one_line(data: Path, tmp_path: Path, extra: list[str], fragments: tuple[str, ...]) -> None:
    args = sum((["--set", s] for s in [*TINY_RUN, *extra]), [])
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *args])
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "r" / "config.yaml").exists()
