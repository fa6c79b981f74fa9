"""ESSNet on Segmenter (supplement Table 1, 3, 4, `--head essnet`): distances, the head's logits
and 1-NN against cdist, the kNN candidate search against a brute-force sort, the loss and the
margin regulariser by hand, parameter and FLOP counts against the layer shapes, and a tiny run
through the CLI (train, exact resume, eval, predict)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, make_synthetic, overfit, tiny_run, train_resume_eval_predict
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.model import EssNetConfig, ModelConfig
from rankseg_core.engine.model_stats import count_flops, count_parameters
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.losses.essnet import EssNetCriterion, candidate_index, knn_hits, margin_regulariser
from rankseg_core.model.essnet import EssNetHead, EssNetOutput, pairwise_distance
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE

K = 12
K_DATA = 40  # the synthetic data's smallest vocabulary


def test_pairwise_distance_equals_cdist() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(pairwise_distance(a, b), torch.cdist(a, b))
    same = torch.randn(1, 3, 4, requires_grad=True)
    d = pairwise_distance(same, same)
    d.sum().backward()
    assert float(d.detach().diagonal(dim1=1, dim2=2).max()) <= 1e-6 and bool(torch.isfinite(same.grad).all())


def _model(**ess) -> torch.nn.Module:
    torch.manual_seed(0)
    return SEGMENTER.build(ModelConfig(num_classes=K, img_size=32, head="essnet", essnet=EssNetConfig(dim=8, **ess)))


def _reference_embeddings(head: EssNetHead, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fork's MaskTransformerNNCEESSNetHead.forward up to the normalised embeddings."""
    x = head.proj_dec(feats.flatten(2).transpose(1, 2))
    p = x.shape[1]
    x = torch.cat([x, head.cls_emb.expand(feats.shape[0], -1, -1)], 1)
    for blk in head.blocks:
        x = blk(x)
    x = head.decoder_norm(x)
    patches, classes = x[:, :p] @ head.proj_patch, x[:, p:] @ head.proj_classes
    return patches / patches.norm(dim=-1, keepdim=True), classes / classes.norm(dim=-1, keepdim=True)


def test_head_logits_are_minus_t_distance_and_their_argmax_is_the_nearest_class() -> None:
    model = _model().eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
        pix, cls = _reference_embeddings(model.head, feats)
    assert isinstance(out, EssNetOutput) and out.topk_index is None
    assert out.mask_logits.shape == (2, K, 2, 3) and out.class_emb.shape == (2, K, 8)
    assert not hasattr(model.head, "mask_norm")
    dist = torch.cdist(pix.double(), cls.double())  # B x p x K
    want = (-20.0 * dist).transpose(1, 2).reshape(2, K, 2, 3)
    torch.testing.assert_close(out.mask_logits.double(), want, atol=1e-4, rtol=1e-5)
    nearest = dist.argmin(-1).reshape(2, 2, 3)  # 1-NN over all K classes, per patch
    assert torch.equal(out.mask_logits.argmax(1), nearest)
    torch.testing.assert_close(out.class_emb, cls)

    # GT (eval): classes outside each image's list lose the argmax.
    restricted = model(x, Selection(override=[torch.tensor([2, 5]), torch.tensor([9])])).mask_logits
    assert set(restricted[0].argmax(0).flatten().tolist()) <= {2, 5} and set(restricted[1].argmax(0).unique().tolist()) == {9}


def test_layernorm_logits_are_the_forks_head() -> None:
    model = _model(logits="layernorm").eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        pix, cls = _reference_embeddings(model.head, model.forward_features(x))
    norm = model.head.mask_norm
    want = F.layer_norm(pix @ cls.transpose(1, 2), (K,), norm.weight, norm.bias, 1e-5)
    torch.testing.assert_close(out.mask_logits, want.transpose(1, 2).reshape(1, K, 2, 2))


def _brute_force(logits: torch.Tensor, targets: torch.Tensor, k: int, mode: str) -> torch.Tensor:
    b, num, h, w = logits.shape
    rows = []
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(targets[i, y, x])
                t = t if 0 <= t < num else 0
                order = sorted(range(num), key=lambda c: -float(logits[i, c, y, x]))
                if mode == "distinct":
                    near = [c for c in order if c != t][:k]
                else:
                    near = [max(0, c - 1) if c == t and 0 <= int(targets[i, y, x]) < num else c for c in order[:k]]
                rows.append([t, *near])
    return torch.tensor(rows).reshape(b, h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("mode", ["distinct", "official"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_candidates_match_a_brute_force_sort(mode: str, k: int) -> None:
    torch.manual_seed(k)
    logits = torch.randn(2, 7, 2, 3)
    targets = torch.tensor([[[0, 3, 6], [IGNORE, 2, 0]], [[5, 5, 1], [4, IGNORE, 0]]])
    got = candidate_index(logits, targets, k, mode)
    assert torch.equal(got, _brute_force(logits, targets, k, mode))
    if mode == "distinct":  # every slot a different class
        assert all(len(set(got[i, :, y, x].tolist())) == got.shape[1]
                   for i in range(2) for y in range(2) for x in range(3))


def test_loss_and_regulariser_by_hand_on_two_pixels() -> None:
    """K = 4 unit class embeddings in 2-d (c3 0.1 rad from c0), two pixels of target 0,
    k = 2, T = 20: CE over [target, 2 nearest others] averaged over the 2 pixels, plus the hinge
    (1/K) sum_c max(0, 0.2 - nearest other distance)."""
    angles = [0.0, math.pi / 2, math.pi, 0.1]
    classes = [(math.cos(a), math.sin(a)) for a in angles]
    pixels = [(math.cos(0.3), math.sin(0.3)), (-0.6, 0.8)]
    targets = [0, 0]

    def dist(u: tuple[float, float], v: tuple[float, float]) -> float:
        return math.hypot(u[0] - v[0], u[1] - v[1])

    z = [[-20.0 * dist(p, c) for c in classes] for p in pixels]  # logits per pixel
    ce = 0.0
    for zp, t in zip(z, targets):
        others = sorted((c for c in range(4) if c != t), key=lambda c: -zp[c])[:2]
        slots = [zp[t]] + [zp[c] for c in others]
        ce += math.log(sum(math.exp(v) for v in slots)) - zp[t]
    ce /= 2
    nearest = [min(dist(classes[c], classes[o]) for o in range(4) if o != c) for c in range(4)]
    reg = sum(max(0.0, 0.2 - n) for n in nearest) / 4
    assert reg > 0  # c0 and c3 are 0.0999 apart

    logits = torch.tensor(z, dtype=torch.float64).t().reshape(1, 4, 1, 2)
    out = EssNetOutput(mask_logits=logits, class_emb=torch.tensor([classes], dtype=torch.float64))
    res = EssNetCriterion(4, IGNORE, k=2, margin=0.2)(out, torch.tensor([[targets]]))
    assert float(res["seg"]) == pytest.approx(ce, rel=1e-6)  # the CE runs in float32
    assert float(res["ml"]) == pytest.approx(reg, rel=1e-6)
    assert float(res["loss"]) == pytest.approx(ce + reg, rel=1e-6)
    # Class 0 is pixel 1's 2nd nearest (after c3) and pixel 2's farthest: half covered at k = 2.
    assert float(res["coverage"]) == 0.5


def test_official_candidates_and_valid_norm_by_hand() -> None:
    """'official': a neighbour equal to the target becomes class t - 1 (t = 0: class 0, the target
    again); "valid" averages over labelled pixels only (an ignored third pixel)."""
    z = torch.tensor([[0.0, -1.0, -3.0], [-2.0, 0.0, -0.5], [-0.5, -4.0, -1.0]])  # K x 3 pixels
    labels = torch.tensor([[[2, 0, IGNORE]]])
    out = EssNetOutput(mask_logits=z.reshape(1, 3, 1, 3))
    res = EssNetCriterion(3, IGNORE, k=2, margin=0.0, candidates="official", seg_loss_norm="valid")(out, labels)
    # pixel 0 (t=2): nearest 2 = [0, 2]; 2 is the target -> 1: slots [2, 0, 1]
    # pixel 1 (t=0): nearest 2 = [1, 0]; 0 is the target -> -1 -> 0: slots [0, 1, 0], the target twice
    ce0 = math.log(math.exp(-0.5) + math.exp(0.0) + math.exp(-2.0)) + 0.5
    ce1 = math.log(2 * math.exp(-1.0) + math.exp(0.0)) + 1.0
    assert float(res["seg"]) == pytest.approx((ce0 + ce1) / 2, rel=1e-6)
    # t = 0 among the neighbours: it is replaced by class 0 again (both official codes' quirk).
    index = candidate_index(torch.tensor([[[[3.0]], [[1.0]], [[2.0]]]]), torch.tensor([[[0]]]), 2, "official")
    assert index.flatten().tolist() == [0, 0, 2]


def test_margin_regulariser_is_zero_for_separated_or_single_classes() -> None:
    spread = F.normalize(torch.eye(3)[None], dim=-1)  # pairwise distance sqrt(2)
    assert float(margin_regulariser(spread, 0.2)) == 0.0
    assert float(margin_regulariser(torch.ones(2, 1, 4) / 2, 0.2)) == 0.0


def test_gradients_reach_only_the_candidate_slots() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 9, 4, 4, requires_grad=True)
    labels = torch.randint(0, 9, (2, 4, 4))
    labels[0, 0, 0] = IGNORE
    res = EssNetCriterion(9, IGNORE, k=3, margin=0.0)(EssNetOutput(mask_logits=logits), labels)
    res["loss"].backward()
    idx = candidate_index(logits.detach(), labels, 3)
    used = torch.zeros(2, 9, 4, 4, dtype=torch.bool).scatter_(1, idx, True)
    used[0, :, 0, 0] = False  # the ignored pixel contributes nothing
    assert bool((logits.grad[~used] == 0).all()) and bool((logits.grad[used] != 0).all())
    h, n = knn_hits(logits.detach(), labels, 3)
    assert int(n) == 31 and float(res["coverage"]) == pytest.approx(int(h) / 31)


def test_a_tiny_essnet_head_learns_a_fixed_batch() -> None:
    model = _model(margin=0.2).train()
    crit = EssNetCriterion(K, IGNORE, k=4)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, K, (2, 1, 1)).expand(2, 32, 32).clone()  # one class per image
    losses = overfit(model, crit, images, labels, steps=15)
    assert losses[-1] < 0.5 * losses[0]


def _head_params(d: int, k: int, depth: int, e: int, layernorm: bool) -> int:
    block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) + 4 * d
    decoder = k * d + (d * d + d) + depth * block + 2 * d  # cls_emb, proj_dec, blocks, decoder_norm
    return decoder + 2 * d * e + (2 * k if layernorm else 0)  # proj_patch, proj_classes (D x d), LayerNorm(K)


@pytest.mark.parametrize("logits", ["distance", "layernorm"])
def test_parameter_count_matches_the_layer_shapes(logits: str) -> None:
    cfg = ModelConfig(num_classes=K, img_size=32, head="essnet", essnet=EssNetConfig(dim=16, logits=logits))
    assert count_parameters(EssNetHead(cfg, 192)) == _head_params(192, K, 2, 16, logits == "layernorm")


VIT_B_512 = 3 * 16 * 16 * 768 + 768 + 768 + 1025 * 768 + 12 * (12 * 768 * 768 + 13 * 768) + 2 * 768


@pytest.mark.parametrize("k, printed", [(150, 101.42), (171, 101.43), (1284, 102.29)])
@pytest.mark.parametrize("logits", ["distance", "layernorm"])
def test_table1_essnet_rows(k: int, printed: float, logits: str) -> None:
    with torch.device("meta"):
        model = SEGMENTER.build(ModelConfig(model="segmenter-vitb", num_classes=k, head="essnet",
                                            essnet=EssNetConfig(logits=logits)))
    n = count_parameters(model)
    assert n == VIT_B_512 + _head_params(768, k, 2, 64, logits == "layernorm")
    assert round(n / 1e6, 2) == pytest.approx(printed)


def test_flops_shrink_with_the_projection_width() -> None:
    """Against the baseline, ESSNet saves (p + K) x D x (D - d) projection MACs and p x K x (D - d)
    in the pixel-class product (the p x K distance matmul runs at width d); Table 4's cost grows
    with d."""
    base_cfg = ModelConfig(num_classes=K, img_size=32, head="segmenter")
    base = count_flops(SEGMENTER.build(base_cfg), base_cfg)["macs"]
    d, p = 192, 4
    macs = {}
    for e in (8, 16, 32):
        cfg = ModelConfig(num_classes=K, img_size=32, head="essnet", essnet=EssNetConfig(dim=e))
        macs[e] = count_flops(SEGMENTER.build(cfg), cfg)["macs"]
        assert base - macs[e] == (p + K) * d * (d - e) + p * K * (d - e)
    assert macs[8] < macs[16] < macs[32]


# ---------------------------------------------------------------------------------------
# Through the CLI

runner = CliRunner()
SETS = [a for s in tiny_run(kappa=6) for a in ("--set", s)] + ["--set", "model.essnet.dim=16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("essnet") / "data", images=6, val_images=2, num_classes=K_DATA,
                          size=32)


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_essnet_trains_resumes_evaluates_and_predicts(data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sets = tiny_run(kappa=3) + ["model.head=essnet", "model.essnet.dim=16", "data.val_split="]
    rows, rep, output = train_resume_eval_predict(data, tmp_path, monkeypatch, sets)
    assert "essnet dim=16 k=3 logits=distance T=20 margin=0.2" in output  # model.kappa sets k
    for r in rows:  # loss = kNN CE + margin regulariser (logged as "ml"); coverage = kNN hit rate
        assert r["loss"] == pytest.approx(r["seg"] + r["ml"], rel=1e-5) and 0.0 <= r["coverage"] <= 1.0
    assert rep["map"] is None  # no image-level scores


@pytest.mark.parametrize("extra, fragments", [
    (["--oracle", "train-eval"], ["--head essnet classifies every pixel over all K"]),
    (["--set", "model.essnet.dim=0"], ["model.essnet.dim=0 must be >= 1"]),
    (["--set", "model.essnet.k=0"], ["model.essnet.k=0 must be >= 1"]),
    (["--set", "model.essnet.temperature=0"], ["model.essnet.temperature=0.0 must be > 0"]),
    (["--set", "model.essnet.logits=cosine"], ["model.essnet.logits='cosine' is unknown"]),
    (["--set", "model.essnet.candidates=all"], ["model.essnet.candidates='all' is unknown"]),
    (["--set", "model.clip_len=2"], ["--head essnet segments single images"]),
])
def test_bad_options_are_refused_in_one_line(data: Path, tmp_path: Path, extra: list[str],
                                             fragments: list[str]) -> None:
    res = _cli("train", "--data", data, "--out", tmp_path / "run", "--head", "essnet", "--iters", 1,
               "--device", "cpu", *SETS, *extra)
    assert_one_line_error(res, *fragments)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
