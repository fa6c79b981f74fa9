"""The independent scheme: a multi-label classifier run, and a segmenter whose top-kappa come
from that frozen classifier (paper §3.2, Tables 2-3; docs/method.md sec. 6)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.common import new_app
from rankseg_cli.train_cmds import evaluate, predict
from rankseg_cli.train_cmds import train as train_cmd
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import prepare_synthetic
from rankseg_core.data.augment import build_test_transform
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.model.classifier import SELECTOR_ATTR
from rankseg_core.shards.read import ShardDataset

K = 40
KAPPA = 8
TINY = tiny_run(KAPPA, model=None)


def cli_app():
    app = new_app("test")
    app.command("train")(train_cmd)
    app.command("eval")(evaluate)
    app.command("predict")(predict)
    return app


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("indep") / "data"
    make_synthetic(out, num_classes=K, images=12, val_images=4, size=48, seed=0)
    return out


@pytest.fixture(scope="module")
def classifier_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("clf") / "clf"
    train(build_train_config(None, TINY + ["model.model=classifier-vitt", "schedule.iters=3"], data), run,
          progress=False)
    return run


def config(data: Path, *extra: str):
    return build_train_config(None, TINY + list(extra), data)


# ---------------------------------------------------------------------------------------
# Independent re-typings of the metrics (sklearn is not installed)


def ap_reference(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision as the area under the step precision-recall curve: walk the images
    by decreasing score, one threshold per distinct score (ties enter together)."""
    total = positive.sum()
    ap, hits, seen, last_recall = 0.0, 0, 0, 0.0
    for value in sorted(set(scores.tolist()), reverse=True):
        group = scores == value
        hits += int(positive[group].sum())
        seen += int(group.sum())
        recall = hits / total
        ap += (recall - last_recall) * (hits / seen)
        last_recall = recall
    return ap


def recall_reference(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    vals = []
    for s, t in zip(scores, targets):
        if t.sum() == 0:
            continue
        top = sorted(range(len(s)), key=lambda c: (-s[c], c))[:k]
        vals.append(sum(t[c] for c in top) / t.sum())
    return float(np.mean(vals))


def test_ap_reference_on_a_hand_built_case() -> None:
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos): precision 1 at recall 1/2, 2/3 at recall 1.
    assert ap_reference(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1])) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # a tie of one positive and one negative enters together: precision 1/2 at recall 1.
    assert ap_reference(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------
# The classifier


def test_classifier_run_and_eval_metrics_equal_an_independent_computation(classifier_run: Path, data: Path,
                                                                         tmp_path: Path) -> None:
    cfg = runs.load_config(classifier_run)
    assert cfg.model.model == "classifier-vitt" and cfg.optim.name == "adamw"  # the Query2Label recipe
    assert cfg.loss.ml_loss == "asl" and cfg.loss.asl_gamma_neg == 2.0
    recs = [r for r in runs.read_metrics(classifier_run) if r["type"] == "train"]
    assert [r["iter"] for r in recs] == [1, 2, 3] and {"loss", "recall", "precision"} <= set(recs[0])
    res = CliRunner().invoke(cli_app(), ["eval", str(classifier_run), "--json", str(tmp_path / "e.json"),
                                         "--kappa", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "mIoU" not in res.output and "aAcc" not in res.output  # no segmentation rows for a classifier
    assert "recall@5" in res.output
    rep = json.loads((tmp_path / "e.json").read_text())

    model, _ = runs.load_run(classifier_run, "cpu")
    ds = ShardDataset(data, "val")
    dc = model.data_config()
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    scores, targets = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            s = ds.load(i)
            x = torch.from_numpy(tf(s["image"]))[None]
            scores.append(model(x).sigmoid()[0].numpy())
            t = np.zeros(K)
            t[s["classes"]] = 1
            targets.append(t)
    scores, targets = np.stack(scores), np.stack(targets)
    aps = [ap_reference(scores[:, c], targets[:, c]) for c in range(K) if targets[:, c].any()]
    assert rep["map"] == pytest.approx(float(np.mean(aps)), abs=1e-6)
    assert rep["recall_at_kappa"] == pytest.approx(recall_reference(scores, targets, 5), abs=1e-9)
    assert rep["config"]["kappa"] == 5 and "miou" not in rep and "per_class" not in rep  # no class maps: no segmentation keys
    assert rep["score"] == rep["map"]  # what picks best.pt for a classifier


@pytest.mark.parametrize("options, fragment", [(["--mode", "slide"], "a classifier predicts whole images"),
                                               (["--oracle"], "segments nothing"),
                                               (["--dynamic-kappa", "0.1"], "use --kappa")])
def test_classifier_eval_bad_options_are_one_line(classifier_run: Path, tmp_path: Path, options: list[str],
                                                  fragment: str) -> None:
    res = CliRunner().invoke(cli_app(), ["eval", str(classifier_run), "--json", str(tmp_path / "e.json"),
                                         "--device", "cpu", *options])
    assert_one_line_error(res, fragment)


def test_classifier_refuses_oracle_and_selector(data: Path, classifier_run: Path) -> None:
    with pytest.raises(UserError, match="a classifier has no selection"):
        config(data, "model.model=classifier-vitt", "model.oracle=true")
    with pytest.raises(UserError, match="use a model of a family that does: segmenter"):
        config(data, "model.model=classifier-vitt", f"model.selector.run={classifier_run}")


def test_classifier_clips_give_one_prediction_per_clip() -> None:
    from rankseg_core.config.model import ModelConfig
    from rankseg_core.families.classifier import CLASSIFIER

    torch.manual_seed(0)
    model = CLASSIFIER.build(ModelConfig(model="classifier-vitt", num_classes=K, img_size=32, clip_len=2)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, K)
        # a clip's two frames form one memory: the same frames in the other order, the same logits
        swapped = model(x[[1, 0, 3, 2]])
    assert torch.allclose(out, swapped, atol=1e-5)


@pytest.mark.slow
def test_classifier_beats_chance_map(tmp_path: Path) -> None:
    """A few hundred steps on the synthetic set rank the image's classes far above chance."""
    data = tmp_path / "data"
    prepare_synthetic(data, num_classes=K, images=200, val_images=30, size=32, seed=3,
                      opts=ConvertOptions(samples_per_shard=100))
    cfg = build_train_config(None, ["model.model=classifier-vitt", "model.img_size=32", "model.dropout=0",
                                    "model.drop_path=0", "schedule.iters=300", "schedule.batch_size=8",
                                    "optim.lr=1e-3", "data.num_workers=0", "eval.num_workers=0",
                                    "log_every=50"], data)
    res = train(cfg, tmp_path / "run", progress=False)
    # Chance: scores independent of the image give each class an expected AP of its
    # prevalence (the share of val images holding it); average over classes with positives.
    ds = ShardDataset(data, "val")
    present = np.zeros((len(ds), K))
    for i in range(len(ds)):
        present[i, ds.load(i)["classes"]] = 1
    chance = present[:, present.any(0)].mean(0).mean()
    assert res.final_eval["map"] > 2 * chance, (res.final_eval.metrics, chance)


# ---------------------------------------------------------------------------------------
# The segmenter selected by a frozen classifier


@pytest.fixture(scope="module")
def selected_run(data: Path, classifier_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sel") / "seg"
    train(config(data, "model.model=segmenter-vitt", f"model.selector.run={classifier_run}", "schedule.iters=2"),
          run, progress=False)
    return run


def test_selector_is_recorded_and_selects_the_classifier_top_kappa(selected_run: Path, classifier_run: Path,
                                                                   data: Path) -> None:
    cfg = runs.load_config(selected_run)
    sel = cfg.model.selector
    assert sel.run == str(classifier_run.resolve()) and sel.weights == str(classifier_run.resolve() / "model.safetensors")
    assert sel.model == "classifier-vitt" and sel.img_size == 32 and len(sel.sha256) == 64
    # the segmenter's own weights hold no ml branch and no selector
    state = runs.load_weights(selected_run / "model.safetensors")
    assert not any(k.startswith((SELECTOR_ATTR + ".", "head.ml_fc", "head.ml_branch")) for k in state)
    assert sum(1 for k in state if k.startswith("head.blocks.")) > 0 and "head.blocks.2.norm1.weight" not in state

    seg, _ = runs.load_run(selected_run, "cpu")
    clf, _ = runs.load_run(classifier_run, "cpu")
    ds = ShardDataset(data, "val")
    dc = seg.data_config()
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    x = torch.stack([torch.from_numpy(tf(ds.load(i)["image"])) for i in range(len(ds))])
    with torch.no_grad():
        want = clf(x).argsort(dim=1, descending=True, stable=True)[:, :KAPPA]
        for mode in (False, True):  # in training mode too: the selector stays frozen (no dropout)
            seg.train(mode)
            out = seg(x)
            assert torch.equal(out.topk_index, want)
            assert torch.allclose(out.ml_logits, clf(x), atol=1e-5)  # same weights, another batch path: rounding
    # Gradients never reach the selector, and the optimizer never sees it.
    seg.train()
    seg(x).mask_logits.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in getattr(seg, SELECTOR_ATTR).parameters())


def test_selected_segmenter_eval_uses_the_selector(selected_run: Path, classifier_run: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "seg.json", tmp_path / "clf.json"
    for run, path in ((selected_run, a), (classifier_run, b)):
        res = CliRunner().invoke(cli_app(), ["eval", str(run), "--json", str(path), "--device", "cpu"])
        assert res.exit_code == 0, res.output
    seg, clf = json.loads(a.read_text()), json.loads(b.read_text())
    assert seg["miou"] is not None
    # the ml scores of the segmenter are the classifier's (same whole-image input)
    assert seg["map"] == pytest.approx(clf["map"]) and seg["recall_at_kappa"] == pytest.approx(clf["recall_at_kappa"])
    # predict on an image of the user's: the selector selects there too
    import cv2

    img = tmp_path / "imgs" / "x.png"
    img.parent.mkdir()
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    res = CliRunner().invoke(cli_app(), ["predict", str(selected_run), str(img.parent), "--out", str(tmp_path / "p"),
                                         "--device", "cpu"])
    assert res.exit_code == 0, res.output
    top = json.loads((tmp_path / "p" / "x.json").read_text())["top_kappa"]
    assert len(top) == KAPPA


def test_selector_cannot_change_under_resume_or_eval(data: Path, tmp_path: Path) -> None:
    clf = tmp_path / "clf"
    train(config(data, "model.model=classifier-vitt", "schedule.iters=2"), clf, progress=False)
    seg = tmp_path / "seg"
    cfg = config(data, "model.model=segmenter-vitt", f"model.selector.run={clf}", "schedule.iters=2",
                 "ckpt_every=1", "data.val_split=")
    train(cfg, seg, progress=False)
    (seg / "model.safetensors").unlink()  # as if interrupted after the last checkpoint
    # Same selector: resumes.
    train(runs.load_config(seg), seg, resume=True, progress=False)
    (seg / "model.safetensors").unlink()
    # The classifier "retrained": other weights in the same run.
    model, _ = runs.load_run(clf, "cpu")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    runs.save_weights(clf / "model.safetensors", model)
    with pytest.raises(UserError, match="the classifier changed since this segmenter recorded it"):
        train(runs.load_config(seg), seg, resume=True, progress=False)
    with pytest.raises(UserError, match="changed since this segmenter was trained with it"):
        runs.load_run(seg, "cpu", weights="last")
    # Another selector on resume: refused as a config change.
    other = tmp_path / "clf2"
    train(config(data, "model.model=classifier-vitt", "schedule.iters=1"), other, progress=False)
    cfg = runs.load_config(seg)
    cfg.model.selector.run = str(other)
    with pytest.raises(UserError, match="changed|differ"):
        train(cfg, seg, resume=True, progress=False)


@pytest.mark.parametrize("make_args, fragment", [
    (lambda d, c, s: ["--selector", str(d / "missing")], "no such run directory"),
    (lambda d, c, s: ["--selector", str(d)], "not a rankseg run directory"),
    (lambda d, c, s: ["--selector", str(s)], "not a multi-label classifier"),
    (lambda d, c, s: ["--selector", str(c), "--head", "segmenter"], "use --head rankseg"),
    (lambda d, c, s: ["--selector", str(c), "--no-select"], "use --head rankseg"),
    (lambda d, c, s: ["--selector", str(c), "--clip-len", "2"], "same --clip-len"),
    (lambda d, c, s: ["--selector", str(c), "--set", "aug.mean=1,2,3"], "same aug.mean"),
    (lambda d, c, s: ["--model", "classifier-vitt", "--selector", str(c)], "use a model of a family that does: segmenter"),
])
def test_cli_selector_bad_inputs(data: Path, classifier_run: Path, selected_run: Path, tmp_path: Path,
                                 make_args, fragment: str) -> None:
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--model", "segmenter-vitt",
            "--iters", "1", "--set", "model.img_size=32", "--set", "data.num_workers=0"]
    res = CliRunner().invoke(cli_app(), args + make_args(data, classifier_run, selected_run))
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "r" / "config.yaml").exists()  # refused before anything was written


def test_cli_selector_other_label_set(classifier_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_synthetic(other, num_classes=K + 5, images=4, val_images=2, size=32, seed=0)
    res = CliRunner().invoke(cli_app(), ["train", "--data", str(other), "--out", str(tmp_path / "r"),
                                         "--model", "segmenter-vitt", "--selector", str(classifier_run)])
    assert_one_line_error(res, "must rank the same label set")


def test_cli_dry_run_shows_the_resolved_selector(data: Path, classifier_run: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli_app(), ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--dry-run",
                                         "--model", "segmenter-vitt", "--selector", str(classifier_run)])
    assert res.exit_code == 0, res.output
    assert re.search(r"sha256: [0-9a-f]{64}", res.output) and "model: classifier-vitt" in res.output
