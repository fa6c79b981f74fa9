"""Mask2Former parameter / FLOP counts: the architecture's own count, the paper's Table 8, the CLI."""

from __future__ import annotations

import json

import pytest
import timm
from conftest import TINY_M2F as TINY
from conftest import assert_one_line_error
from conftest import tiny_m2f_model as tiny_model
from typer.testing import CliRunner

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.engine.model_stats import count_flops, count_parameters, model_stats
from rankseg_core.families.mask2former import MASK2FORMER, num_queries

# Main paper Table 8 (Mask2Former Swin-L, ADE20K, K = 150): (task, head) -> #params as printed,
# in "M" = 2^20 parameters (docs/mask2former.md, "Cost").
PAPER = {("semantic", "segmenter"): 205.51, ("semantic", "rankseg"): 208.79,
         ("panoptic", "segmenter"): 205.55, ("panoptic", "rankseg"): 208.83}
MI = 2**20


def head_formula(k: int, queries: int, kappa: int, rankseg: bool, in_ch: list[int], m: Mask2FormerConfig) -> int:
    """Parameters after the backbone, from the official layer shapes (independent of the code)."""
    d, f_enc, f_dec, heads, pts = m.conv_dim, m.enc_dim_feedforward, m.dim_feedforward, m.nheads, m.enc_n_points
    def lin(a, b, bias=True):
        return a * b + (b if bias else 0)
    def ln(c):
        return 2 * c
    enc_layer = (lin(d, heads * 3 * pts * 2) + lin(d, heads * 3 * pts) + 2 * lin(d, d) + ln(d)
                 + lin(d, f_enc) + lin(f_enc, d) + ln(d))
    pixel = (sum(lin(c, d) + ln(d) for c in in_ch[1:]) + 3 * d + m.enc_layers * enc_layer
             + lin(in_ch[0], d, bias=False) + ln(d) + 9 * d * d + ln(d) + lin(d, m.mask_dim))
    mha = 3 * d * d + 3 * d + lin(d, d)
    dec_layer = 2 * (mha + ln(d)) + lin(d, f_dec) + lin(f_dec, d) + ln(d)
    decoder = m.dec_layers * dec_layer + ln(d) + 2 * queries * d + 3 * d + 2 * lin(d, d) + lin(d, m.mask_dim)
    cls = lin(d, k + 1, bias=not rankseg)
    ml = 0
    if rankseg:
        e = m.ml_hidden_dim
        block = 2 * ln(e) + lin(e, 3 * e) + lin(e, e) + lin(e, 4 * e) + lin(4 * e, e)
        ml = lin(d, e) + k * e + block + ln(e) + (k * e + k) + 2 * (kappa + 1)
    return pixel + decoder + cls + ml


def swinl_pyramid_params() -> int:
    """timm's own features_only Swin-L (final norm and classifier not included) + 4 output LayerNorms."""
    ref = timm.create_model("swin_large_patch4_window12_384", pretrained=False, features_only=True)
    return count_parameters(ref) + sum(2 * c for c in ref.feature_info.channels())


@pytest.mark.slow  # builds Swin-L (~200M parameters) four times
@pytest.mark.parametrize("task,head", list(PAPER))
def test_swinl_counts_equal_the_architecture_and_table8(task: str, head: str) -> None:
    cfg = ModelConfig(model="mask2former-swinl", num_classes=150, kappa=150, head=head, img_size=640,
                      mask2former=Mask2FormerConfig(task=task))
    model = MASK2FORMER.build(cfg)
    n = count_parameters(model)
    m = cfg.mask2former
    expected = swinl_pyramid_params() + head_formula(150, num_queries(cfg), 150, head == "rankseg",
                                                     [192, 384, 768, 1536], m)
    assert n == expected
    # Table 8 prints the count in units of 2^20, rounded to 0.01: ours rounds to the same digits.
    assert round(n / MI, 2) == PAPER[task, head], n / MI
    stats = model_stats(cfg, flops=False)
    assert stats["params"] == n and stats["params_mi"] == pytest.approx(n / MI)


@pytest.mark.slow
def test_rankseg_increment_matches_table8() -> None:
    """Table 8's +3.28 (in 2^20 units) is the whole increment: the ml head (projection, class
    embeddings, one block, LayerNorm, GroupWiseLinear) + LayerNorm(kappa + 1) - the class bias."""
    base = MASK2FORMER.build(ModelConfig(model="mask2former-swinl", num_classes=150, kappa=150, head="segmenter"))
    rank = MASK2FORMER.build(ModelConfig(model="mask2former-swinl", num_classes=150, kappa=150, head="rankseg"))
    delta = count_parameters(rank) - count_parameters(base)
    m = Mask2FormerConfig()
    assert delta == head_formula(150, 100, 150, True, [192, 384, 768, 1536], m) - head_formula(
        150, 100, 150, False, [192, 384, 768, 1536], m)
    paper = PAPER["semantic", "rankseg"] - PAPER["semantic", "segmenter"]
    assert abs(delta / MI - paper) <= 0.01, delta / MI  # two numbers each rounded to 0.01


def test_panoptic_adds_100_queries_only_for_swin_l() -> None:
    sem = model_stats(ModelConfig(model="mask2former-r50", num_classes=150, head="segmenter"), flops=False)
    pan = model_stats(ModelConfig(model="mask2former-r50", num_classes=150, head="segmenter",
                                  mask2former=Mask2FormerConfig(task="panoptic")), flops=False)
    assert sem["queries"] == pan["queries"] == 100 and sem["params"] == pan["params"]
    pan_l = ModelConfig(model="mask2former-swinl", mask2former=Mask2FormerConfig(task="panoptic"))
    assert num_queries(pan_l) - num_queries(ModelConfig(model="mask2former-swinl")) == 100
    expected = 23_454_912 + head_formula(150, 100, 150, False, [256, 512, 1024, 2048], Mask2FormerConfig())
    assert sem["params"] == expected  # ResNet-50 with frozen BN (buffers) + the head
    assert sem["params_backbone"] + sem["params_head"] == sem["params"] and sem["params_ml_head"] == 0


def test_class_head_flops_scale_with_kappa_not_k() -> None:
    """Real pruning: the class logits cost 2*Q*C*D per prediction step, C = kappa + 1 columns."""
    q, d, steps = TINY.num_queries, TINY.hidden_dim, TINY.dec_layers + 1
    r4 = count_flops(m := tiny_model(num_classes=40, kappa=4), m.cfg, 64)
    r8 = count_flops(m := tiny_model(num_classes=40, kappa=8), m.cfg, 64)
    assert r8["flops"] - r4["flops"] == 2 * q * 4 * d * steps
    b10 = count_flops(m := tiny_model(num_classes=10, head="segmenter"), m.cfg, 64)
    b40 = count_flops(m := tiny_model(num_classes=40, head="segmenter"), m.cfg, 64)
    assert b40["flops"] - b10["flops"] == 2 * q * 30 * d * steps
    assert b40["backbone_flops"] == r4["backbone_flops"] > 0
    assert b40["head_flops"] == b40["flops"] - b40["backbone_flops"]


def test_cli_stats_model_mask2former() -> None:
    from rankseg_cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["stats", "model", "--model", "mask2former-r50", "--num-classes", "150", "--kappa", "150",
                              "--task", "panoptic", "--no-flops", "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert stats["task"] == "panoptic" and stats["queries"] == 100 and stats["params_ml_head"] > 3e6
    assert stats["params"] == stats["params_backbone"] + stats["params_head"]
    assert stats["params_mi"] == stats["params"] / 2**20 and stats["params_m"] == stats["params"] / 1e6
    bad = runner.invoke(app, ["stats", "model", "--model", "mask2former-r50", "--task", "instance", "--no-flops"])
    assert_one_line_error(bad, "model.mask2former.task", "semantic")
    bad = runner.invoke(app, ["stats", "model", "--model", "mask2former-swinx", "--no-flops"])
    assert_one_line_error(bad, "mask2former-swinx")
