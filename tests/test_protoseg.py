"""ProtoSeg's prototype head on Segmenter (`--head protoseg`, issue 20): model/protoseg.py, losses/protoseg.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_synthetic, tiny_run, train_resume_eval_predict

from rankseg_core.config.model import ModelConfig, ProtoSegConfig
from rankseg_core.errors import UserError
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.losses.protoseg import ProtoSegCriterion, assign_and_update, momentum_update, sinkhorn
from rankseg_core.model.protoseg import ProtoSegHead, ProtoSegOutput

IGN = 65535
K_DATA = 40  # the synthetic data's smallest vocabulary


def _algorithm_1(p: torch.Tensor, x: torch.Tensor, iters: int = 3, kappa: float = 0.05) -> torch.Tensor:
    """The supplement's Algorithm 1 verbatim (P: D x K prototypes, X: D x N pixels -> L: K x N), in float64."""
    big_l = torch.exp(p.t().double() @ x.double() / kappa)
    big_l /= big_l.sum()
    k, n = big_l.shape
    for _ in range(iters):
        big_l /= big_l.sum(dim=1, keepdim=True)
        big_l /= k
        big_l /= big_l.sum(dim=0, keepdim=True)
        big_l /= n
    return big_l * n


def test_sinkhorn_is_algorithm_1_and_each_pixel_sums_to_one() -> None:
    g = torch.Generator().manual_seed(0)
    protos = F.normalize(torch.randn(8, 4, generator=g), dim=0)  # D x M
    pixels = F.normalize(torch.randn(8, 30, generator=g), dim=0)  # D x N
    q = sinkhorn(pixels.t() @ protos, 0.05, 3)  # N x M
    ref = _algorithm_1(protos, pixels)
    torch.testing.assert_close(q.double(), ref.t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(30))  # the paper's columns: one unit per pixel


def test_sinkhorn_balances_two_clusters_that_argmax_collapses() -> None:
    # Both clusters are nearer prototype 0; the equipartition gives the second cluster prototype 1.
    cos = torch.tensor([[0.9, 0.5]] * 10 + [[0.8, 0.7]] * 10)
    assert (cos.argmax(1) == 0).all()
    index = sinkhorn(cos, 0.05, 3).argmax(1)
    assert index.tolist() == [0] * 10 + [1] * 10


def test_momentum_update_limits_and_correct_pixels_only() -> None:
    g = torch.Generator().manual_seed(1)
    protos = F.normalize(torch.randn(2, 5, generator=g), dim=-1)
    emb = F.normalize(torch.randn(4, 5, generator=g), dim=-1)
    onehot = F.one_hot(torch.tensor([0, 0, 1, 1]), 2).float()
    correct = torch.tensor([True, True, False, False])
    mean0 = F.normalize(emb[0] + emb[1], dim=0)
    out = momentum_update(protos, emb, onehot, correct, 0.0)
    torch.testing.assert_close(out[0], mean0)  # gamma 0: the normalised mean of its correct pixels
    torch.testing.assert_close(out[1], protos[1])  # only wrong pixels assigned: untouched
    torch.testing.assert_close(momentum_update(protos, emb, onehot, correct, 1.0), protos)  # gamma 1: unchanged
    mid = momentum_update(protos, emb, onehot, correct, 0.5)
    torch.testing.assert_close(mid[0], F.normalize(0.5 * protos[0] + 0.5 * mean0, dim=0))


def _output(emb: torch.Tensor, protos: torch.Tensor, pred: torch.Tensor) -> ProtoSegOutput:
    """A 1 x p ProtoSegOutput on a 1 x p grid whose argmax is `pred` (p,)."""
    k = protos.shape[0]
    cos = torch.einsum("pd,kmd->pkm", emb, protos)[None]
    logits = F.one_hot(pred, k).float().t().reshape(1, k, 1, -1)
    return ProtoSegOutput(mask_logits=logits, embeddings=emb[None], proto_cos=cos, prototypes=protos)


def test_assign_and_update_targets_and_that_wrong_or_ignored_pixels_never_move_a_prototype() -> None:
    g = torch.Generator().manual_seed(2)
    protos = F.normalize(torch.randn(3, 2, 6, generator=g), dim=-1)  # K = 3, M = 2
    # Pixels 0 / 1 sit on prototypes (2, 1) / (2, 0), pixel 2 on (0, 0), pixel 3 on (1, 1) but ignored.
    # (Identical pixels of one class would be split evenly by the equipartition: a tie.)
    emb = torch.stack([protos[2, 1], protos[2, 0], protos[0, 0], protos[1, 1]])
    targets = torch.tensor([2, 2, 0, IGN])
    pred = torch.tensor([2, 2, 1, 1])  # class 0's pixel is wrong
    before = protos.clone()
    out = _output(emb, protos, pred)
    ppc_target = assign_and_update(out, targets, IGN, 0.05, 3, 0.0)
    assert ppc_target.tolist() == [2 * 2 + 1, 2 * 2 + 0, 0 * 2 + 0, IGN]  # k * M + m
    torch.testing.assert_close(protos[2], before[2])  # gamma 0: the mean of one pixel equal to each
    torch.testing.assert_close(protos[:2], before[:2])  # wrong (class 0) and ignored (class 1): unmoved
    # gamma 0 moves class 2's prototype 1 onto the (correct) pixel assigned to it.
    new_pix = F.normalize(protos[2, 1] + 0.3 * protos[0, 1], dim=0)
    out = _output(torch.stack([new_pix, protos[2, 0]]), protos, torch.tensor([2, 2]))
    assert assign_and_update(out, torch.tensor([2, 2]), IGN, 0.05, 3, 0.0).tolist() == [5, 4]
    torch.testing.assert_close(protos[2, 1], new_pix)
    torch.testing.assert_close(protos[:2], before[:2])
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(3, 2))


def _model(**proto: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=4, img_size=32, head="protoseg", protoseg=ProtoSegConfig(prototypes=3, **proto))
    return SEGMENTER.build(cfg)


def test_head_logits_are_layernorm_of_the_max_cosine_and_prototypes_are_unit_buffers() -> None:
    model = _model()
    head = model.head
    assert isinstance(head, ProtoSegHead)
    assert "head.prototypes" in model.state_dict()  # checkpointed, so resume is exact
    assert all("prototypes" not in n for n, _ in model.named_parameters())
    assert not head.prototypes.requires_grad
    torch.testing.assert_close(head.prototypes.norm(dim=-1), torch.ones(4, 3))
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    assert isinstance(out, ProtoSegOutput) and out.mask_logits.shape == (2, 4, 2, 2)
    emb = head.embed(model.forward_features(images))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2, 4))
    best = torch.einsum("bpd,kmd->bpkm", emb, head.prototypes).amax(-1)  # B x p x K
    ref = F.layer_norm(best, (4,), head.mask_norm.weight, head.mask_norm.bias, 1e-5)
    torch.testing.assert_close(out.mask_logits.flatten(2).transpose(1, 2), ref, rtol=1e-4, atol=1e-5)


def test_criterion_is_ce_plus_weighted_ppc_ppd_and_the_optimizer_never_touches_prototypes() -> None:
    model = _model(momentum=1.0)  # gamma 1: the update leaves the prototypes, so the loss is checkable
    model.train()
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    labels[0, :16] = IGN
    before = model.head.prototypes.clone()
    out = model(images)
    crit = ProtoSegCriterion(4, IGN, ppc_weight=0.3, ppd_weight=0.2, momentum=1.0)
    res = crit(out, labels)
    grid = F.interpolate(labels[:, None].float(), size=(2, 2), mode="nearest").long().flatten()
    target = assign_and_update(out, grid, IGN, 0.05, 3, 1.0)
    cos = out.proto_cos.detach().reshape(8, 12)
    keep = target != IGN
    ppc = F.cross_entropy(cos[keep], target[keep])
    ppd = ((1 - cos[keep, target[keep]]) ** 2).mean()
    torch.testing.assert_close(res["ml"], 0.3 * ppc + 0.2 * ppd)
    torch.testing.assert_close(res["loss"].detach(), res["seg"] + res["ml"])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    res["loss"].backward()
    opt.step()
    torch.testing.assert_close(model.head.prototypes, before)


@pytest.mark.parametrize("key, value, fragment", [
    ("prototypes", 0, "model.protoseg.prototypes=0 must be >= 1"),
    ("sinkhorn_eps", 0.0, "model.protoseg.sinkhorn_eps=0.0 must be > 0"),
    ("momentum", 1.5, "model.protoseg.momentum=1.5 must be in [0, 1]"),
    ("update", "soft", "model.protoseg.update='soft' is unknown"),
])
def test_bad_options_are_one_line_user_errors(key: str, value: object, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")) as err:
        ModelConfig(head="protoseg", protoseg=ProtoSegConfig(**{key: value})).validate()  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("protoseg") / "data", images=6, val_images=2, num_classes=K_DATA,
                          size=32)


def test_protoseg_trains_resumes_evaluates_and_predicts(data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # momentum 0.5: the prototypes move visibly each step, so an unsaved buffer would break the resume.
    sets = tiny_run(kappa=3) + ["model.head=protoseg", "model.protoseg.prototypes=2", "model.protoseg.momentum=0.5",
                                "data.val_split="]
    rows, rep, output = train_resume_eval_predict(data, tmp_path, monkeypatch, sets)
    assert "protoseg M=2 sinkhorn_eps=0.05 iters=3 momentum=0.5 ppc=0.01 ppd=0.01 update=argmax" in output
    for r in rows:
        assert r["loss"] == pytest.approx(r["seg"] + r["ml"], rel=1e-5)
    assert rep["map"] is None  # no image-level scores


def test_gumbel_update_keeps_the_argmax_targets_and_unit_prototypes() -> None:
    torch.manual_seed(3)
    protos = F.normalize(torch.randn(2, 3, 4), dim=-1)
    emb = F.normalize(torch.randn(6, 4), dim=-1)
    targets = torch.tensor([0, 0, 0, 1, 1, IGN])
    out = _output(emb, protos.clone(), torch.tensor([0, 0, 0, 1, 1, 1]))
    ref = assign_and_update(out, targets, IGN, 0.05, 3, 0.9)
    out = _output(emb, protos.clone(), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert torch.equal(assign_and_update(out, targets, IGN, 0.05, 3, 0.9, "gumbel"), ref)  # the loss's targets
    assert out.prototypes is not None
    torch.testing.assert_close(out.prototypes.norm(dim=-1), torch.ones(2, 3))
