"""ProtoSeg's prototype heads on the conv decoders (`--head protoseg` / `rankproto` for DeepLabv3 and
UperNet, issue 20): model/convseg/prototypes.py, the family wiring in families/convseg.py.

References are written here: the classifier's forward from its own tensors (1x1 convs, BN with
running statistics, LayerNorms by formula, cosines by einsum), the supplement's Algorithm 1 for the
prototype targets, and the losses by their definitions. Tiny models (16-wide decoder, two ASPP
branches) on 32 px crops, as tests/test_convseg.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_synthetic, tiny_run, train_resume_eval_predict
from torch import Tensor
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.convseg import ConvSegConfig
from rankseg_core.config.model import ModelConfig, ProtoSegConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.engine.optim import build_optimizer
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.convseg import with_official
from rankseg_core.model.convseg.model import ConvProtoSegOutput, ConvSegModel
from rankseg_core.model.convseg.prototypes import PrototypeClassifier
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE

K, KAPPA, M, C = 10, 4, 3, 16  # classes, kappa, prototypes per class, decoder width
TINY = ConvSegConfig(channels=C, aux_channels=8, ml_dim=16, aspp_dilations=[1, 2], pool_scales=[1, 2])
TINY_SETS = ["model.convseg.channels=16", "model.convseg.aux_channels=8", "model.convseg.ml_dim=16",
             "model.convseg.aspp_dilations=1,2", "model.convseg.pool_scales=1,2"]


def tiny_cfg(head: str = "protoseg", model: str = "deeplabv3-r18", **kw) -> ModelConfig:
    proto = ProtoSegConfig(prototypes=M, **kw.pop("protoseg", {}))
    return ModelConfig(model=model, num_classes=K, kappa=KAPPA, head=head, img_size=32, protoseg=proto,
                       convseg=dataclasses.replace(TINY, **kw.pop("convseg", {})), **kw)


def build(m: ModelConfig, seed: int = 0) -> ConvSegModel:
    torch.manual_seed(seed)
    model = family_of(m.model).build(m)
    assert isinstance(model, ConvSegModel)
    assert isinstance(model.classifier, PrototypeClassifier) == (m.head in ("protoseg", "rankproto"))
    return model


def randomise_classifier(clf: PrototypeClassifier, seed: int = 1) -> None:
    """Every float tensor of the classifier random (BN variances positive, prototypes unit rows),
    so that a skipped affine, BN or normalisation shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in clf.state_dict().items():
            if t.is_floating_point() and not name.startswith("ml_head."):
                r = torch.randn(t.shape, generator=g) * 0.5
                t.copy_(r.abs() + 0.5 if name.endswith("running_var") else r)
        clf.prototypes.copy_(F.normalize(clf.prototypes, dim=-1))


def embeddings_by_hand(clf: PrototypeClassifier, pixels: Tensor) -> Tensor:
    """Eval-mode ProtoSeg embedding of decoder pixels B x C x h x w -> B x hw x C: 1x1 conv (no
    bias), BN (running statistics), ReLU, 1x1 conv, L2, LayerNorm(C), L2."""
    conv, bn, out = clf.proj_head[0].conv, clf.proj_head[0].bn, clf.proj_head[1]
    x = pixels.flatten(2).transpose(1, 2)  # B x p x C
    x = x @ conv.weight[:, :, 0, 0].t()
    x = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    x = x.clamp_min(0) @ out.weight[:, :, 0, 0].t() + out.bias
    x = x / x.norm(dim=-1, keepdim=True)
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    x = (x - mu) / torch.sqrt(var + clf.feat_norm.eps) * clf.feat_norm.weight + clf.feat_norm.bias
    return x / x.norm(dim=-1, keepdim=True)


def norm_by_hand(s: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """LayerNorm over the last axis (biased variance, eps 1e-5) with per-channel gamma / beta."""
    mu, var = s.mean(-1, keepdim=True), s.var(-1, unbiased=False, keepdim=True)
    return (s - mu) / torch.sqrt(var + 1e-5) * gamma + beta


def pixels_of(model: ConvSegModel, images: Tensor) -> Tensor:
    return model.decode_head(model.forward_features(images))


# ---------------------------------------------------------------------------------------
# The forward


def test_protoseg_logits_are_the_layernorm_of_each_class_best_prototype_cosine() -> None:
    model = build(tiny_cfg())
    clf = model.classifier
    assert isinstance(clf, PrototypeClassifier) and clf.ml_head is None and not clf.selects
    randomise_classifier(clf)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        emb = embeddings_by_hand(clf, pixels_of(model, images))
    assert isinstance(out, ConvProtoSegOutput) and out.mask_logits.shape == (2, K, 4, 4)  # output stride 8
    assert out.topk_index is None and out.ml_logits is None and out.aux_logits is None  # eval: no aux
    torch.testing.assert_close(out.embeddings, emb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(2, 16))
    best = torch.einsum("bpd,kmd->bpkm", emb, clf.prototypes).amax(-1)  # B x p x K
    ref = norm_by_hand(best, clf.norm.weight, clf.norm.bias)
    torch.testing.assert_close(out.mask_logits.flatten(2).transpose(1, 2), ref, rtol=1e-4, atol=1e-4)
    # The GT (eval) override keeps the argmax to each image's classes; the others' logits are untouched.
    with torch.no_grad():
        gt = model(images, Selection(override=[torch.tensor([1, 3]), torch.tensor([0])]))
    assert set(gt.mask_logits[0].argmax(0).unique().tolist()) <= {1, 3} and (gt.mask_logits[1].argmax(0) == 0).all()
    torch.testing.assert_close(gt.mask_logits[0, [1, 3]], out.mask_logits[0, [1, 3]])


def test_rankproto_scores_only_the_top_kappa_classes_prototypes_with_rank_norm() -> None:
    m = tiny_cfg("rankproto")
    assert with_official(m).convseg.ml_own_embedding is True  # recorded in config.yaml
    model = build(m)
    clf = model.classifier
    assert isinstance(clf, PrototypeClassifier) and clf.selects and clf.ml_head is not None
    assert clf.ml_head.cls_emb is not None  # class tokens of its own: prototypes are no embeddings
    randomise_classifier(clf)
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images)
        emb = embeddings_by_hand(clf, pixels_of(model, images))
    assert out.ml_logits is not None and out.topk_index is not None and out.mask_logits.shape == (2, KAPPA, 4, 4)
    top = out.ml_logits.argsort(dim=1, descending=True)[:, :KAPPA]
    assert torch.equal(out.topk_index, top)
    assert out.bank is not None and torch.equal(out.bank, clf.prototypes[top])  # B x kappa x M x C
    best = torch.einsum("bpd,brmd->bprm", emb, clf.prototypes[top]).amax(-1)  # B x p x kappa, rank order
    ref = norm_by_hand(best, clf.norm.weight, clf.norm.bias)  # per-rank 1/tau, beta
    torch.testing.assert_close(out.mask_logits.flatten(2).transpose(1, 2), ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(clf.norm.weight[0], clf.norm.weight[1])  # the ranks' affines differ
    # --no-select: the ml branch stays, the pixels are classified over all K in class order.
    mt = build(tiny_cfg("rankproto", select=False)).eval()
    with torch.no_grad():
        res = mt(images)
    assert res.ml_logits is not None and res.topk_index is None and res.mask_logits.shape == (2, K, 4, 4)


def test_beit_upernet_crops_the_embeddings_with_the_logits() -> None:
    model = build(tiny_cfg("protoseg", "upernet-beitt")).eval()
    x = torch.randn(1, 3, 20, 27)
    with torch.no_grad():
        out = model(x)
        padded = model.forward_head(model.forward_features(F.pad(x, (0, 5, 0, 12))))
    assert out.mask_logits.shape == (1, K, 5, 7) and out.embeddings is not None and padded.embeddings is not None
    grid = padded.embeddings.unflatten(1, (8, 8))[:, :5, :7].flatten(1, 2)  # 8 x 8 cells of the 32 px input
    torch.testing.assert_close(out.embeddings, grid)


def test_parameters_replace_conv_seg_by_the_projection_head() -> None:
    """protoseg - baseline = (projection head: 1x1 conv C^2, BN 2C, 1x1 conv C^2 + C; feat_norm 2C;
    LayerNorm(K) 2K) - conv_seg (C*K + K); the K x M x C prototypes are a buffer, counted nowhere."""
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    base, proto = build(tiny_cfg("segmenter")), build(tiny_cfg("protoseg"))
    assert count(proto) - count(base) == (2 * C * C + 5 * C + 2 * K) - (C * K + K)
    stats = family_of("deeplabv3-r18").stats_extra(proto, tiny_cfg())
    assert stats["params_classifier"] == 2 * C * C + 5 * C + 2 * K and stats["params_ml_head"] == 0
    assert "classifier.prototypes" in proto.state_dict()  # checkpointed: resume is exact
    assert proto.classifier.prototypes.shape == (K, M, C)


# ---------------------------------------------------------------------------------------
# Options


@pytest.mark.parametrize("change, fragment", [
    ({"head": "protoseg", "oracle": True}, "--head protoseg classifies pixels among its own prototypes"),
    ({"head": "rankproto", "oracle": True}, "--head rankproto classifies pixels among its own prototypes"),
    ({"head": "protoseg", "select": False}, "--head protoseg selects nothing: drop it"),
    ({"head": "rankproto", "convseg": {"ml_own_embedding": False}}, "model.convseg.ml_own_embedding=false"),
    ({"head": "protoseg", "convseg": {"cosine": True}}, "model.convseg.cosine=true is an option of --head rankseg"),
    ({"head": "essnet"}, "--head segmenter (baseline) or rankseg, or ProtoSeg's protoseg / rankproto"),
])
def test_what_the_prototype_heads_cannot_honour_is_a_one_line_error(change: dict, fragment: str) -> None:
    m = tiny_cfg(**change)
    with pytest.raises(UserError) as err:
        family_of(m.model).validate(m)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("model", ["deeplabv3-r101", "upernet-swint", "upernet-beitl"])
def test_every_conv_family_takes_both_heads_and_ranks_only_with_rankproto(model: str) -> None:
    fam = family_of(model)
    assert {"protoseg", "rankproto"} <= set(fam.heads)
    p, r = ModelConfig(model=model, head="protoseg"), ModelConfig(model=model, head="rankproto", kappa=50)
    assert not fam.ranks(p) and not fam.selects(p) and fam.ranks(r) and fam.selects(r)
    assert fam.describe(p) == "protoseg M=10 sinkhorn_eps=0.05 iters=3 momentum=0.999 ppc=0.01 ppd=0.01 update=argmax"
    assert fam.describe(r).startswith("rankproto kappa=50 M=10")


# ---------------------------------------------------------------------------------------
# The loss


def _algorithm_1(cos: Tensor, iters: int = 3, eps: float = 0.05) -> Tensor:
    """The supplement's Algorithm 1 on N pixels x M prototypes (float64) -> Q, N x M."""
    big_l = torch.exp(cos.t().double() / eps)
    big_l /= big_l.sum()
    m, n = big_l.shape
    for _ in range(iters):
        big_l /= big_l.sum(dim=1, keepdim=True) * m
        big_l /= big_l.sum(dim=0, keepdim=True) * n
    return (big_l * n).t()


def _ce_official(logits: Tensor, targets: Tensor) -> Tensor:
    """mmseg's CE: bilinear to the labels, summed over labelled pixels / all pixels."""
    up = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, targets, ignore_index=-1, reduction="sum") / targets.numel()


def _prototype_terms(out: ConvProtoSegOutput, protos: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """PPC and PPD by definition on the 4 x 4 grid (nearest labels): each present class's pixels
    -> Algorithm 1 over its M prototypes -> m; target column (channel of k) * M + m, where the
    channel is k (class order) or k's rank (selecting; unselected classes: no target)."""
    assert out.embeddings is not None
    b, p, _ = out.embeddings.shape
    grid = F.interpolate(labels[:, None].float(), size=(4, 4), mode="nearest").long().reshape(b, p)
    emb = out.embeddings.detach()
    cos_all, target = [], []
    for i in range(b):
        classes = torch.arange(K) if out.topk_index is None else out.topk_index[i]
        bank = protos[classes]  # C' x M x D
        cos_all.append(emb[i] @ bank.reshape(-1, bank.shape[-1]).t())  # p x C'M
        for j in range(p):
            k = int(grid[i, j])
            if k == IGNORE or k not in classes.tolist():
                target.append(-1)
                continue
            own = (grid.flatten() == k).nonzero().flatten()  # k's pixels over the batch
            q = _algorithm_1(emb.reshape(-1, emb.shape[-1])[own] @ protos[k].t())
            m = int(q.argmax(1)[(own == i * p + j).nonzero()[0, 0]])
            target.append(classes.tolist().index(k) * M + m)
    cos, t = torch.cat(cos_all), torch.tensor(target)
    keep = t >= 0
    ppc = F.cross_entropy(cos[keep], t[keep])
    ppd = ((1 - cos[keep, t[keep]]) ** 2).mean()
    return ppc, ppd


@pytest.mark.parametrize("head", ["protoseg", "rankproto"])
def test_criterion_is_ce_plus_aux_plus_weighted_ppc_and_ppd(head: str) -> None:
    # momentum 1: the update leaves the prototypes as they were, so the terms are checkable.
    cfg = TrainConfig(model=tiny_cfg(head, protoseg={"momentum": 1.0, "ppc_weight": 0.3, "ppd_weight": 0.2}))
    cfg.loss.ml_loss, cfg.loss.asl_gamma_neg, cfg.loss.ml_weight = "asl", 2.0, 10.0
    crit = family_of("deeplabv3-r18").criterion(cfg)
    model = build(cfg.model).train()
    labels = torch.randint(0, K, (2, 32, 32))
    labels[0, :8] = IGNORE
    before = model.classifier.prototypes.clone()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, ConvProtoSegOutput) and out.aux_logits is not None
    parts = crit(out, {"label": labels})
    lab = labels.masked_fill(labels == IGNORE, -1)
    aux = _ce_official(out.aux_logits, lab)
    ppc, ppd = _prototype_terms(out, before, labels)
    torch.testing.assert_close(parts["aux"], aux.detach())
    if head == "protoseg":
        torch.testing.assert_close(parts["seg"], _ce_official(out.mask_logits, lab).detach())
        torch.testing.assert_close(parts["ml"], (0.3 * ppc + 0.2 * ppd).detach(), rtol=1e-4, atol=1e-6)
        expected = parts["seg"] + parts["ml"] + 0.4 * aux
    else:
        assert out.topk_index is not None
        table = torch.full((2, K + 1), -1)  # class -> rank (unselected, ignore: none)
        for i in range(2):
            table[i, out.topk_index[i]] = torch.arange(KAPPA)
        ranks = torch.stack([table[i][lab[i].clamp(max=K).masked_fill(lab[i] < 0, K)] for i in range(2)])
        torch.testing.assert_close(parts["seg"], _ce_official(out.mask_logits, ranks).detach())
        expected = parts["seg"] + 10.0 * parts["ml"] + 0.3 * ppc + 0.2 * ppd + 0.4 * aux
    torch.testing.assert_close(parts["loss"].detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.classifier.prototypes, before)  # momentum 1: unmoved


def test_prototypes_are_unit_buffers_moved_by_the_loss_and_never_by_the_optimizer() -> None:
    cfg = TrainConfig(model=tiny_cfg(protoseg={"momentum": 0.5}))
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay = "sgd", 1.0, 0.1
    cfg.loss.ml_loss, cfg.loss.asl_gamma_neg = "asl", 2.0  # what the family's resolve would set
    model = build(cfg.model).train()
    clf = model.classifier
    assert all("prototypes" not in n for n, _ in model.named_parameters()) and not clf.prototypes.requires_grad
    opt = build_optimizer(model, cfg)  # the family's parameter groups
    assert all(p is not clf.prototypes for g in opt.param_groups for p in g["params"])
    before = clf.prototypes.clone()
    labels = torch.randint(0, K, (2, 32, 32))
    parts = family_of("deeplabv3-r18").criterion(cfg)(model(torch.randn(2, 3, 32, 32)), {"label": labels})
    moved = clf.prototypes.clone()
    assert not torch.allclose(moved, before)  # the online clustering moved some
    parts["loss"].backward()
    opt.step()
    assert torch.equal(clf.prototypes, moved)  # lr 1, weight decay 0.1: the optimizer left them alone
    torch.testing.assert_close(clf.prototypes.norm(dim=-1), torch.ones(K, M))


# ---------------------------------------------------------------------------------------
# Through the CLI

K_DATA = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("protoconv") / "data", images=6, val_images=2, num_classes=K_DATA,
                          size=32)


def test_deeplab_protoseg_trains_resumes_evaluates_and_predicts(data: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # momentum 0.5: the prototypes move visibly each step, so an unsaved buffer would break the resume.
    sets = tiny_run(kappa=5, model="deeplabv3-r18") + TINY_SETS + [
        "model.head=protoseg", "model.protoseg.prototypes=2", "model.protoseg.momentum=0.5", "data.val_split="]
    rows, rep, output = train_resume_eval_predict(data, tmp_path, monkeypatch, sets)
    assert "protoseg M=2 sinkhorn_eps=0.05 iters=3 momentum=0.5 ppc=0.01 ppd=0.01 update=argmax" in output
    for r in rows:
        assert r["aux"] > 0 and r["ml"] > 0
        assert r["loss"] == pytest.approx(r["seg"] + r["ml"] + 0.4 * r["aux"], rel=1e-5)
    assert rep["map"] is None  # no image-level scores


def test_deeplab_rankproto_trains_and_evaluates_with_its_ranking(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [*tiny_run(kappa=5, model="deeplabv3-r18"), *TINY_SETS, "model.head=rankproto", "model.protoseg.prototypes=2",
            "schedule.iters=2", "device=cpu", "data.val_split="]
    res = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), *[f"--set={s}" for s in sets]])
    assert res.exit_code == 0, res.output
    assert "rankproto kappa=5 M=2" in res.output
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["convseg"]["ml_own_embedding"] is True
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in rows if r["type"] == "train"):
        # RankSeg's seg + 10 x ASL + aux, plus the (positive) prototype terms, which are not logged apart.
        assert r["loss"] > r["seg"] + 10.0 * r["ml"] + 0.4 * r["aux"]
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["eval", str(run), "--device", "cpu", "--json", str(out), "--kappa", "3"])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["map"] is not None  # the ml branch ranks the classes
