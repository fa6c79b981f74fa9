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
from rankseg_core.losses import protoseg as losses_protoseg
from rankseg_core.losses.protoseg import (
    ProtoSegCriterion,
    assign_all_classes,
    assign_and_update,
    assign_per_class,
    momentum_update,
    ppc_loss,
    ppd_loss,
    sinkhorn,
)
from rankseg_core.losses.rankseg import RankSegCriterion
from rankseg_core.model import protoseg as model_protoseg
from rankseg_core.model.protoseg import (
    ProtoSegHead,
    ProtoSegOutput,
    chunk_pixels,
    max_cosine,
    prototype_assignment,
)
from rankseg_core.model.selection import Selection

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
    logits = F.one_hot(pred, k).float().t().reshape(1, k, 1, -1)
    return ProtoSegOutput(mask_logits=logits, embeddings=emb[None], bank=protos[None].clone(), prototypes=protos)


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
    assigned = assign_and_update(out, targets, IGN, 0.05, 3, 0.0)
    assert assigned.tolist() == [1, 0, 0, IGN]  # the prototype m of its class
    torch.testing.assert_close(protos[2], before[2])  # gamma 0: the mean of one pixel equal to each
    torch.testing.assert_close(protos[:2], before[:2])  # wrong (class 0) and ignored (class 1): unmoved
    # gamma 0 moves class 2's prototype 1 onto the (correct) pixel assigned to it.
    new_pix = F.normalize(protos[2, 1] + 0.3 * protos[0, 1], dim=0)
    out = _output(torch.stack([new_pix, protos[2, 0]]), protos, torch.tensor([2, 2]))
    assert assign_and_update(out, torch.tensor([2, 2]), IGN, 0.05, 3, 0.0).tolist() == [1, 0]
    torch.testing.assert_close(protos[2, 1], new_pix)
    torch.testing.assert_close(protos[:2], before[:2])
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(3, 2))


@pytest.mark.parametrize("m, k, present, ignored, selecting, chunk", [
    (3, 12, 5, 0.2, False, None), (1, 12, 12, 0.0, False, None), (4, 30, 7, 0.5, True, None),
    (2, 9, 3, 0.3, False, 7), (3, 6, 0, 1.0, False, None)],  # chunk: _own_cosines in several chunks
    ids=["typical", "M=1, all classes", "selecting head", "chunked", "all ignored"])
def test_every_class_at_once_equals_the_per_class_loop(m: int, k: int, present: int, ignored: float,
                                                       selecting: bool, chunk: int | None,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`assign_all_classes` (all classes in one pass, nothing read on the host: what
    `assign_and_update` runs on an accelerator) against `assign_per_class`, the released code's
    loop over the present classes (what it runs on the CPU): the same assignment
    and the same prototypes to float rounding, absent classes' prototypes untouched, in several
    steps from the same start (wrong predictions, ignored pixels, a selecting head's rank order)."""
    if chunk is not None:
        monkeypatch.setattr(losses_protoseg, "OWN_PROTOTYPES_CHUNK", chunk * m * 8)
    g = torch.Generator().manual_seed(k * 10 + m)
    n, d = 300, 8
    protos = F.normalize(torch.randn(k, m, d, generator=g), dim=-1)
    twin, start = protos.clone(), protos.clone()
    classes = torch.randperm(k, generator=g)[:present]
    for _ in range(3):
        targets = classes[torch.randint(0, max(present, 1), (n,), generator=g)] if present else torch.zeros(n).long()
        targets[torch.rand(n, generator=g) < ignored] = IGN
        # Embeddings near their class's prototypes, so the assignment is not a coin toss.
        near = protos[targets.clamp(max=k - 1), torch.randint(0, m, (n,), generator=g)]
        emb = F.normalize(near + 0.3 * torch.randn(n, d, generator=g), dim=-1)
        pred = torch.where(torch.rand(n, generator=g) < 0.7, targets.clamp(max=k - 1), torch.randint(0, k, (n,), generator=g))
        if selecting:  # the head's channels are a permutation of the classes
            order = torch.randperm(k, generator=g)
            logits = F.one_hot(torch.argsort(order)[pred], k).float().t().reshape(1, k, 1, -1)
            topk = order[None]
        else:
            logits, topk = F.one_hot(pred, k).float().t().reshape(1, k, 1, -1), None
        got = assign_all_classes(ProtoSegOutput(mask_logits=logits, embeddings=emb[None], prototypes=protos,
                                                topk_index=topk), targets, IGN, 0.05, 3, 0.9)
        ref = assign_per_class(ProtoSegOutput(mask_logits=logits, embeddings=emb[None], prototypes=twin,
                                                topk_index=topk), targets, IGN,
                               0.05, 3, 0.9)
        assert torch.equal(got, ref)
        torch.testing.assert_close(protos, twin, rtol=0, atol=1e-6)
    absent = torch.ones(k, dtype=torch.bool)
    absent[classes] = False
    torch.testing.assert_close(protos[absent], start[absent], rtol=0, atol=1e-6)  # never moved


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
    keep = grid != IGN
    target = grid * 3 + assign_and_update(out, grid, IGN, 0.05, 3, 1.0)  # k * M + m
    cos = torch.einsum("pd,kmd->pkm", out.embeddings.detach().reshape(8, -1), before).reshape(8, 12)
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


@pytest.mark.parametrize("head, words", [
    ("protoseg", "protoseg M=2 sinkhorn_eps=0.05 iters=3 momentum=0.5 ppc=0.01 ppd=0.01 update=argmax"),
    ("rankproto", "rankproto kappa=20 M=2 sinkhorn_eps=0.05 iters=3 momentum=0.5 ppc=0.01 ppd=0.01 update=argmax"),
])
def test_prototype_heads_train_resume_evaluate_and_predict(head: str, words: str, data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # momentum 0.5: the prototypes move visibly each step, so an unsaved buffer would break the resume.
    # kappa 20 of 40: the crops' classes are mostly selected, so the selected-class terms are not empty.
    sets = tiny_run(kappa=20) + [f"model.head={head}", "model.protoseg.prototypes=2", "model.protoseg.momentum=0.5",
                                "data.val_split="]
    rows, rep, output = train_resume_eval_predict(data, tmp_path, monkeypatch, sets)
    assert words in output
    if head == "protoseg":
        for r in rows:
            assert r["loss"] == pytest.approx(r["seg"] + r["ml"], rel=1e-5)
        assert rep["map"] is None  # no image-level scores
    else:  # the prototype terms are in the loss on top of RankSeg's seg + 10 * ml (ppc ~ log(K*M) > 0)
        for r in rows:
            assert r["loss"] > r["seg"] + 10 * r["ml"]
        assert rep["map"] is not None  # the ml branch's image-level scores


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


# ---- bounded memory: chunked cosines ------------------------------------------------------

def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("shared", [True, False])
def test_chunked_max_cosine_and_ppc_equal_the_full_computation(shared: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    emb = _unit(2, 7, 5, seed=4).requires_grad_()
    bank = _unit(1 if shared else 2, 3, 4, 5, seed=5)  # C = 3 classes, M = 4
    target = torch.tensor([[0, 5, -1, 11, 2, 7, 3], [-1, -1, 1, 4, 8, 9, 10]])
    full = torch.einsum("bpd,bkmd->bpkm", emb, bank.expand(2, -1, -1, -1))
    ref_max = full.amax(-1)
    keep = target >= 0
    ref_ppc = F.cross_entropy(full.flatten(2)[keep], target[keep])
    (g_ref,) = torch.autograd.grad(ref_max.square().sum() + ref_ppc, emb)
    monkeypatch.setattr(model_protoseg, "CHUNK_COSINES", 2 * 3 * 4 * 2)  # 2 pixels per chunk: 4 chunks
    assert chunk_pixels(2, 3, 4) == 2 and chunk_pixels(2, 3, 4, 7) == 2  # 7 pixels: 2 + 2 + 2 + 1
    assert chunk_pixels(2, 3, 4, 5) == 2 and chunk_pixels(2, 3, 5, 7) == 1
    got_max, got_ppc = max_cosine(emb, bank), ppc_loss(emb, bank, target)
    torch.testing.assert_close(got_max, ref_max)
    torch.testing.assert_close(got_ppc, ref_ppc)
    (g,) = torch.autograd.grad(got_max.square().sum() + got_ppc, emb)
    torch.testing.assert_close(g, g_ref)
    ppd = ((1 - full.flatten(2)[keep].gather(1, target[keep][:, None])) ** 2).mean()
    torch.testing.assert_close(ppd_loss(emb, bank, target), ppd)


def test_memory_at_847_classes_stays_within_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    # K = 847, M = 10 on a 32 x 32 patch grid: the full cosines would be 2 x 1024 x 8470 = 17.3M
    # floats; no computed or saved tensor may hold more than one chunk of them.
    monkeypatch.setattr(model_protoseg, "CHUNK_COSINES", 1 << 21)
    k, m, d, p = 847, 10, 8, 1024
    emb = _unit(2, p, d, seed=6).requires_grad_()
    bank = _unit(1, k, m, d, seed=7)
    target = torch.randint(0, k * m, (2, p), generator=torch.Generator().manual_seed(8))
    biggest = {"computed": 0, "saved": 0}
    real = model_protoseg.cosines

    def watched(e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real(e, b)
        biggest["computed"] = max(biggest["computed"], out.numel())
        return out

    def pack(t: torch.Tensor) -> torch.Tensor:
        biggest["saved"] = max(biggest["saved"], t.numel())
        return t

    monkeypatch.setattr(model_protoseg, "cosines", watched)
    monkeypatch.setattr(losses_protoseg, "cosines", watched)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = max_cosine(emb, bank).sum() + ppc_loss(emb, bank, target)
    loss.backward()
    assert 0 < biggest["computed"] <= 1 << 21 < 2 * p * k * m
    assert biggest["saved"] <= max(2 * p * k, k * m * d)  # the B x p x K scores / the bank, never B x p x K x M


# ---- RankSeg + prototypes (head rankproto) ----------------------------------------------------

def _rankproto(kappa: int = 2, **model: object) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=5, img_size=32, head="rankproto", kappa=kappa, protoseg=ProtoSegConfig(prototypes=3),
                      **model)  # type: ignore[arg-type]
    return SEGMENTER.build(cfg)


def test_rankproto_classifies_among_the_top_kappa_classes_prototypes_with_per_rank_scale() -> None:
    model = _rankproto(kappa=2)
    head = model.head
    assert head.uses_ml and head.selects and head.mask_norm.weight.shape == (2,)
    with torch.no_grad():
        head.mask_norm.weight.copy_(torch.tensor([2.0, 0.5]))  # distinct 1/tau per rank
        head.prototypes.copy_(_unit(5, 3, head.prototypes.shape[-1], seed=9))
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    out = model(images)
    assert out.ml_logits is not None and out.topk_index is not None
    top = out.ml_logits.argsort(1, descending=True)[:, :2]
    assert torch.equal(out.topk_index, top)
    assert out.mask_logits.shape == (2, 2, 2, 2)
    best = torch.einsum("bpd,bkmd->bpkm", out.embeddings, head.prototypes[top]).amax(-1)  # B x p x kappa
    ref = F.layer_norm(best, (2,), head.mask_norm.weight, head.mask_norm.bias, 1e-5)
    torch.testing.assert_close(out.mask_logits.flatten(2).transpose(1, 2), ref, rtol=1e-4, atol=1e-5)
    # --kappa at evaluation: more classes, the last rank's scale repeated (as RankSeg).
    wide = model(images, Selection(kappa=4))
    assert wide.mask_logits.shape[1] == 4 and torch.equal(wide.topk_index[:, :2], top)


def test_rankproto_loss_is_rankseg_plus_prototype_terms_over_the_selected_classes_only() -> None:
    model = _rankproto(kappa=2)
    model.train()
    labels = torch.randint(0, 5, (2, 32, 32), generator=torch.Generator().manual_seed(10))
    out = model(torch.randn(2, 3, 32, 32))
    before = model.head.prototypes.clone()
    ranking = RankSegCriterion(5, IGN, "asl", 10.0)
    res = ProtoSegCriterion(5, IGN, ppc_weight=0.3, ppd_weight=0.2, momentum=1.0, ranking=ranking)(out, labels)
    base = ranking(out, labels)
    grid = F.interpolate(labels[:, None].float(), size=(2, 2), mode="nearest").long().reshape(2, 4)
    assigned = assign_and_update(out, grid.flatten(), IGN, 0.05, 3, 1.0).reshape(2, 4)
    # Independently: the rank of each patch's class in its image's selection (-1 = not selected).
    rank = torch.tensor([[row.tolist().index(c) if c in row.tolist() else -1 for c in g.tolist()]
                         for row, g in zip(out.topk_index, grid, strict=True)])
    target = torch.where(rank >= 0, rank * 3 + assigned, -1)
    cos = torch.einsum("bpd,bkmd->bpkm", out.embeddings.detach(), before[out.topk_index]).flatten(2)  # B x p x 6
    keep = target >= 0
    assert keep.any() and not keep.all()  # the case tests both kinds of pixel
    ppc = F.cross_entropy(cos[keep], target[keep])
    ppd = ((1 - cos[keep].gather(1, target[keep][:, None])) ** 2).mean()
    torch.testing.assert_close(res["loss"].detach(), base["loss"].detach() + 0.3 * ppc + 0.2 * ppd)
    assert res["seg"] == base["seg"] and res["ml"] == base["ml"]


def test_prototype_assignment_is_the_nearest_prototype_of_the_predicted_class() -> None:
    protos = _unit(3, 2, 6, seed=11)
    # Pixel 0 predicted class 1 and nearest to its prototype 1; pixel 1 predicted class 2, nearest to 0.
    emb = torch.stack([protos[1, 1], F.normalize(protos[2, 0] + 0.1 * protos[2, 1], dim=0)])
    logits = torch.tensor([[[[0.0, 0.0]], [[5.0, 0.0]], [[0.0, 5.0]]]])  # 1 x K x 1 x 2
    out = ProtoSegOutput(mask_logits=logits, embeddings=emb[None], bank=protos[None], prototypes=protos)
    cls, proto = prototype_assignment(out)
    assert cls.tolist() == [[[1, 2]]] and proto.tolist() == [[[1, 0]]]
    # Rank order: channel r is class topk_index[r].
    ranked = ProtoSegOutput(mask_logits=logits[:, [2, 1]], topk_index=torch.tensor([[2, 1]]), embeddings=emb[None],
                            bank=protos[[2, 1]][None], prototypes=protos)
    cls, proto = prototype_assignment(ranked)
    assert cls.tolist() == [[[1, 2]]] and proto.tolist() == [[[1, 0]]]


def test_rankproto_refuses_the_oracle_and_clips_in_one_line() -> None:
    for extra in ({"oracle": True}, {"clip_len": 2}):
        with pytest.raises(UserError, match="--head rankproto") as err:
            _rankproto(**extra)
        assert "\n" not in str(err.value)
