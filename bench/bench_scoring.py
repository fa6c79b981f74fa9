"""`rankseg eval-predictions` against a detectron2-style scorer: wall time and peak memory.

    python bench/bench_scoring.py [--images 300] [--repeats 5] [--quick] [--data DIR] [--no-write]

Generates (into a temporary directory, or --data to keep and reuse it) N piecewise-constant
A-847-like label maps (683 x 512, K = 847, 16-bit, ~8 % ignore) as shards and as 16-bit GT
PNGs, and N 16-bit prediction PNGs (the GT with shifted borders and some regions relabelled,
some of them to classes absent from the image). Then runs, each in a fresh subprocess, in
interleaved repeats (the order alternates):

- `rankseg`: the `rankseg eval-predictions PRED --data SHARDS --protocol d2 --groups none`
  command, as a user runs it (the console entry point, its imports included);
- `reference`: a detectron2-style scorer written here from `SemSegEvaluator`'s published
  semantics: `cv2.imread` of prediction and GT, GT ignore -> K, `np.bincount((K+1) * pred +
  gt, minlength=(K+1)^2)` per image, then its `evaluate()` means;
- `decode`: reading the prediction and GT PNGs alone (`cv2.imread`), the limit of any scorer
  that reads PNG files.

Each child's peak resident memory is its own VmHWM, read at exit. rankseg
also runs on a split of N/5 of the images (`--allow-extra`): its peak must not grow with N.
The per-class pixel counts of rankseg's report are compared with the reference's matrix
(they must be equal). Writes the `bench_scoring` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from rankseg_core.shards.write import EncodedSample

REPO = Path(__file__).resolve().parents[1]
K, H, W, IGNORE = 847, 512, 683, 65535
FIXTURE_VERSION = 1  # bumped when the generated data change (regenerated on the next run)


# --------------------------------------------------------------------------- generation

def synth_pair(i: int) -> tuple[np.ndarray, np.ndarray]:
    """(GT, prediction) H x W uint16 of image i: blocks of ~20 of the K classes, an ignore band;
    the prediction shifts the borders and relabels a tenth of the blocks (some to classes the
    image lacks), as a real model's errors would."""
    rng = np.random.default_rng(i)
    present = rng.choice(K, 20, replace=False)
    cells = present[rng.integers(0, present.size, (16, 22))].astype(np.uint16)
    gt = cv2.resize(cells, (W, H), interpolation=cv2.INTER_NEAREST)
    top = int(rng.integers(0, H - 40))
    gt[top:top + 40, :] = IGNORE  # an unlabelled band: ~8 % of the pixels
    wrong = cells.copy()
    flip = rng.random(cells.shape) < 0.1
    wrong[flip] = rng.integers(0, K, int(flip.sum()))
    pred = np.roll(cv2.resize(wrong, (W, H), interpolation=cv2.INTER_NEAREST), (3, -5), (0, 1))
    return gt, pred


def _sample(key: str) -> EncodedSample:
    from rankseg_core.shards.write import encode_sample

    gt, _ = synth_pair(int(key.rsplit("_", 1)[1]))
    ok, buf = cv2.imencode(".jpg", np.zeros((H, W, 3), np.uint8))  # images are not read by scoring
    assert ok
    return encode_sample(key, buf.tobytes(), gt, K)


def build(root: Path, n: int) -> None:
    """shards/ (splits val: n images, val_small: the first n // 5), gt/ and pred/ PNGs."""
    stamp = root / "fixture.json"
    want = {"version": FIXTURE_VERSION, "images": n}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    from rankseg_core.convert.common import ConvertOptions, run_conversion
    from rankseg_core.shards.write import DatasetHeader

    for sub in ("shards", "gt", "pred"):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / "gt").mkdir(parents=True)
    (root / "pred").mkdir()
    keys = [f"img_{i:05d}" for i in range(n)]
    for i, key in enumerate(keys):
        gt, pred = synth_pair(i)
        cv2.imwrite(str(root / "gt" / f"{key}.png"), gt)
        cv2.imwrite(str(root / "pred" / f"{key}.png"), pred)
    header = DatasetHeader("bench_scoring", [f"class_{c}" for c in range(K)], options={"n": n}, source="bench")
    run_conversion(root / "shards", header, {"val": keys, "val_small": keys[:max(1, n // 5)]}, _sample,
                   ConvertOptions(samples_per_shard=1000))
    stamp.write_text(json.dumps(want))


# --------------------------------------------------------------------------- children

def reference(pred_dir: Path, gt_dir: Path, out: Path) -> None:
    """detectron2 SemSegEvaluator's process() + evaluate() on files (its published semantics)."""
    conf = np.zeros((K + 1, K + 1), dtype=np.int64)
    for name in sorted(os.listdir(pred_dir)):
        pred = np.asarray(cv2.imread(str(pred_dir / name), cv2.IMREAD_UNCHANGED), dtype=np.int64)
        gt = np.asarray(cv2.imread(str(gt_dir / name), cv2.IMREAD_UNCHANGED), dtype=np.int64)
        gt[gt == IGNORE] = K
        conf += np.bincount((K + 1) * pred.reshape(-1) + gt.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(np.float64)
    pos_gt = conf[:-1, :-1].sum(0).astype(np.float64)
    pos_pred = conf[:-1, :-1].sum(1).astype(np.float64)
    valid = (pos_gt > 0) & (pos_gt + pos_pred - tp > 0)  # detectron2 >= f3c1bc1
    miou = float(np.sum(tp[valid] / (pos_gt + pos_pred - tp)[valid]) / np.sum(valid))
    out.write_text(json.dumps({"miou": miou, "tp": tp.astype(int).tolist(), "gt": pos_gt.astype(int).tolist(),
                               "pred": pos_pred.astype(int).tolist()}))


def decode(pred_dir: Path, gt_dir: Path) -> None:
    """Read every prediction and GT PNG, nothing else."""
    for name in sorted(os.listdir(pred_dir)):
        cv2.imread(str(pred_dir / name), cv2.IMREAD_UNCHANGED)
        cv2.imread(str(gt_dir / name), cv2.IMREAD_UNCHANGED)


# --------------------------------------------------------------------------- measuring

def record_peak(path: str) -> None:
    """At exit, write this process's peak resident memory (VmHWM, MiB) to `path`.

    VmHWM belongs to the address space, which exec replaces: unlike a child's `ru_maxrss`, it
    does not inherit the (larger) parent's resident size from the fork."""
    def write() -> None:
        status = Path("/proc/self/status").read_text()
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        Path(path).write_text(str(kib / 1024))

    atexit.register(write)


def run_child(cmd: list[str], peak_file: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system, all threads), peak RSS MiB) of one fresh
    process; fails loudly if it fails."""
    peak_file.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "BENCH_SCORING_PEAK": str(peak_file)})
    err = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{err.decode()}")
    return wall, usage.ru_utime + usage.ru_stime, float(peak_file.read_text())


def rankseg_cmd(root: Path, split: str, json_out: Path) -> list[str]:
    # `rankseg` is the console script rankseg_cli.entry:main; the child runs exactly that.
    return [sys.executable, str(Path(__file__).resolve()), "--child", "rankseg",
            "eval-predictions", str(root / "pred"), "--data", str(root / "shards"), "--split", split,
            "--protocol", "d2", "--groups", "none", "--allow-extra", "--json", str(json_out)]


def measure(root: Path, repeats: int) -> dict:
    me = [sys.executable, str(Path(__file__).resolve())]
    cmds = {
        "rankseg": rankseg_cmd(root, "val", root / "out" / "scores.json"),
        "reference": [*me, "--child", "reference", str(root)],
        "decode": [*me, "--child", "decode", str(root)],
        "rankseg_small": rankseg_cmd(root, "val_small", root / "out" / "scores_small.json"),
    }
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cmds}
    order = list(cmds)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):  # alternate: drift hits both sides alike
            runs[name].append(run_child(cmds[name], root / "out" / "peak_mib"))
    return runs


def check_counts(root: Path) -> tuple[bool, float, float]:
    """(rankseg's per-class counts == the reference matrix's, rankseg mIoU, reference mIoU)."""
    rep = json.loads((root / "out" / "scores.json").read_text())
    ref = json.loads((root / "out" / "reference.json").read_text())
    ours = {f: [c[key] for c in rep["per_class"]]
            for f, key in (("tp", "intersection"), ("gt", "gt_pixels"), ("pred", "pred_pixels"))}
    same = all(ours[f] == ref[f] for f in ("tp", "gt", "pred"))
    return same, float(rep["miou"]), float(ref["miou"])


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # one measured process (see run_child)
        record_peak(os.environ["BENCH_SCORING_PEAK"])
        what, rest = sys.argv[2], sys.argv[3:]
        if what == "rankseg":
            from rankseg_cli.entry import main as rankseg_main

            sys.argv = ["rankseg", *rest]
            rankseg_main()
        elif what == "reference":
            root = Path(rest[0])
            reference(root / "pred", root / "gt", root / "out" / "reference.json")
        else:
            decode(Path(rest[0]) / "pred", Path(rest[0]) / "gt")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="40 images, 3 repeats (< 1 minute)")
    ap.add_argument("--data", type=Path, help="keep the generated data here (reused when it matches)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeats = 40, 3
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        (root / "out").mkdir(exist_ok=True)
        build(root, args.images)
        runs = measure(root, args.repeats)
        same, miou, ref_miou = check_counts(root)
    report(args, runs, same, miou, ref_miou)


def report(args: argparse.Namespace, runs: dict, same: bool, miou: float, ref_miou: float) -> None:
    med = {name: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v), max(r[2] for r in v))
           for name, v in runs.items()}
    ratios = [a[0] / b[0] for a, b in zip(runs["rankseg"], runs["reference"])]
    cpu_ratios = [a[1] / b[1] for a, b in zip(runs["rankseg"], runs["reference"])]
    n, small = args.images, max(1, args.images // 5)
    ratio = statistics.median(ratios)
    rows = [
        ("`rankseg eval-predictions`", *med["rankseg"]),
        ("detectron2-style reference (cv2.imread + one bincount)", *med["reference"]),
        ("decode limit: cv2.imread of prediction + GT PNGs", *med["decode"]),
        (f"`rankseg eval-predictions`, {small} images (`--allow-extra`)", *med["rankseg_small"]),
    ]
    lines = [
        f"`python bench/bench_scoring.py --images {n} --repeats {args.repeats}`"
        f" ({time.strftime('%Y-%m-%d', time.gmtime())}; {machine()}). {n} predictions at {W} x {H}, K = {K},",
        "16-bit PNGs; every run a fresh process (imports included), runs interleaved, order alternating;",
        "CPU = user + system seconds of the process (all its threads); peak memory = its own VmHWM.",
        "",
        "| run | wall s (median) | CPU s (median) | peak RSS MiB (max) |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {w:.2f} | {c:.2f} | {m:.0f} |" for name, w, c, m in rows],
        "",
        f"- rankseg / reference wall time: **{ratio:.2f}x** (median of the {len(ratios)} paired ratios; "
        f"range {min(ratios):.2f}-{max(ratios):.2f}); goal <= 1.1x. CPU time: "
        f"{statistics.median(cpu_ratios):.2f}x (rankseg decodes the next pair in a reader thread).",
        f"- rankseg / decode limit: {med['rankseg'][0] / med['decode'][0]:.2f}x; "
        f"reference / decode limit: {med['reference'][0] / med['decode'][0]:.2f}x (wall).",
        f"- peak memory: {med['rankseg'][2]:.0f} MiB at {n} images, {med['rankseg_small'][2]:.0f} MiB at "
        f"{small} (goal <= 150 MiB, independent of the number of predictions).",
        f"- per-class intersection / GT / predicted pixel counts equal to the reference's matrix: "
        f"**{'yes' if same else 'NO'}**; mIoU (d2) {100 * miou:.6f} vs {100 * ref_miou:.6f}.",
    ]
    body = "## Scoring prediction files (`bench/bench_scoring.py`)\n\n" + "\n".join(lines)
    print(body)
    if not same:
        raise SystemExit("per-class counts differ from the reference")
    if not args.no_write:
        sys.path.insert(0, str(REPO / "bench"))
        from report import write_section

        write_section("bench_scoring", body)


def machine() -> str:
    sys.path.insert(0, str(REPO / "bench"))
    from report import machine as m

    return m()


if __name__ == "__main__":
    main()
