"""The GT (eval) oracle filled up to kappa (`rankseg eval --oracle --oracle-fill ranked|random`):
hand-built selections for both model families, the random draw, and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_m2f_model as tiny_model

from rankseg_core.config.model import ModelConfig
from rankseg_core.engine.evaluate import EvalOptions
from rankseg_core.errors import UserError
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.model.selection import Selection, SelectionOptions, fill_from_ranking, random_fill


def test_fill_from_ranking_hand_built() -> None:
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.8],    # ranking 1, 4, 2, 3, 0
                           [0.0, 0.1, 0.2, 0.3, 0.4]])   # ranking 4, 3, 2, 1, 0
    out = fill_from_ranking([torch.tensor([3, 65535]), torch.tensor([0, 1, 2, 0])], logits, 3)
    assert sorted(out[0].tolist()) == [1, 3, 4]  # GT 3 (ignore dropped) + the two best others
    assert sorted(out[1].tolist()) == [0, 1, 2]  # already 3 classes: kept whole, nothing added
    assert sorted(fill_from_ranking([torch.tensor([], dtype=torch.long)], logits[:1], 2)[0].tolist()) == [1, 4]


def test_random_fill_draw() -> None:
    gt = np.array([7, 2, 65535], np.int64)
    a = random_fill(gt, 40, 10, "val/000001")
    assert len(a) == 10 and len(set(a.tolist())) == 10 and {2, 7} <= set(a.tolist()) and a.max() < 40
    assert torch.equal(a, random_fill(gt, 40, 10, "val/000001"))  # depends only on the key
    draws = {tuple(random_fill(gt, 40, 10, f"val/{i:06d}").tolist()) for i in range(20)}
    assert len(draws) > 15
    # Uniform over the other classes: each of the 38 others drawn ~ 8/38 of the time.
    counts = np.zeros(40)
    for i in range(2000):
        counts[random_fill(gt, 40, 10, f"k{i}")[2:].numpy()] += 1
    others = np.setdiff1d(np.arange(40), [2, 7])
    assert counts[[2, 7]].sum() == 0
    assert np.allclose(counts[others] / 2000, 8 / 38, atol=0.04)
    assert sorted(random_fill(np.arange(12), 12, 5, "x").tolist()) == list(range(12))  # more GT than total


def _expected(ranking: list[int], gt: list[int], total: int) -> set[int]:
    others = [c for c in ranking if c not in gt]
    return set(gt) | set(others[: max(0, total - len(gt))])


@pytest.mark.parametrize("family", ["segmenter", "mask2former"])
def test_ranked_fill_selects_gt_plus_best_others(family: str) -> None:
    kappa = 4
    if family == "segmenter":
        torch.manual_seed(0)
        model = SEGMENTER.build(ModelConfig(img_size=32, num_classes=12, kappa=kappa)).eval()
        x = torch.randn(2, 3, 32, 32)
    else:
        model = tiny_model(kappa=kappa).eval()
        x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        ranking = plain.ml_logits.argsort(dim=1, descending=True).tolist()
        gt = [[ranking[0][6], ranking[0][1]],  # one GT class far outside the top-kappa
              ranking[1][:2]]                   # both inside: the fill gives the plain top-kappa
        filled = model(x, Selection(override=[torch.tensor(g) for g in gt], fill=kappa))
    for i in range(2):
        assert set(filled.topk_index[i].tolist()) == _expected(ranking[i], gt[i], kappa)
    assert torch.equal(filled.topk_index[1], plain.topk_index[1])
    out_f = filled.mask_logits if family == "segmenter" else filled.pred_logits
    out_p = plain.mask_logits if family == "segmenter" else plain.pred_logits
    assert torch.allclose(out_f[1], out_p[1], atol=1e-6)
    baseline = (SEGMENTER.build(ModelConfig(img_size=32, num_classes=12, head="segmenter")) if family == "segmenter"
                else tiny_model(head="segmenter")).eval()
    with pytest.raises(ValueError, match="ranking"), torch.no_grad():
        baseline(x, Selection(override=[torch.tensor(g) for g in gt], fill=kappa))


def test_options_checked() -> None:
    with pytest.raises(UserError, match="add --oracle"):
        EvalOptions(selection=SelectionOptions(oracle_fill="ranked")).check()
    with pytest.raises(UserError, match="ranked or random"):
        EvalOptions(selection=SelectionOptions(oracle=True, oracle_fill="hard")).check()
    EvalOptions(selection=SelectionOptions(oracle=True, oracle_fill="random")).check()
