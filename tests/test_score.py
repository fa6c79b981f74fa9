"""`rankseg eval-predictions`: the three mIoU protocols against the reference formulas re-typed
independently (tests/score_helpers.py), file matching, frequency groups and bad input."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, make_synthetic
from convert_trees import read_shards
from PIL import Image
from score_helpers import IGNORE, d2_conf, d2_metrics, make_shards, mmseg_metrics
from typer.testing import CliRunner

from rankseg_cli.common import new_app
from rankseg_cli.score_cmds import register
from rankseg_core.errors import UserError
from rankseg_core.evaluation.metrics import PROTOCOLS, ConfusionMatrix
from rankseg_core.evaluation.score_files import frequency_bins, lvis_groups, match_predictions

K = 12
NAMES = [f"class {i}" for i in range(K)]


def cli(*args):
    app = new_app("test")
    register(app)
    app.callback()(lambda: None)  # a group, even with one command registered
    return CliRunner().invoke(app, [str(a) for a in args])


def _random_label(rng: np.random.Generator, h: int, w: int, classes: list[int]) -> np.ndarray:
    lab = rng.choice(classes, (h // 4 + 1, w // 4 + 1))
    lab = np.kron(lab, np.ones((4, 4), np.int64))[:h, :w]
    lab[rng.random((h, w)) < 0.1] = IGNORE
    return lab.astype(np.uint16)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    val = {f"img_{i:03d}": _random_label(rng, 20 + 3 * i, 28 - 2 * i, [0, 1, 2, 3, 4, 6]) for i in range(5)}
    # Training split: class c appears in c images (class 0 in none: 'unseen'), for the bins.
    train = {}
    for j in range(K - 1):
        lab = np.full((8, 8), IGNORE, np.uint16)
        cls = [c for c in range(1, K) if c > j]
        for n, c in enumerate(cls):
            lab.flat[n] = c
        train[f"tr_{j:03d}"] = lab
    return make_shards(tmp_path_factory.mktemp("score") / "data", {"train": train, "val": val}, NAMES)


def _predict(rng: np.random.Generator, labels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Noisy predictions: right on ~60 % of pixels, else a random class; class 9 is never in
    the GT (a false-positive-only class), class 10 is predicted only where the GT is ignore."""
    preds = {}
    for key, lab in labels.items():
        p = np.where(lab == IGNORE, 0, lab).astype(np.int64)
        noise = rng.random(lab.shape) < 0.4
        p[noise] = rng.integers(0, 7, noise.sum())
        p.flat[5] = 9
        p[lab == IGNORE] = 10
        preds[key] = p
    return preds


def _val_labels(data: Path) -> dict[str, np.ndarray]:
    return {k: v["label"] for k, v in read_shards(data).items() if v["split"] == "val"}


def _write(dir_: Path, preds: dict[str, np.ndarray], fmt: str = "png16") -> None:
    dir_.mkdir(parents=True, exist_ok=True)
    for key, p in preds.items():
        if fmt == "png16":
            Image.fromarray(p.astype(np.uint16)).save(dir_ / f"{key}.png")
        elif fmt == "png8":
            Image.fromarray(p.astype(np.uint8)).save(dir_ / f"{key}.png")
        else:  # uint16 TIFF, as detectron2 projects store their labels
            Image.fromarray(p.astype(np.uint16)).save(dir_ / f"{key}.tif")


def _strict_json(path: Path) -> dict:
    def no_nan(x: str):
        raise AssertionError(f"non-strict JSON constant {x}")
    return json.loads(path.read_text(), parse_constant=no_nan)


# --- the metrics ------------------------------------------------------------------------


def test_protocols_match_the_reference_formulas() -> None:
    rng = np.random.default_rng(1)
    for trial in range(30):
        k = int(rng.integers(2, 9))
        gts, preds = [], []
        for _ in range(int(rng.integers(1, 4))):
            shape = tuple(rng.integers(3, 12, 2))
            g = rng.integers(0, k, shape)
            g[rng.random(shape) < 0.2] = IGNORE
            gts.append(g)
            preds.append(rng.integers(0, k, shape))
        cm = ConfusionMatrix(k, IGNORE)
        for p, g in zip(preds, gts):
            cm.update(p, g)
        conf = d2_conf(preds, gts, k)
        old, new, mm = d2_metrics(conf, new=False), d2_metrics(conf, new=True), mmseg_metrics(preds, gts, k)
        assert 100 * cm.miou(protocol="d2-old") == pytest.approx(old["mIoU"], nan_ok=True)
        assert 100 * cm.miou(protocol="d2") == pytest.approx(new["mIoU"], nan_ok=True)
        assert cm.miou(protocol="mmseg") == pytest.approx(mm["mIoU"], nan_ok=True)
        # The proof in metrics.ConfusionMatrix.miou: mmseg and detectron2 <= v0.6 always agree.
        assert cm.miou(protocol="mmseg") == pytest.approx(cm.miou(protocol="d2-old"), nan_ok=True)
        np.testing.assert_allclose(100 * cm.iou("d2-old"), old["IoU"])
        np.testing.assert_allclose(100 * cm.iou("d2"), new["IoU"])
        np.testing.assert_allclose(cm.iou("mmseg"), mm["IoU"])
        assert 100 * cm.fwiou() == pytest.approx(old["fwIoU"]) and 100 * cm.fwiou() == pytest.approx(new["fwIoU"])
        assert 100 * cm.macc() == pytest.approx(new["mACC"]) and cm.macc() == pytest.approx(mm["mAcc"])
        assert 100 * cm.aacc() == pytest.approx(new["pACC"]) and cm.aacc() == pytest.approx(mm["aAcc"])


def test_where_the_protocols_differ_by_hand() -> None:
    # GT classes 0, 1; class 2 predicted where it never occurs; class 3 predicted only at ignore.
    gt = np.array([[0, 0, 1, 1], [0, 1, IGNORE, IGNORE]])
    pred = np.array([[0, 2, 1, 1], [0, 0, 3, 3]])
    cm = ConfusionMatrix(5, IGNORE)
    cm.update(pred, gt)
    iou0, iou1 = 2 / 4, 2 / 3  # class 0: tp 2, gt 3, pred 3 -> 2/4; class 1: tp 2, gt 3, pred 2 -> 2/3
    assert cm.miou(protocol="d2") == pytest.approx((iou0 + iou1) / 2)
    assert cm.miou(protocol="d2-old") == pytest.approx((iou0 + iou1) / 3)  # the FP-only class 2 counts 0
    assert cm.miou(protocol="mmseg") == pytest.approx((iou0 + iou1 + 0) / 3)
    assert cm.iou("mmseg")[2] == 0 and math.isnan(cm.iou("d2-old")[2]) and math.isnan(cm.iou("d2")[2])
    assert all(math.isnan(cm.iou(p)[3]) for p in PROTOCOLS)  # predictions at ignore pixels never count
    # d2-old = d2 x |GT classes| / (|GT classes| + |predicted-only classes|)
    assert cm.miou(protocol="d2-old") == pytest.approx(cm.miou(protocol="d2") * 2 / 3)
    assert cm.miou([0, 2], protocol="mmseg") == pytest.approx(iou0 / 2)
    assert cm.miou([0, 2], protocol="d2") == pytest.approx(iou0)
    with pytest.raises(ValueError, match="unknown mIoU protocol"):
        cm.miou(protocol="cityscapes")


# --- the command ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png16", "tif16", "png8"])
def test_eval_predictions_equals_reference(shards: Path, tmp_path: Path, fmt: str) -> None:
    labels = _val_labels(shards)
    preds = _predict(np.random.default_rng(2), labels)
    _write(tmp_path / "preds", preds, fmt)
    keys = sorted(labels)
    p_list, g_list = [preds[k] for k in keys], [labels[k] for k in keys]
    conf = d2_conf(p_list, g_list, K)
    ref = {"d2-old": d2_metrics(conf, new=False), "d2": d2_metrics(conf, new=True)}
    mm = mmseg_metrics(p_list, g_list, K)
    for protocol in PROTOCOLS:
        out = tmp_path / f"{protocol}.json"
        res = cli("eval-predictions", tmp_path / "preds", "--data", shards, "--protocol", protocol, "--json", out)
        assert res.exit_code == 0, res.output
        rep = _strict_json(out)
        want_miou = mm["mIoU"] if protocol == "mmseg" else ref[protocol]["mIoU"] / 100
        assert rep["miou"] == pytest.approx(want_miou)
        assert rep["aacc"] == pytest.approx(mm["aAcc"]) and rep["macc"] == pytest.approx(mm["mAcc"])
        assert rep["fwiou"] == pytest.approx(ref["d2"]["fwIoU"] / 100)
        assert rep["num_images"] == len(keys)
        d2 = rep["sem_seg"]
        assert list(d2)[:2] == ["mIoU", "fwIoU"] and list(d2)[2] == "IoU-class 0"
        assert list(d2)[2 + K:4 + K] == ["mACC", "pACC"] and list(d2)[-1] == f"ACC-class {K - 1}"
        per_iou = mm["IoU"] if protocol == "mmseg" else ref[protocol]["IoU"] / 100
        for i in range(K):
            got = d2[f"IoU-class {i}"]
            assert (got is None) == bool(np.isnan(per_iou[i])), (protocol, i)
            if got is not None:
                assert got == pytest.approx(100 * per_iou[i])
            acc = ref["d2"]["ACC"][i]
            assert d2[f"ACC-class {i}"] is None if np.isnan(acc) else d2[f"ACC-class {i}"] == pytest.approx(acc)
    # mmseg and d2-old agree on the mean but not on the FP-only class 9: 0 vs undefined.
    assert rep["miou_by_protocol"]["mmseg"] == pytest.approx(rep["miou_by_protocol"]["d2-old"])
    assert rep["miou_by_protocol"]["d2"] > rep["miou_by_protocol"]["mmseg"]
    assert _strict_json(tmp_path / "mmseg.json")["sem_seg"]["IoU-class 9"] == 0
    assert rep["sem_seg"]["IoU-class 9"] is None and rep["sem_seg"]["IoU-class 10"] is None
    # CSVs: detectron2's keys, and the per-class table.
    rows = list(csv.reader((tmp_path / "d2.csv").open()))
    assert rows[0] == ["metric", "value"] and rows[1][0] == "mIoU" and len(rows) == 1 + 4 + 2 * K
    table = list(csv.DictReader((tmp_path / "d2_per_class.csv").open()))
    gt_pixels = np.bincount(np.concatenate([g[g != IGNORE] for g in g_list]).astype(np.int64), minlength=K)
    assert [int(r["gt_pixels"]) for r in table] == gt_pixels.tolist()
    assert table[9]["IoU"] == "" and int(table[9]["pred_pixels"]) == len(keys)


def test_frequency_groups_from_training_counts(shards: Path, tmp_path: Path) -> None:
    labels = _val_labels(shards)
    _write(tmp_path / "p", {k: np.where(v == IGNORE, 0, v) for k, v in labels.items()})
    out = tmp_path / "s.json"
    assert cli("eval-predictions", tmp_path / "p", "--data", shards, "--json", out).exit_code == 0
    rep = _strict_json(out)
    assert rep["miou"] == pytest.approx(1.0) and rep["aacc"] == pytest.approx(1.0)
    # Class c is in c training images: 0 unseen, 1..10 rare, 11 common.
    assert {g: v["num_classes"] for g, v in rep["groups"].items()} == {"common": 1, "rare": 10, "unseen": 1}
    assert rep["per_class"][0]["group"] == "unseen" and rep["per_class"][11]["group"] == "common"
    assert frequency_bins(np.array([0, 1, 10, 11, 100, 101, 5000])) == {
        "frequent": [5, 6], "common": [3, 4], "rare": [1, 2], "unseen": [0]}
    res = cli("eval-predictions", tmp_path / "p", "--data", shards, "--json", out, "--groups", "none")
    assert res.exit_code == 0 and _strict_json(out)["groups"] == {}


def test_lvis_groups_for_coco_lvis(tmp_path: Path) -> None:
    table = json.loads((Path(__file__).resolve().parents[1] / "datasets/coco_lvis/classes.json").read_text())
    names = [c["name"] for c in table["classes"]]
    groups = lvis_groups(names)
    assert sum(len(v) for v in groups.values()) == 1284 and len(groups["stuff"]) == 81
    assert {g: len(v) for g, v in groups.items() if g != "stuff"} == {"frequent": 405, "common": 461, "rare": 337}
    assert 1203 in groups["stuff"] and names.index("table") not in groups["stuff"]  # merged: LVIS tag
    lab = np.full((6, 6), IGNORE, np.uint16)
    lab[:3] = 1283  # a stuff class
    lab[3:] = 0  # aerosol_can, common
    data = make_shards(tmp_path / "lvis", {"val": {"000000000001": lab}}, names, name="coco_lvis",
                       options={"vocabulary": "lvis_v1"})
    pred = lab.astype(np.int64)
    pred[5] = 2  # airplane (frequent), a false positive
    (tmp_path / "p").mkdir()
    Image.fromarray(pred.astype(np.uint16)).save(tmp_path / "p" / "000000000001.png")
    out = tmp_path / "l.json"
    res = cli("eval-predictions", tmp_path / "p", "--data", data, "--json", out)
    assert res.exit_code == 0, res.output
    g = _strict_json(out)["groups"]
    assert g["stuff"]["miou"] == pytest.approx(1.0) and g["common"]["miou"] == pytest.approx(12 / 18)
    assert g["frequent"]["miou"] == 0 and g["rare"]["miou"] is None  # mmseg: the FP class counts 0
    res = cli("eval-predictions", tmp_path / "p", "--data", data, "--json", out, "--protocol", "d2")
    assert _strict_json(out)["groups"]["frequent"]["miou"] is None  # d2: no GT class in the group
    with pytest.raises(UserError, match="LVIS v1 vocabulary"):
        lvis_groups(names[:-1])


def test_matching_rules(tmp_path: Path) -> None:
    keys = ["vidA/00000", "vidA/00005", "vidB/00000", "img"]
    d = tmp_path
    files = {"vidA__00000": d / "vidA__00000.png", "vidA/00005": d / "vidA/00005.tif", "vidB__00000": d / "x.png",
             "img": d / "img.png"}
    assert match_predictions(keys, files, d, "val") == [files[n] for n in ("vidA__00000", "vidA/00005",
                                                                           "vidB__00000", "img")]
    # The plain frame stem is ambiguous across videos.
    with pytest.raises(UserError, match="ambiguous, it matches samples vidA/00000 and vidB/00000"):
        match_predictions(keys[:1] + keys[2:3], {"00000": d / "00000.png"}, d, "val")
    with pytest.raises(UserError, match="matches 2 files"):
        match_predictions(["v/f"], {"v__f": d / "v__f.png", "f": d / "f.png"}, d, "val")
    with pytest.raises(UserError, match=r"2 of 4 'val' images have no prediction \(first: vidA__00005, img\)"):
        match_predictions(keys, {"vidA__00000": d / "a.png", "vidB/00000": d / "b.png"}, d, "val")
    extra = dict(files, zzz=d / "zzz.png")
    with pytest.raises(UserError, match=r"1 prediction file\(s\) match no 'val' image \(first: zzz.png\)"):
        match_predictions(keys, extra, d, "val")
    assert len(match_predictions(keys, extra, d, "val", allow_extra=True)) == 4


def test_bad_input_one_line(shards: Path, tmp_path: Path) -> None:
    labels = _val_labels(shards)
    good = {k: np.where(v == IGNORE, 1, v) for k, v in labels.items()}
    first = min(good)

    def run_with(name: str, mutate, *extra) -> object:
        d = tmp_path / name
        _write(d, good)
        mutate(d)
        return cli("eval-predictions", d, "--data", shards, "--json", tmp_path / f"{name}.json", *extra)

    def save(d: Path, arr: np.ndarray, suffix: str = ".png") -> None:
        (d / f"{first}.png").unlink()
        Image.fromarray(arr).save(d / f"{first}{suffix}")

    lab = good[first]
    assert_one_line_error(run_with("size", lambda d: save(d, lab[:-1].astype(np.uint16))), "prediction is", "W x H")
    big = lab.astype(np.uint16).copy()
    big[0, 0] = K
    assert_one_line_error(run_with("range", lambda d: save(d, big)), f"value {K} in 1 pixel(s)", "0..11")
    ign = lab.astype(np.uint16).copy()
    ign[:2] = IGNORE
    assert_one_line_error(run_with("ignore", lambda d: save(d, ign)), "value 65535", "ignore value")
    assert_one_line_error(run_with("rgb", lambda d: save(d, np.zeros((*lab.shape, 3), np.uint8))), "3-channel")
    assert_one_line_error(run_with("float", lambda d: save(d, lab.astype(np.float32), ".tif")
                                   or (d / f"{first}.png").exists()), "float32")
    assert_one_line_error(run_with("empty", lambda d: (d / f"{first}.png").write_bytes(b"")), "empty file")
    assert_one_line_error(run_with("junk", lambda d: (d / f"{first}.png").write_bytes(b"not an image")),
                          "cannot decode")
    assert_one_line_error(run_with("missing", lambda d: (d / f"{first}.png").unlink()), "1 of 5", first)

    def bomb(d: Path) -> None:  # an IHDR claiming 100000 x 100000 pixels
        data = bytearray((d / f"{first}.png").read_bytes())
        data[16:24] = (100000).to_bytes(4, "big") * 2
        (d / f"{first}.png").write_bytes(bytes(data))
    assert_one_line_error(run_with("bomb", bomb), "over rankseg's limit")
    assert_one_line_error(run_with("dup", lambda d: Image.fromarray(lab.astype(np.uint16)).save(d / f"{first}.tif")),
                          "two prediction files")
    assert_one_line_error(run_with("offset", lambda d: None, "--pred-offset", "1"), "below --pred-offset 1")
    assert_one_line_error(run_with("proto", lambda d: None, "--protocol", "voc"), "--protocol 'voc'")
    assert_one_line_error(run_with("split", lambda d: None, "--split", "test"), "no split 'test'")
    assert_one_line_error(run_with("groups", lambda d: None, "--groups", "train-frequency", "--train-split", "x"),
                          "train-frequency needs")
    assert_one_line_error(cli("eval-predictions", tmp_path / "nope", "--data", shards), "no such directory")
    other = make_shards(tmp_path / "other", {"train": {"t": np.zeros((4, 4), np.uint16)}}, ["a", "b"])
    assert_one_line_error(run_with("traindata", lambda d: None, "--train-data", other), "classes differ")
    # --pred-offset: files written as id + 1 (mmseg format_results) score like the plain ones.
    plus = tmp_path / "plus"
    _write(plus, {k: v + 1 for k, v in good.items()})
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("eval-predictions", plus, "--data", shards, "--pred-offset", "1", "--json", a).exit_code == 0
    assert cli("eval-predictions", tmp_path / "size", "--data", shards, "--json", b).exit_code == 2
    _write(tmp_path / "plain", good)
    assert cli("eval-predictions", tmp_path / "plain", "--data", shards, "--json", b).exit_code == 0
    assert _strict_json(a)["sem_seg"] == _strict_json(b)["sem_seg"]


def test_8bit_refused_when_k_exceeds_256(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(300)]
    lab = np.arange(36, dtype=np.uint16).reshape(6, 6) * 8  # ids 0..280
    data = make_shards(tmp_path / "k300", {"val": {"a": lab}}, names)
    (tmp_path / "p8").mkdir()
    Image.fromarray((lab % 256).astype(np.uint8)).save(tmp_path / "p8" / "a.png")  # the classic bug
    assert_one_line_error(cli("eval-predictions", tmp_path / "p8", "--data", data), "8-bit image", "K=300",
                          "16-bit")
    (tmp_path / "p16").mkdir()
    Image.fromarray(lab).save(tmp_path / "p16" / "a.tif")
    res = cli("eval-predictions", tmp_path / "p16", "--data", data, "--json", tmp_path / "ok.json")
    assert res.exit_code == 0, res.output
    assert _strict_json(tmp_path / "ok.json")["miou"] == 1.0


@pytest.mark.slow
def test_agrees_with_rankseg_eval_on_saved_predictions(tmp_path: Path) -> None:
    """A run's own `rankseg eval --save-predictions` files give the same mIoU, aAcc and per-class
    IoU as `rankseg eval` itself."""
    from rankseg_cli.train_cmds import evaluate
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.train import train

    data = tmp_path / "data"
    make_synthetic(data, num_classes=40, images=4, val_images=4, size=48, seed=3)
    cfg = build_train_config(None, ["model.model=segmenter-vitt", "model.img_size=32", "model.kappa=6",
                                    "schedule.iters=1", "schedule.batch_size=2", "data.num_workers=0",
                                    "eval.num_workers=0", "eval.short_side=32", "eval.batch_size=2"], data)
    train(cfg, tmp_path / "run", progress=False)
    app = new_app("test")
    app.command("eval")(evaluate)
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json"),
                              "--save-predictions", str(tmp_path / "preds"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval-predictions", str(tmp_path / "preds"), "--data", str(data),
                              "--json", str(tmp_path / "scores.json")])
    assert res.exit_code == 0, res.output
    ev, sc = _strict_json(tmp_path / "eval.json"), _strict_json(tmp_path / "scores.json")
    assert sc["num_images"] == ev["num_images"] == 4
    assert sc["miou"] == pytest.approx(ev["miou"], abs=1e-12) and sc["aacc"] == pytest.approx(ev["aacc"], abs=1e-12)
    assert [c["iou"] for c in sc["per_class"]] == pytest.approx(list(ev["per_class"].values()), abs=1e-12)
