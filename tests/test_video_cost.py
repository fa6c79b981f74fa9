"""Video Mask2Former cost (docs/video.md, "Cost"): FLOPs of a T-frame clip through
`count_flops`, and paper Table 8's RankSeg FLOPs increments over two frames at the official
test input, checked against a formula of the official multi-label head's layer shapes."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_M2F, tiny_m2f_cfg
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine.model_stats import count_flops
from rankseg_core.families.mask2former import MASK2FORMER

# Paper Table 8, video rows (Swin-L, T = 2): GFLOPs over the two frames of a clip, baseline and
# + RankSeg, in the paper's MAC convention (docs/mask2former.md, "Cost").
PRINTED = {"vspw": (737.38, 738.14), "ytvis": (753.79, 754.59)}
# (K = kappa, queries) of the official Swin-L configs: VSPW 124 classes, 100 queries; YouTube-VIS
# 2019 40 classes, NUM_OBJECT_QUERIES 200 (RANKSEG.TOPK = K in both).
SETUP = {"vspw": (124, 100), "ytvis": (40, 200)}
# The official input of both: the fork's Swin-L video configs set INPUT.MIN_SIZE_TEST 480, VSPW
# and (most) YouTube-VIS 2019 frames are 16:9, so 480 x 853, which the model pads to its
# SIZE_DIVISIBILITY 32: 480 x 864 per frame.
OFFICIAL_INPUT = (480, 864)


def sdpa_counted() -> bool:
    """Whether FlopCounterMode has a formula for the fused attention kernel this machine runs
    (PyTorch's CPU kernel has none: its QK^T and AV products are then not counted)."""
    q = torch.zeros(1, 1, 4, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q)
    return counter.get_total_flops() > 0


def ml_head_macs(queries: int, k: int, d: int, e: int, attention: bool) -> int:
    """MACs of the official MultiLabelHead on one clip, from its layer shapes: proj_dec (Q x d ->
    e), one transformer block over the Q + K tokens (qkv 3e^2, proj e^2, MLP 2 x 4e^2 per token;
    the QK^T and AV products 2 (Q+K)^2 e when counted). Its LayerNorms and GroupWiseLinear are
    elementwise, no matmul."""
    n = queries + k
    return queries * d * e + n * 12 * e * e + (2 * n * n * e if attention else 0)


def increment_formula(model: nn.Module, cfg: ModelConfig, queries: int) -> int:
    """RankSeg - baseline MACs of `model` (the RankSeg one) with kappa = K: the ml head, once per
    clip. The class logits cost the same in both (K + 1 columns: a Linear with bias vs cosine
    logits); the rank LayerNorm is elementwise."""
    m = cfg.mask2former
    # timm runs the block's attention as one fused kernel unless told not to.
    attention_counted = sdpa_counted() or not cast(Any, model).ml_head.block.attn.fused_attn
    return ml_head_macs(queries, cfg.num_classes, m.hidden_dim, m.ml_hidden_dim, attention_counted)


def count(cfg: ModelConfig, size: int | tuple[int, int]) -> tuple[dict[str, int], nn.Module]:
    """count_flops of a freshly built model (counting needs no trained weights) and the model."""
    model = MASK2FORMER.build(cfg)
    return count_flops(model, cfg, size, MASK2FORMER.stats_selection(cfg)), model


def test_a_clip_counts_every_frame_and_one_ranking() -> None:
    """count_flops feeds clip_len frames: the per-frame backbone costs T times one frame, the
    ml head (one ranking per clip) the same at every T."""
    def cfg(head: str, t: int) -> ModelConfig:
        return tiny_m2f_cfg(num_classes=10, kappa=10, head=head, clip_len=t)

    queries = TINY_M2F.num_queries
    assert queries is not None
    one, _ = count(cfg("rankseg", 1), 64)
    two, model = count(cfg("rankseg", 2), 64)
    assert two["backbone_flops"] == 2 * one["backbone_flops"] > 0
    assert two["head_flops"] > one["head_flops"]  # the pixel decoder and the masks run per frame
    for t, rank in ((1, one), (2, two)):
        base, _ = count(cfg("segmenter", t), 64)
        assert rank["macs"] - base["macs"] == increment_formula(model, cfg("rankseg", t), queries), t


@pytest.mark.slow  # builds Swin-L four times and counts one clip at 2 x 480 x 864 twice (~1 min on one core)
def test_table8_video_rankseg_flops_increments() -> None:
    """Table 8's video rows, counted as `rankseg stats model` counts (FlopCounterMode, MACs =
    FLOPs / 2) with clip_len 2.

    What is reproduced: the increment is the multi-label head alone, exactly the formula of its
    official layer shapes, the same at any input size (VSPW is counted at the official input and
    YouTube-VIS at 32 x 32 to keep the test short: no term of the increment depends on pixels).
    What is not: the printed increments, +0.76 G (VSPW) and +0.80 G (YouTube-VIS), exceed the
    measured +0.718 / +0.781 GMACs by 0.03-0.05 G and 0.01-0.03 G, while the same count gives
    the image rows (+0.80 vs +0.81, +1.13 vs +1.13); docs/video.md "Cost" lists the candidate
    terms that do not close the gap. So the test checks the trend the table shows: the increment
    grows with the Q + K tokens of the ml block (YouTube-VIS above VSPW), stays ~0.1 % of a clip,
    and lies below the printed value by less than 0.05 G."""
    measured = {}
    for name, (k, queries) in SETUP.items():
        size = OFFICIAL_INPUT if name == "vspw" else 32
        def cfg(head: str) -> ModelConfig:
            return ModelConfig(model="mask2former-swinl", num_classes=k, kappa=k, head=head, img_size=640,
                               clip_len=2, mask2former=Mask2FormerConfig(num_queries=queries))

        base, _ = count(cfg("segmenter"), size)
        rank, model = count(cfg("rankseg"), size)
        assert rank["backbone_flops"] == base["backbone_flops"]  # the same Swin-L on the same two frames
        delta = rank["macs"] - base["macs"]
        assert delta == increment_formula(model, cfg("rankseg"), queries), (name, delta)
        del model
        measured[name] = delta / 1e9
        printed_base, printed_rank = PRINTED[name]
        printed = printed_rank - printed_base
        assert 0 < printed - measured[name] < 0.05, (name, measured[name], printed)
        if size == OFFICIAL_INPUT:
            # The paper's counter sees ~6 % less than ours (functional products it skips, as for
            # the image rows: 369.02 G vs our 394.1 GMACs at 640 x 640); at MIN_SIZE_TEST 360
            # (Mask2Former-VIS's default) ours would be ~0.56 x, not ~1.07 x, the printed total.
            assert 0.90 < printed_base / (base["macs"] / 1e9) < 0.97, base["macs"]
            assert measured[name] / (base["macs"] / 1e9) < 0.0015  # printed: 0.10 %
    assert measured["ytvis"] > measured["vspw"]  # printed: +0.80 > +0.76


def test_stats_model_counts_a_clip_of_clip_len_frames() -> None:
    """`rankseg stats model --clip-len T` counts one clip of T frames: the backbone twice at
    T = 2, the parameters unchanged (they do not depend on T)."""
    import json

    from typer.testing import CliRunner

    from rankseg_cli.app import app

    def stats(*extra: str) -> dict:
        res = CliRunner().invoke(app, ["stats", "model", "--model", "mask2former-r50", "--num-classes", "10",
                                       "--kappa", "5", "--img-size", "64", "--json", *extra])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    one, two = stats(), stats("--clip-len", "2")
    assert two["params"] == one["params"]
    assert two["backbone_gflops"] == pytest.approx(2 * one["backbone_gflops"], rel=1e-12)
