"""YouTube-VIS 2019 evaluation (evaluation/video_instances.py, `rankseg eval-vis`): hand-built
cases, pycocotools' COCOeval on single-frame videos, merged states, shards and bad inputs."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from typer.testing import CliRunner
from video_lvis_trees import rle_uncompressed, write_json, ytvis_frames

from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.youtube_vis import prepare_youtube_vis
from rankseg_core.errors import UserError
from rankseg_core.evaluation.video_instances import (
    AREA_RANGES,
    PredictedTrack,
    Track,
    VideoInstanceEval,
    ground_truth_videos,
    read_results,
    results_entries,
    score_results,
    spatio_temporal_iou,
    video_ids,
    write_results,
)


def rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def box(h: int, w: int, y0: int, x0: int, y1: int, x1: int) -> dict:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return rle(m)


def dense(m: dict | None, h: int, w: int) -> np.ndarray:
    return np.zeros((h, w), bool) if m is None else mask_utils.decode(m).astype(bool)


def scores_of(tracks: list[Track], preds: list[PredictedTrack], k: int = 3):
    ev = VideoInstanceEval(k)
    ev.update(1, tracks, preds)
    return ev.compute()


# --------------------------------------------------------------------------- the IoU


def test_spatio_temporal_iou_equals_dense_sums() -> None:
    """Against numpy on decoded masks: sum of intersections / sum of unions over frames."""
    rng = np.random.default_rng(0)
    h, w, t = 9, 11, 5

    def seq():
        return [None if rng.random() < 0.3 else rle(rng.random((h, w)) < 0.4) for _ in range(t)]

    dts, gts = [seq() for _ in range(4)], [seq() for _ in range(3)]
    dts.append([None] * t)  # a track that is never present: IoU 0 with everything
    got = spatio_temporal_iou(dts, gts)
    for i, d in enumerate(dts):
        for j, g in enumerate(gts):
            inter = sum(int((dense(a, h, w) & dense(b, h, w)).sum()) for a, b in zip(d, g))
            union = sum(int((dense(a, h, w) | dense(b, h, w)).sum()) for a, b in zip(d, g))
            assert got[i, j] == pytest.approx(inter / union if union else 0.0, abs=1e-12)
    assert (got[-1] == 0).all()


# --------------------------------------------------------------------------- hand-built cases

H, W = 10, 10


def test_perfect_prediction_is_one() -> None:
    a = [box(H, W, 0, 0, 4, 4), box(H, W, 1, 1, 5, 5), None]
    b = [None, box(H, W, 6, 6, 9, 9), box(H, W, 5, 5, 9, 9)]
    s = scores_of([Track(0, a), Track(2, b)], [PredictedTrack(0, 0.9, a), PredictedTrack(2, 0.3, b)])
    # precision is tp / (tp + fp + eps), as in the API: 1 - 2e-16 for a perfect ranking
    assert (s.ap, s.ap50, s.ap75, s.ar1, s.ar10, s.ar100) == pytest.approx((1, 1, 1, 1, 1, 1), abs=1e-12)
    assert s.aps == pytest.approx(1) and np.isnan(s.apm) and np.isnan(s.apl)  # every track is small
    assert s.per_class_ap[[0, 2]] == pytest.approx([1, 1]) and np.isnan(s.per_class_ap[1])


def test_track_missing_in_some_frames() -> None:
    """GT present in frames 0-1 (16 px each), the prediction also in frame 2: IoU = 32 / 48;
    it passes the thresholds .50, .55, .60, .65 only: AP = 4 / 10, AP50 = 1, AP75 = 0."""
    gt = [box(H, W, 0, 0, 4, 4), box(H, W, 2, 2, 6, 6), None]
    pred = [*gt[:2], box(H, W, 6, 6, 10, 10)]
    assert spatio_temporal_iou([pred], [gt])[0, 0] == pytest.approx(2 / 3)
    s = scores_of([Track(1, gt)], [PredictedTrack(1, 0.5, pred)])
    assert s.ap == pytest.approx(0.4) and s.ap50 == pytest.approx(1) and s.ap75 == 0.0
    assert s.ar10 == pytest.approx(0.4)


def test_wrong_category_scores_zero() -> None:
    m = [box(H, W, 0, 0, 5, 5)]
    s = scores_of([Track(0, m)], [PredictedTrack(1, 0.9, m)])
    # category 0: its one GT is never found; category 1 has no GT and is not averaged
    assert s.ap == 0.0 and s.ar10 == 0.0 and s.per_class_ap[0] == 0.0 and np.isnan(s.per_class_ap[1])


def test_score_ordering() -> None:
    """Two GT, two hits and one false positive: AP = 2/3 when the false positive ranks first
    (precision 0, 1/2, 2/3 at recall 0, 1/2, 1, enveloped to 2/3), 1 when it ranks last."""
    g1, g2 = [box(H, W, 0, 0, 4, 4)], [box(H, W, 5, 5, 9, 9)]
    fp = [box(H, W, 0, 6, 3, 9)]
    tracks = [Track(0, g1), Track(0, g2)]
    first = scores_of(tracks, [PredictedTrack(0, 0.9, fp), PredictedTrack(0, 0.8, g1), PredictedTrack(0, 0.7, g2)])
    last = scores_of(tracks, [PredictedTrack(0, 0.1, fp), PredictedTrack(0, 0.8, g1), PredictedTrack(0, 0.7, g2)])
    assert first.ap == pytest.approx(2 / 3) and last.ap == pytest.approx(1)
    # AR1 keeps the best-scored prediction per video and category: the FP, or one of two hits
    assert first.ar1 == 0.0 and last.ar1 == 0.5 and first.ar10 == last.ar10 == 1.0


def test_crowd_is_ignored_with_plain_iou() -> None:
    """A prediction on a crowd track is neither a hit nor a false positive; unlike COCO the
    crowd IoU is the plain IoU, so a small part of a crowd region is a false positive."""
    g, crowd = [box(H, W, 0, 0, 4, 4)], [box(H, W, 4, 0, 10, 10)]  # crowd: 60 px
    hit = PredictedTrack(0, 0.5, g)
    on_crowd = PredictedTrack(0, 0.9, crowd)
    part = PredictedTrack(0, 0.9, [box(H, W, 4, 0, 6, 10)])  # 20 px inside: IoU 1/3, COCO's 1
    tracks = [Track(0, g), Track(0, crowd, iscrowd=True)]
    assert scores_of(tracks, [on_crowd, hit]).ap == pytest.approx(1)
    assert scores_of(tracks, [part, hit]).ap == pytest.approx(0.5)
    only = scores_of([Track(1, crowd, iscrowd=True)], [PredictedTrack(1, 0.9, crowd)])
    assert np.isnan(only.ap) and np.isnan(only.per_class_ap[1])  # no non-crowd GT: undefined


def test_at_most_100_predictions_per_video_and_category() -> None:
    g = [box(H, W, 0, 0, 4, 4)]
    junk = [PredictedTrack(0, 0.9, [box(H, W, 6, 6, 9, 9)]) for _ in range(100)]
    assert scores_of([Track(0, g)], [*junk, PredictedTrack(0, 0.1, g)]).ar100 == 0.0
    assert scores_of([Track(0, g)], [*junk[:99], PredictedTrack(0, 0.1, g)]).ar100 == 1.0


def test_video_checks() -> None:
    ev = VideoInstanceEval(2)
    with pytest.raises(ValueError, match="frame counts"):
        ev.update(1, [Track(0, [None, None])], [PredictedTrack(0, 1.0, [None])])
    with pytest.raises(ValueError, match="sizes"):
        ev.update(1, [Track(0, [box(4, 4, 0, 0, 2, 2)])], [PredictedTrack(0, 1.0, [box(5, 4, 0, 0, 2, 2)])])
    with pytest.raises(ValueError, match="category 2"):
        ev.update(1, [Track(2, [None])], [])
    ev.update(1, [Track(0, [None])], [])
    with pytest.raises(ValueError, match="twice"):
        ev.update(1, [], [])


# --------------------------------------------------------------------------- COCOeval on single frames


def random_single_frame_data(seed: int, videos: int = 12, k: int = 4, size: int = 300):
    """Videos of one frame; GT and predictions are rectangles of sizes spanning COCO's and
    YouTube-VIS's area ranges; scores on a coarse grid so that ties occur."""
    rng = np.random.default_rng(seed)
    data = {}
    for vid in range(1, videos + 1):
        def rect() -> dict:
            side = rng.choice([rng.integers(5, 60), rng.integers(120, 200), rng.integers(240, 300)])
            y0, x0 = rng.integers(0, size - side + 1, 2)
            return box(size, size, y0, x0, y0 + side, x0 + min(side + rng.integers(-4, 5), size - x0))

        tracks = [Track(int(rng.integers(k)), [rect()]) for _ in range(rng.integers(0, 5))]
        preds = []
        for g in tracks:  # near misses of the GT plus random boxes
            if rng.random() < 0.8:
                m = dense(g.masks[0], size, size)
                m = np.roll(m, tuple(rng.integers(-6, 7, 2)), axis=(0, 1))
                cat = g.category if rng.random() < 0.85 else int(rng.integers(k))
                preds.append(PredictedTrack(cat, float(rng.integers(1, 10)) / 10, [rle(m)]))
        preds += [PredictedTrack(int(rng.integers(k)), float(rng.integers(1, 10)) / 10, [rect()])
                  for _ in range(rng.integers(0, 4))]
        data[vid] = (tracks, preds)
    return data


def cocoeval_of(data: dict, k: int, size: int) -> COCOeval:
    images: list[dict] = []
    anns: list[dict] = []
    res: list[dict] = []
    for vid, (tracks, preds) in data.items():
        images.append({"id": vid, "height": size, "width": size})
        for g in tracks:
            seg = {"size": [size, size], "counts": g.masks[0]["counts"].decode()}
            anns.append({"id": len(anns) + 1, "image_id": vid, "category_id": g.category + 1, "segmentation": seg,
                         "area": float(mask_utils.area(g.masks[0])), "iscrowd": 0,
                         "bbox": mask_utils.toBbox(g.masks[0]).tolist()})
        res += [{"image_id": vid, "category_id": p.category + 1, "score": p.score,
                 "segmentation": {"size": [size, size], "counts": p.masks[0]["counts"].decode()}} for p in preds]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": i + 1, "name": str(i)} for i in range(k)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        e = COCOeval(gt, gt.loadRes(res), iouType="segm")
        e.params.areaRng = [list(r) for r in AREA_RANGES.values()]  # YouTube-VIS's ranges, same labels
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e


def test_parameters_are_the_apis() -> None:
    """Typed from ytvoseval.py's Params (the COCOeval comparison below borrows the ranges)."""
    from rankseg_core.evaluation.video_instances import IOU_THRESHOLDS, MAX_DETS, RECALL_THRESHOLDS

    assert AREA_RANGES == {"all": (0, 1e10), "small": (0, 16384), "medium": (16384, 65536),
                           "large": (65536, 1e10)}
    assert MAX_DETS == (1, 10, 100) and len(RECALL_THRESHOLDS) == 101
    assert IOU_THRESHOLDS.tolist() == pytest.approx([0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95], abs=1e-15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_cocoeval_on_single_frame_videos(seed: int) -> None:
    k, size = 4, 300
    data = random_single_frame_data(seed, k=k, size=size)
    ev = VideoInstanceEval(k)
    for vid, (tracks, preds) in reversed(list(data.items())):  # update order does not matter
        ev.update(vid, tracks, preds)
    s = ev.compute()
    ref = cocoeval_of(data, k, size)
    np.testing.assert_allclose(s.precision, ref.eval["precision"], atol=1e-12)
    np.testing.assert_allclose(s.recall, ref.eval["recall"], atol=1e-12)
    mine = np.array(list(s.summary().values()))
    np.testing.assert_allclose(np.where(np.isnan(mine), -1, mine), ref.stats, atol=1e-12)
    assert np.isfinite(mine[:3]).all() and (mine[:3] > 0).all()  # a case with something to compare


def test_merge_of_split_states_equals_one_evaluator() -> None:
    data = random_single_frame_data(5, videos=10)
    whole, a, b = VideoInstanceEval(4), VideoInstanceEval(4), VideoInstanceEval(4)
    for vid, (tracks, preds) in data.items():
        whole.update(vid, tracks, preds)
        (a if vid % 3 else b).update(vid, tracks, preds)
    ref = whole.compute()
    import pickle

    for merged in (VideoInstanceEval(4).merge(pickle.loads(pickle.dumps(b.state()))).merge(a),
                   VideoInstanceEval(4).merge(a.state()).merge(b.state())):
        got = merged.compute()
        assert got.num_videos == 10
        np.testing.assert_array_equal(got.precision, ref.precision)
        np.testing.assert_array_equal(got.recall, ref.recall)
    with pytest.raises(ValueError, match="both"):
        VideoInstanceEval(4).merge(a).merge(a)
    with pytest.raises(ValueError, match="num_classes"):
        VideoInstanceEval(3).merge(a)


# --------------------------------------------------------------------------- shards, results.json, CLI

FH, FW = 24, 32


def ytvis_doc() -> dict:
    """Two videos (3 and 2 frames) with three tracks, one of them crowd, absent in some frames."""
    def m(y0: int, x0: int, y1: int, x1: int):
        a = np.zeros((FH, FW), bool)
        a[y0:y1, x0:x1] = True
        return rle_uncompressed(a)

    videos = [{"id": 1, "height": FH, "width": FW, "file_names": [f"bbb/{i:05d}.jpg" for i in range(3)]},
              {"id": 2, "height": FH, "width": FW, "file_names": [f"aaa/{i:05d}.jpg" for i in range(2)]}]
    anns = [{"id": 1, "video_id": 1, "category_id": 3, "iscrowd": 0,
             "segmentations": [m(0, 0, 8, 8), None, m(2, 2, 10, 10)]},
            {"id": 2, "video_id": 1, "category_id": 5, "iscrowd": 1,
             "segmentations": [m(10, 10, 20, 30), m(10, 12, 20, 30), None]},
            {"id": 3, "video_id": 2, "category_id": 3, "iscrowd": 0,
             "segmentations": [None, m(5, 5, 15, 25)]}]
    return {"videos": videos, "annotations": anns}


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, dict]:
    doc = ytvis_doc()
    root = tmp_path / "ytvis"
    write_json(root / "train.json", doc)
    ytvis_frames(root, "train", doc)
    out = tmp_path / "shards"
    prepare_youtube_vis(root, out, splits=["train"], opts=ConvertOptions(workers=0))
    return out, doc


def perfect_results(doc: dict, ids: dict[int, int]) -> list[dict]:
    """The release's tracks as a submission (video ids through `ids`), compressed RLE."""
    out = []
    for a in doc["annotations"]:
        segs = [None if s is None else
                {"size": s["size"], "counts": mask_utils.frPyObjects(s, *s["size"])["counts"].decode()}
                for s in a["segmentations"]]
        out.append({"video_id": ids[a["video_id"]], "category_id": a["category_id"], "score": 0.5,
                    "segmentations": segs})
    return out


def test_ground_truth_from_shards(shards: tuple[Path, dict]) -> None:
    out, doc = shards
    ids = video_ids(out, "train")
    assert ids == {"aaa": 1, "bbb": 2}  # sorted names, not the JSON's order
    videos = {v.name: v for v in ground_truth_videos(out, "train", ids)}
    assert [len(v.sizes) for v in videos.values()] == [2, 3]
    bbb = videos["bbb"]
    assert [(t.category, t.iscrowd) for t in bbb.tracks] == [(2, False), (4, True)]
    for track, ann in zip(bbb.tracks, doc["annotations"][:2]):
        for m, s in zip(track.masks, ann["segmentations"]):
            assert (m is None) == (s is None)
            if s is not None:
                want = mask_utils.decode(mask_utils.frPyObjects(s, FH, FW)).astype(bool)
                assert np.array_equal(dense(m, FH, FW), want)
    rel = tmp_json = out.parent / "train.json"
    write_json(tmp_json, {"videos": doc["videos"]})
    assert video_ids(out, "train", rel) == {"aaa": 2, "bbb": 1}  # the release's own ids


def test_score_results_round_trip(shards: tuple[Path, dict], tmp_path: Path) -> None:
    out, doc = shards
    res = tmp_path / "results.json"
    write_json(res, perfect_results(doc, {1: 2, 2: 1}))
    s, names = score_results(res, out, "train")
    assert s.ap == pytest.approx(1) and s.ar1 == 1.0 and s.num_videos == 2 and len(names) == 40
    assert s.per_class_ap[2] == pytest.approx(1) and np.isnan(s.per_class_ap[4])  # category 5 is only crowd
    # write_results / results_entries give the same file back, and the same scores
    videos = {v.video_id: v for v in ground_truth_videos(out, "train", video_ids(out, "train"))}
    preds = read_results(res, videos, 40)
    again = tmp_path / "again.json"
    write_results(again, [e for vid in sorted(preds) for e in results_entries(vid, preds[vid])])
    assert sorted(json.loads(again.read_text()), key=lambda e: (e["video_id"], e["category_id"])) == \
        sorted(json.loads(res.read_text()), key=lambda e: (e["video_id"], e["category_id"]))
    # the second video's track missing: half the non-crowd GT found
    write_json(res, [e for e in perfect_results(doc, {1: 2, 2: 1}) if e["video_id"] != 1])
    assert score_results(res, out, "train")[0].ar100 == 0.5


def cli(*args: object):
    from rankseg_cli.common import new_app
    from rankseg_cli.video_cmds import register

    app = new_app("test")

    @app.callback()
    def _root() -> None:
        pass

    register(app)
    return CliRunner().invoke(app, ["eval-vis", *map(str, args)])


def test_cli_writes_report(shards: tuple[Path, dict], tmp_path: Path) -> None:
    out, doc = shards
    res = write_json(tmp_path / "results.json", perfect_results(doc, {1: 2, 2: 1}))
    before = res.read_bytes()
    r = cli(res, "--data", out, "--split", "train")
    assert r.exit_code == 0, r.output
    assert "AP50" in r.output and "100.00" in r.output
    rep = json.loads((tmp_path / "results_vis_scores.json").read_text())
    assert rep["metric"] == "youtube-vis" and rep["ap"] == pytest.approx(1) and rep["per_class_ap"]["sedan"] is None
    assert res.read_bytes() == before
    assert cli(res, "--data", out, "--split", "train").exit_code == 0  # its own report is replaced
    assert_one_line_error(cli(res, "--data", out, "--split", "train", "--json", res), "results.json",
                          "choose another --json")
    assert res.read_bytes() == before


@pytest.mark.parametrize("edit,fragments", [
    (lambda r: r[0].update(video_id=99), ["entry 0", "video_id 99", "another dataset"]),
    (lambda r: r[0].update(category_id=41), ["entry 0", "category_id 41", "outside 1..40"]),
    (lambda r: r[0].update(category_id=True), ["category_id True"]),
    (lambda r: r[0]["segmentations"].pop(), ["entry 0", "2 segmentations for the 3 frames", "bbb"]),
    (lambda r: r[0]["segmentations"][0].update(size=[FH, FW + 1]), ["entry 0, frame 0", "differs from the image size"]),
    (lambda r: r[0]["segmentations"][0].update(counts="0o"), ["entry 0, frame 0", "RLE"]),
    (lambda r: r[1].update(score="high"), ["entry 1", "score 'high'"]),
    (lambda r: r[1].pop("score"), ["entry 1 is not"]),
])
def test_bad_results_are_one_line(shards: tuple[Path, dict], tmp_path: Path, edit, fragments) -> None:
    out, doc = shards
    results = perfect_results(doc, {1: 2, 2: 1})
    edit(results)
    res = write_json(tmp_path / "results.json", results)
    assert_one_line_error(cli(res, "--data", out, "--split", "train"), "results.json", *fragments)
    assert not (tmp_path / "results_vis_scores.json").exists()


@pytest.mark.parametrize("text,fragment", [("[{\"video_id\": 1,", "not valid JSON"),
                                           ("[NaN]", "not valid JSON"),
                                           ("{\"video_id\": 1}", "top level is a dict")])
def test_malformed_json_is_one_line(shards: tuple[Path, dict], tmp_path: Path, text: str, fragment: str) -> None:
    out, _ = shards
    res = tmp_path / "results.json"
    res.write_text(text)
    assert_one_line_error(cli(res, "--data", out, "--split", "train"), "results.json", fragment)


def test_unannotated_split_and_missing_file(shards: tuple[Path, dict], tmp_path: Path) -> None:
    out, doc = shards
    assert_one_line_error(cli(tmp_path / "none.json", "--data", out, "--split", "train"), "none.json")
    root = tmp_path / "ytvis"
    valid = {"videos": doc["videos"], "annotations": []}
    write_json(root / "valid.json", valid)
    ytvis_frames(root, "valid", valid)
    vout = tmp_path / "valid_shards"
    prepare_youtube_vis(root, vout, splits=["valid"], opts=ConvertOptions(workers=0))
    res = write_json(tmp_path / "results.json", [])
    assert_one_line_error(cli(res, "--data", vout), "no annotated tracks", "evaluation server")
    with pytest.raises(UserError, match="no video aaa"):
        video_ids(out, "train", write_json(tmp_path / "other.json",
                                           {"videos": [{"id": 1, "file_names": ["zzz/0.jpg"]}]}))
