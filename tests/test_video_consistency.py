"""VSPW video consistency VC_n: hand-built videos, a brute-force re-implementation of the VSPW
authors' definition, merging, and `rankseg eval` on VSPW shards (clips of T = 2, oracles)."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, tiny_run
from typer.testing import CliRunner
from video_lvis_trees import write_mask

from rankseg_cli.common import new_app
from rankseg_cli.train_cmds import evaluate, predict
from rankseg_core.config.model import ModelConfig
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.vspw import prepare_vspw
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.evaluate import EvalOptions, clip_classes, eval_clips, evaluate_model, rank_items
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.evaluation.video_consistency import VideoConsistency
from rankseg_core.model.selection import SelectionOptions, batch_selection, random_fill
from rankseg_core.shards.read import ShardDataset


def brute_vc(videos: list[tuple[list[np.ndarray], list[np.ndarray]]], n: int) -> float:
    """The VSPW authors' VC_n written from their definition: per video (frames in order), every
    window start i in range(L - n) (videos with L <= n skipped); GT-consistent pixels = GT equal
    to the window's first frame in all n frames; ratio = those whose predictions are also all
    equal to the first frame's / GT-consistent; nanmean over all windows of all videos."""
    ratios = []
    for preds, gts in videos:
        if len(gts) <= n:
            continue
        for i in range(len(gts) - n):
            gt_same = np.ones(gts[0].shape, bool)
            pred_same = np.ones(gts[0].shape, bool)
            for j in range(1, n):
                gt_same &= gts[i] == gts[i + j]
                pred_same &= preds[i] == preds[i + j]
            total = gt_same.sum()
            ratios.append((gt_same & pred_same).sum() / total if total else math.nan)
    return float(np.nanmean(ratios)) if ratios and not all(map(math.isnan, ratios)) else math.nan


def feed(videos: dict[str, tuple[list[np.ndarray], list[np.ndarray]]], sizes=(8, 16)) -> VideoConsistency:
    vc = VideoConsistency(sizes)
    for name, (preds, gts) in videos.items():
        vc.update_video(name, preds, gts)
    return vc


# --------------------------------------------------------------------------- hand-built videos


def test_consistent_predictions_score_one() -> None:
    gts = [np.full((4, 5), 3)] * 12
    preds = [np.full((4, 5), 7)] * 12  # wrong but perfectly consistent: VC measures only consistency
    vc = feed({"v": (preds, gts)}, (2, 8))
    assert vc.compute() == {2: 1.0, 8: 1.0}
    assert vc.num_windows(2) == 10 and vc.num_windows(8) == 4  # L - n windows: the last one is never scored


def test_flicker_lowers_exactly_the_windows_that_hold_it() -> None:
    L, n = 12, 3
    gts = [np.zeros((2, 5), np.int64) for _ in range(L)]
    preds = [np.zeros((2, 5), np.int64) for _ in range(L)]
    preds[6][0, 0] = 1  # one pixel of 10 flickers in frame 6
    # windows start at 0..L-n-1 = 0..8; those holding frame 6 start at 4, 5, 6: ratio 9/10
    expect = np.mean([0.9 if 4 <= i <= 6 else 1.0 for i in range(L - n)])
    assert feed({"v": (preds, gts)}, (n,)).compute()[n] == pytest.approx(expect, abs=1e-15)
    # a flicker in the last frame only touches the window the authors never score
    preds = [np.zeros((2, 5), np.int64) for _ in range(L)]
    preds[-1][:] = 5
    assert feed({"v": (preds, gts)}, (n,)).compute()[n] == 1.0


def test_pixels_where_gt_changes_are_left_out() -> None:
    L = 6
    gts = [np.zeros((1, 4), np.int64) for _ in range(L)]
    preds = [np.zeros((1, 4), np.int64) for _ in range(L)]
    for t in range(L):
        gts[t][0, 0] = t % 2  # GT flickers at pixel 0: never GT-consistent ...
        preds[t][0, 0] = t  # ... so its changing prediction does not count
        preds[t][0, 1] = t % 2  # GT-consistent pixel 1 flickers: it counts
    assert feed({"v": (preds, gts)}, (2,)).compute()[2] == pytest.approx(2 / 3)
    # ignore values are values like any other (the authors compare raw 0 / 255)
    ign = [np.full((1, 2), 65535) for _ in range(4)]
    flick = [np.array([[t % 2, 0]]) for t in range(4)]
    assert feed({"v": (flick, ign)}, (2,)).compute()[2] == 0.5


def test_short_videos_and_windows_without_consistent_gt() -> None:
    short = ([np.zeros((2, 2))] * 8, [np.zeros((2, 2))] * 8)  # L = n = 8: no window (L - n = 0)
    vc = feed({"short": short})
    assert math.isnan(vc.compute()[8]) and math.isnan(vc.compute()[16]) and vc.num_videos == 1
    # every GT pixel changes every frame: every window is 0/0, left out (nanmean), not 0
    gts = [np.full((2, 2), t) for t in range(10)]
    preds = [np.zeros((2, 2))] * 10
    two = ([np.zeros((2, 2))] * 2, [np.zeros((2, 2))] * 2)  # L = n = 2: no window
    vc = feed({"changing": (preds, gts), "two": two}, (2,))
    assert math.isnan(vc.compute()[2]) and vc.num_windows(2) == 0 and vc.state()["undefined"] == [8]
    long = ([np.zeros((2, 2))] * 10, [np.zeros((2, 2))] * 10)
    vc.update_video("long", *long)  # defined windows elsewhere: undefined ones do not pull it down
    assert vc.compute()[2] == 1.0 and vc.num_windows(2) == 8


def random_videos(seed: int) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Videos of 1..40 frames whose GT and predictions change in patches, with ignore pixels."""
    rng = np.random.default_rng(seed)
    out = {}
    for v in range(7):
        length, h, w = int(rng.integers(1, 41)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
        gt, pred = rng.integers(0, 3, (h, w)), rng.integers(0, 3, (h, w))
        gt[0, 0] = 65535
        gts, preds = [], []
        for _ in range(length):
            gt = np.where(rng.random((h, w)) < 0.03, rng.integers(0, 3, (h, w)), gt)
            pred = np.where(rng.random((h, w)) < 0.04, rng.integers(0, 3, (h, w)), pred)
            gts.append(gt.copy())
            preds.append(pred.copy())
        out[f"video{v}"] = (preds, gts)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_brute_force_and_merge(seed: int) -> None:
    videos = random_videos(seed)
    sizes = (2, 5, 8, 16)
    whole = feed(videos, sizes)
    got = whole.compute()
    for n in sizes:
        expect = brute_vc(list(videos.values()), n)
        assert (math.isnan(got[n]) and math.isnan(expect)) or got[n] == pytest.approx(expect, rel=1e-12), n
    assert 0 < got[2] < 1  # the random videos are neither perfect nor hopeless
    # split by video over three accumulators (as DDP ranks): states merge to the same numbers
    names = list(videos)
    parts = [feed({k: videos[k] for k in names[r::3]}, sizes) for r in range(3)]
    merged = VideoConsistency(sizes)
    for p in parts:
        merged.merge(p.state())
    m, w = merged.state(), whole.state()
    assert m["sums"] == pytest.approx(w["sums"], rel=1e-14)  # float sums in another order
    assert {k: v for k, v in m.items() if k != "sums"} == {k: v for k, v in w.items() if k != "sums"}
    # streaming frame by frame (torch tensors, with frame positions and gaps) = whole videos
    stream = VideoConsistency(sizes)
    for name, (preds, gts) in videos.items():
        for t, (p, g) in enumerate(zip(preds, gts)):
            stream.update(name, torch.as_tensor(p), torch.as_tensor(g), frame=3 * t)
    assert stream.compute() == got


def test_misuse_is_refused() -> None:
    z = np.zeros((2, 2))
    vc = VideoConsistency((2,))
    vc.update("a", z, z)
    vc.update("b", z, z)
    with pytest.raises(ValueError, match="already ended"):
        vc.update("a", z, z)
    with pytest.raises(ValueError, match="fed to two accumulators"):
        vc.merge(feed({"b": ([z], [z])}, (2,)))
    with pytest.raises(ValueError, match="different window sizes"):
        vc.merge(VideoConsistency((3,)))
    vc.update("c", z, z, frame=4)
    with pytest.raises(ValueError, match="in order"):
        vc.update("c", z, z, frame=4)
    with pytest.raises(UserError, match="frames differ in size"):
        vc.update("c", np.zeros((3, 2)), np.zeros((3, 2)), frame=5)
    for bad in ((), (1,), (2, 2)):
        with pytest.raises(ValueError):
            VideoConsistency(bad)


# --------------------------------------------------------------------------- rankseg eval on VSPW

VAL_VIDEOS = {"v1": 18, "v2": 10, "v3": 5}  # v1 has VC_16 windows, v3 none even of VC_8
H = W = 32


def write_frame(path: Path, corner: bool) -> None:
    ramp = (np.arange(W) * 6) % 200
    img = np.ascontiguousarray(np.broadcast_to(np.stack([ramp, ramp // 2, 200 - ramp], -1), (H, W, 3)),
                               np.uint8)
    if corner:
        img[:12, :12] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)


def vspw_video_tree(root: Path) -> None:
    """A VSPW_480p tree: train video t1 (4 frames), val videos as VAL_VIDEOS; masks hold 0
    ("others"), 255 (void) and classes in regions that move over time."""
    rng = np.random.default_rng(5)
    lists: dict[str, list[str]] = {"train": ["t1"], "val": list(VAL_VIDEOS)}
    for video, frames in {"t1": 4, **VAL_VIDEOS}.items():
        base = rng.choice(np.array([1, 9, 40, 124]), size=(H // 8, W // 8))
        for t in range(frames):
            mask = np.kron(base, np.ones((8, 8), np.int64)).astype(np.uint8)
            mask[:, : (t * 3) % W] = 17  # a band that grows: GT changes there
            mask[:2] = 0
            mask[-2:] = 255
            stem = f"{t + 1:08d}"
            # the frame changes in one corner from frame 12 on: the model's predictions change
            # there, so VC is neither 0 nor 1
            write_frame(root / "data" / video / "origin" / f"{stem}.jpg", corner=t >= 12)
            write_mask(root / "data" / video / "mask" / f"{stem}.png", mask)
    for split, vids in lists.items():
        (root / f"{split}.txt").write_text("".join(f"{v}\n" for v in vids))


@pytest.fixture(scope="module")
def vspw_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vspw")
    vspw_video_tree(root / "VSPW_480p")
    prepare_vspw(root / "VSPW_480p", root / "shards", opts=ConvertOptions(samples_per_shard=8, workers=0))
    return root / "shards"


def clip_run(data: Path, out: Path, *extra: str) -> Path:
    sets = tiny_run(kappa=6) + ["model.clip_len=2", "schedule.iters=1", "eval.batch_size=2",
                                "data.val_split=val", *extra]
    train(build_train_config(None, sets, data), out, progress=False)
    return out


@pytest.fixture(scope="module")
def run(vspw_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clip_run(vspw_shards, tmp_path_factory.mktemp("vspw_run") / "run")


def saved_videos(ds: ShardDataset, preds_dir: Path) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """Each val video's saved predictions and shard GT, frames in temporal order."""
    by_video: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for i in range(len(ds)):
        s = ds.load(i)
        pred = cv2.imread(str(preds_dir / f"{s['key'].replace('/', '__')}.png"), cv2.IMREAD_UNCHANGED)
        by_video.setdefault(s["video"], []).append((int(s["frame"]), pred.astype(np.int64), s["label"]))
    out = []
    for frames in by_video.values():
        frames.sort(key=lambda f: f[0])
        out.append(([f[1] for f in frames], [f[2] for f in frames]))
    return out


def test_eval_reports_vc_on_vspw_clips(run: Path, vspw_shards: Path, tmp_path: Path) -> None:
    """`rankseg eval`'s VC_8 / VC_16 on a T = 2 run equal the brute force on its saved predictions."""
    from rankseg_core.engine.evaluate import run_evaluation

    preds = tmp_path / "preds"
    rep, json_path, _ = run_evaluation(run, EvalOptions(progress=False, save_predictions=preds),
                                       json_path=tmp_path / "val.json", device="cpu")
    ds = ShardDataset(vspw_shards, "val")
    videos = saved_videos(ds, preds)
    assert rep["num_images"] == sum(VAL_VIDEOS.values()) == len(ds)
    for n in (8, 16):
        expect = brute_vc(videos, n)
        assert rep[f"vc{n}"] == pytest.approx(expect, rel=1e-12), n
    assert 0 < rep["vc8"] < 1  # the predictions change with the frames: a real check
    assert '"vc8"' in json_path.read_text()


def test_whole_videos_per_process(vspw_shards: Path) -> None:
    """Under DDP a video's clips all go to one process, in order; image shards keep every W-th item."""
    ds = ShardDataset(vspw_shards, "val")
    items = eval_clips(ds, 2)
    assert len(items) == sum((n + 1) // 2 for n in VAL_VIDEOS.values())
    parts = [rank_items(ds, items, r, 2) for r in range(2)]
    assert sorted(map(str, parts[0] + parts[1])) == sorted(map(str, items))
    owner: dict[str, int] = {}
    for r, part in enumerate(parts):
        for ids, _ in part:
            for i in ids:
                assert owner.setdefault(ds.arrays.video[i], r) == r
        frames = [(ds.arrays.video[i], int(ds.arrays.frame[i])) for ids, real in part
                  for i, ok in zip(ids, real) if ok]
        assert frames == sorted(frames, key=lambda f: (list(VAL_VIDEOS).index(f[0]), f[1]))
    assert len(set(owner.values())) == 2  # both processes work
    # T = 1 on video shards: frames in video / frame order as well
    singles = [ds.arrays.frame[ids[0]] for ids, _ in eval_clips(ds, 1) if ds.arrays.video[ids[0]] == "v1"]
    assert singles == list(range(VAL_VIDEOS["v1"]))


def test_clip_selection_is_one_list_per_clip() -> None:
    """A clip's random oracle fill is drawn once, from the union of its frames' GT classes, to
    kappa classes (a fill per frame would give a clip up to T x kappa classes)."""
    classes = [np.array([1, 2]), np.array([3]), np.array([4]), np.array([4, 5])]
    keys = ["v/1", "v/2", "w/1", "w/2"]
    merged, clip_keys = clip_classes(classes, keys, 2)
    assert [m.tolist() for m in merged] == [[1, 2, 3], [4, 5]] and clip_keys == ["v/1", "w/1"]
    m = ModelConfig(model="segmenter-vitt", num_classes=30, kappa=6, clip_len=2)
    sel = batch_selection(SelectionOptions(oracle=True, oracle_fill="random"), m, merged, torch.device("cpu"),
                          clip_keys)
    assert sel.override is not None and [len(o) for o in sel.override] == [6, 6]
    assert set(sel.override[0].tolist()) >= {1, 2, 3}
    with pytest.raises(ValueError):
        clip_classes(classes[:3], keys[:3], 2)


def cli(*args: object):
    app = new_app("test")
    app.command("eval")(evaluate)
    app.command("predict")(predict)  # two commands: `eval` is a subcommand, as in `rankseg`
    return CliRunner().invoke(app, [str(a) for a in args])


def test_oracles_run_on_clips(run: Path, vspw_shards: Path, tmp_path: Path) -> None:
    """Fig. 3's oracles on a T = 2 VSPW run: GT eval (plain, ranked and random fill) report VC;
    a random fill predicts only the clip's GT classes and one draw of others; the CLI runs it."""
    model, cfg = runs.load_run(run, "cpu")
    dev = torch.device("cpu")
    for sel in (SelectionOptions(oracle=True), SelectionOptions(oracle=True, oracle_fill="ranked", kappa=8)):
        res = evaluate_model(model, cfg, EvalOptions(progress=False, selection=sel), dev)
        assert 0 <= res["miou"] <= 1 and set(res["vc"]) == {8, 16}
    preds = tmp_path / "random"
    evaluate_model(model, cfg, EvalOptions(progress=False, save_predictions=preds,
                                           selection=SelectionOptions(oracle=True, oracle_fill="random")), dev)
    ds = ShardDataset(vspw_shards, "val")
    for ids, real in eval_clips(ds, 2):
        frames = [ds.load(i) for i in ids]
        union = np.unique(np.concatenate([f["classes"] for f in frames]))
        allowed = set(random_fill(union, cfg.model.num_classes, cfg.model.kappa, frames[0]["key"]).tolist())
        for f, ok in zip(frames, real):
            pred = cv2.imread(str(preds / f"{f['key'].replace('/', '__')}.png"), cv2.IMREAD_UNCHANGED)
            assert set(np.unique(pred).tolist()) <= allowed, f["key"]
    res = cli("eval", run, "--oracle", "--oracle-fill", "random", "--json", tmp_path / "o.json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert_one_line_error(cli("eval", run, "--oracle-fill", "random"), "--oracle")


def test_train_eval_oracle_on_clips(vspw_shards: Path, tmp_path: Path) -> None:
    """`rankseg train --oracle train-eval` (model.oracle) with T = 2 trains and evaluates on VSPW."""
    out = clip_run(vspw_shards, tmp_path / "oracle", "model.oracle=true")
    model, cfg = runs.load_run(out, "cpu")
    assert cfg.model.oracle and cfg.model.clip_len == 2
    res = evaluate_model(model, cfg, EvalOptions(progress=False), torch.device("cpu"))
    assert res["num_images"] == sum(VAL_VIDEOS.values()) and set(res["vc"]) == {8, 16}
    assert all(0 <= v <= 1 for v in res["vc"].values())


DDP_SCRIPT = """
import json, sys
import torch
from rankseg_core.engine import runs
from rankseg_core.engine.evaluate import EvalOptions, evaluate_model
from rankseg_core.utils import distributed as D

dev = torch.device("cpu")
info = D.init_distributed(dev)
model, cfg = runs.load_run(sys.argv[1], dev)
res = evaluate_model(model, cfg, EvalOptions(progress=False), dev)
if info.is_main:
    print("RESULT " + json.dumps({"vc": {str(n): v for n, v in res["vc"].items()}, "miou": res["miou"]}))
D.cleanup()
"""


@pytest.mark.slow
def test_two_processes_equal_one(run: Path, tmp_path: Path) -> None:
    """Two gloo processes (whole videos each, VC states gathered) give one process's VC_8 / VC_16."""
    import json
    import os
    import subprocess
    import sys

    model, cfg = runs.load_run(run, "cpu")
    one = evaluate_model(model, cfg, EvalOptions(progress=False), torch.device("cpu"))
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(run)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for n in (8, 16):
        assert two["vc"][str(n)] == pytest.approx(one["vc"][n], rel=1e-12), n
    assert two["miou"] == pytest.approx(one["miou"], abs=1e-12)
