"""ADE20K-Full conversion throughput: the physical limit, rankseg, and MaskFormer's algorithm.

    python bench/bench_convert.py [--images 300] [--large 75] [--rounds 3]

Generates an ADE20K_2021_17_01-style tree (683x512 images plus `--large` 1200x900 ones that
the 512 protocol resizes; 10-40 polygon-shaped classes per image, instance ids in B), then in
one run measures, single-threaded OpenCV throughout:
(a) the per-core limit: decode JPEG + decode _seg.png + remap + count + encode the label PNG
    (+ bilinear/nearest resize and the JPEG re-encode for the large images), from memory;
(b) `prepare_ade20k_full` with --workers 0 and --workers 2 (reads files, writes HDF5 shards);
(c) a re-implementation of MaskFormer's `datasets/prepare_ade20k_full_sem_seg.py` algorithm
    (written from its description): PIL decode, int32 class map, cv2 resize, a Python loop
    over the classes present building the uint16 label mask by mask, PIL save of the JPEG
    and of the label as TIFF.
Writes the `bench_convert` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from rankseg_core.convert.ade20k_full import load_table, prepare_ade20k_full, seg_codes, seg_lut, value_lut
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.resize import short_side_size
from rankseg_core.shards.codec import encode_label

SMALL, LARGE = (512, 683), (900, 1200)


def make_tree(root: Path, n: int, n_large: int, seed: int = 0) -> tuple[list[Path], float]:
    """Write n images (n_large of them LARGE) with polygon-shaped labels; return jpg paths, classes/img."""
    rng = np.random.default_rng(seed)
    ids = np.array([c["id"] for c in load_table()[0]])
    freq = 1.0 / np.arange(1, ids.size + 1)  # table order is by frequency: Zipf-like draws
    jpgs, ncls = [], []
    for i in range(n):
        h, w = LARGE if i < n_large else SMALL
        key = f"ADE_{'val' if i % 10 == 9 else 'train'}_{i:08d}"
        folder = root / "images" / "ADE" / ("validation" if "val" in key else "training") / "scene" / f"s{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        k = int(rng.integers(10, 41))
        classes = rng.choice(ids, k, replace=False, p=freq / freq.sum())
        values = np.full((h, w), classes[0], np.int32)
        inst = np.zeros((h, w), np.uint8)
        for j, c in enumerate(classes[1:], 1):  # polygons like ADE's annotations
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            r = rng.uniform(0.03, 0.3) * min(h, w)
            ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 12))))
            rad = r * rng.uniform(0.5, 1.0, ang.size)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(values, [pts], int(c))
            cv2.fillPoly(inst, [pts], j)
        values[rng.random((h, w)) < 0.002] = 0  # a few unlabelled pixels
        bgr = np.stack([inst, values % 256, (values // 256) * 10], -1).astype(np.uint8)
        cv2.imwrite(str(folder / f"{key}_seg.png"), bgr, [cv2.IMWRITE_PNG_COMPRESSION, 6])
        small = rng.integers(0, 256, (h // 24, w // 24, 3), dtype=np.uint8)
        photo = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        photo += rng.normal(0, 12, photo.shape)  # sensor-like detail: realistic JPEG entropy
        cv2.imwrite(str(folder / f"{key}.jpg"), np.clip(photo, 0, 255).astype(np.uint8),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
        jpgs.append(folder / f"{key}.jpg")
        ncls.append(len(np.unique(values)))
    return jpgs, float(np.mean(ncls))


def limit_pass(blobs: list[tuple[bytes, bytes]], lut: np.ndarray) -> None:
    """The irreducible work per image, from bytes in memory."""
    for jpg, png in blobs:
        img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
        seg = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
        h, w = seg.shape[:2]
        size = short_side_size(h, w, 512)
        if size != (h, w):
            img = cv2.resize(img, size[::-1], interpolation=cv2.INTER_LINEAR)
            seg = cv2.resize(seg, size[::-1], interpolation=cv2.INTER_NEAREST)
            cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        label = lut[seg_codes(seg)]
        np.bincount(label.ravel(), minlength=847)
        encode_label(label)


_BLOBS: list[tuple[bytes, bytes]] = []
_LUT: np.ndarray | None = None


def _limit_init(jpgs: list[Path]) -> None:
    global _BLOBS, _LUT
    cv2.setNumThreads(1)
    _BLOBS = [(p.read_bytes(), Path(str(p)[:-4] + "_seg.png").read_bytes()) for p in jpgs]
    _LUT = seg_lut(value_lut(load_table()[0]))
    limit_pass(_BLOBS[:3], _LUT)  # warm-up


def _limit_part(part: tuple[int, int]) -> float:
    """The limit pass over every `step`-th image from `start`, in a pool worker; returns CPU s."""
    start, step = part
    c = time.process_time()
    limit_pass(_BLOBS[start::step], _LUT)
    return time.process_time() - c


def maskformer_pass(jpgs: list[Path], out: Path, id_map: dict[int, int]) -> None:
    """MaskFormer's prepare_ade20k_full_sem_seg.py algorithm (re-implemented, single process)."""
    out.mkdir(parents=True, exist_ok=True)
    for jpg in jpgs:
        seg = np.array(Image.open(str(jpg)[:-4] + "_seg.png"))
        lab = (seg[:, :, 0] / 10).astype(np.int32) * 256 + seg[:, :, 1].astype(np.int32)
        img = np.asarray(Image.open(jpg))
        h, w = img.shape[:2]
        if min(h, w) > 512:
            nh, nw = (512, round(w / h * 512)) if w >= h else (round(h / w * 512), 512)
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            lab = cv2.resize(lab, (nw, nh), interpolation=cv2.INTER_NEAREST)
        label = np.full(lab.shape, 65535, np.uint16)
        for value in np.unique(lab):
            if value in id_map:
                label[lab == value] = id_map[value]
        Image.fromarray(img).save(out / jpg.name)
        Image.fromarray(label).save(out / (jpg.stem + ".tif"))


def measure(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of the children it reaped meanwhile).

    `fn` may return the CPU seconds of live processes that rusage cannot see yet (a pool
    that outlives the call); they are added.
    """
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    c, t = time.process_time(), time.perf_counter()
    unseen = fn() or 0.0
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    kids2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, cpu + unseen + (kids2.ru_utime - kids.ru_utime) + (kids2.ru_stime - kids.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--large", type=int, default=75)
    ap.add_argument("--rounds", type=int, default=3, help="best of N interleaved runs")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import machine, write_section

    cv2.setNumThreads(1)
    classes = load_table()[0]
    id_map = {c["id"]: c["train_id"] for c in classes}
    lut = seg_lut(value_lut(classes))
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ADE20K_2021_17_01"
        t_gen = time.perf_counter()
        jpgs, mean_classes = make_tree(root, args.images, args.large)
        t_gen = time.perf_counter() - t_gen
        n = len(jpgs)
        blobs = [(p.read_bytes(), Path(str(p)[:-4] + "_seg.png").read_bytes()) for p in jpgs]
        limit_pass(blobs[:5], lut)  # warm-up

        def ours(workers: int, limit: int | None = None) -> None:
            out = Path(tmp) / f"ours{workers}"
            prepare_ade20k_full(root, out, opts=ConvertOptions(workers=workers, limit=limit))
            index = json.loads((out / "dataset.json").read_text())
            assert limit or sum(s["num_samples"] for s in index["splits"].values()) == n
            shutil.rmtree(out)

        # The host is a shared VM: interleave the runs and keep each one's best of `rounds`
        # (wall and CPU separately). "spawn" = the 2-worker run on 1 image per split: the
        # fixed cost of starting the pool (fresh interpreters importing numpy/cv2/h5py).
        # "limit2" is the same limit work in 2 processes at once: what 2 busy cores of this machine
        # can do (shared caches and memory bandwidth, a virtual machine's neighbours), the
        # yardstick for `--workers 2`. The pool is started outside the timing.
        limit_pool = mp.get_context("spawn").Pool(2, initializer=_limit_init, initargs=(jpgs,))
        limit_pool.map(_limit_part, [(0, n), (1, n)])  # wait until both have loaded

        def limit2() -> float:
            return sum(limit_pool.map(_limit_part, [(0, 2), (1, 2)], chunksize=1))

        best: dict[str, list[float]] = {}
        runs = {"limit": lambda: limit_pass(blobs, lut), "limit2": limit2, "ours0": lambda: ours(0),
                "ours2": lambda: ours(2), "spawn": lambda: ours(2, limit=1),
                "mf": lambda: maskformer_pass(jpgs, Path(tmp) / "maskformer", id_map)}
        for _ in range(args.rounds):
            for name, fn in runs.items():
                wall, cpu = measure(fn)
                old = best.get(name, [float("inf")] * 2)
                best[name] = [min(old[0], wall), min(old[1], cpu)]
        limit_pool.terminate()
    load1 = os.getloadavg()[0]

    wall = {k: v[0] for k, v in best.items()}
    cpu = {k: v[1] for k, v in best.items()}
    wall["ours2_steady"] = wall["ours2"] - wall["spawn"]
    cpu["ours2_steady"] = cpu["ours2"] - cpu["spawn"]
    # (label, the limit run on the same number of cores)
    names = {
        "limit": ("(a) limit: decode + remap + count + encode (+ resize, re-encode), 1 process", "limit"),
        "limit2": ("(a2) the same limit work split over 2 processes", "limit2"),
        "ours0": ("(b) `prepare ade20k-full --workers 0`", "limit"),
        "ours2": ("(b) `prepare ade20k-full --workers 2`", "limit2"),
        "ours2_steady": (f"(b) same, minus the pool start-up ({wall['spawn']:.1f} s wall, "
                         f"{cpu['spawn']:.1f} CPU-s)", "limit2"),
        "mf": ("(c) MaskFormer's algorithm, 1 process", "limit"),
    }
    rows = []
    for k, (label, ref) in names.items():
        rows.append(f"| {label} | {n / wall[k]:.1f} | {wall['limit'] / wall[k]:.2f} | "
                    f"{wall[ref] / wall[k]:.2f} | {cpu['limit'] / cpu[k]:.2f} | {wall['mf'] / wall[k]:.1f}× |")
    table = "\n".join(rows)
    busy = max(load0, load1) > 1.5
    load_note = (f"the machine was shared with other jobs (load average {load0:.1f} at the start, "
                 f"{load1:.1f} at the end, on 2 cores), so wall-clock rates are depressed"
                 if busy else f"no other jobs ran (load average {load0:.1f} at the start, "
                 f"{load1:.1f} at the end, this benchmark included)")
    write_section("bench_convert", f"""
## ADE20K-Full conversion (`bench/bench_convert.py`)

{n} generated images in the ADE20K_2021_17_01 layout: {n - args.large} of {SMALL[1]}×{SMALL[0]} and
{args.large} of {LARGE[1]}×{LARGE[0]} (resized to 683×512 by the 512 protocol), {mean_classes:.1f}
classes per image on average (polygons, table classes drawn Zipf-like, instance ids in B);
tree generated in {t_gen:.0f} s. {machine()}; OpenCV single-threaded. Each run is the best of
{args.rounds}, interleaved; {load_note}.

| run | images/s (wall) | speed-up vs (a) | efficiency vs the limit on as many cores | CPU efficiency (images per CPU-s, vs (a)) | speed vs MaskFormer (wall) |
| --- | --- | --- | --- | --- | --- |
{table}

- (a) is the work no converter can skip, from bytes already in memory: JPEG + PNG decode,
  the LUT remap, one `bincount`, the 16-bit label PNG encode, and for the large images the
  bilinear / nearest resize and the quality-95 JPEG re-encode.
- (a2) is the yardstick for 2 workers: the same work in 2 processes at once, each on every
  other image. It shows what 2 busy cores of this virtual machine deliver (they share caches,
  memory bandwidth and a host with other tenants): {wall['limit'] / wall['limit2']:.2f}× one core here.
- Ratios within about ±5% of 1.00 are noise: the host's speed drifts between runs even with
  nothing else running, which the best-of-{args.rounds} interleaving only partly cancels.
- (b) adds reading the files, the JPEG end-marker / EXIF checks, the HDF5 write, sha256 and
  fsync; with 2 workers, also pickling each encoded sample to the writer process. CPU time
  counts the writer and the workers, and the writer is a third busy process on 2 cores.
  Spawning the pool (a fresh Python per worker importing numpy, OpenCV and h5py, once per
  conversion) is a fixed cost, shown separately: {wall['spawn']:.1f} s is {wall['spawn'] / wall['ours2']:.0%} of
  this {n}-image run, and {wall['spawn'] * n / (27574 * wall['ours2_steady']):.1%} of a conversion of the 27,574 images of
  the release at the steady rate.
  The steady-state row is the one to hold against the limit.
- (c) follows MaskFormer's script step by step: it decodes with PIL, builds an int32 class
  map, resizes with OpenCV, then loops in Python over the classes present
  (`label[lab == v] = id_map[v]`: one full-image comparison per class), and saves the image
  with PIL (JPEG quality 75, re-encoding *every* image) and the label as an uncompressed TIFF.
  It computes no targets. rankseg stores the same labels (checked against this algorithm on
  the real ADE20K files by `tests/test_convert_ade20k_full.py`), keeps unresized JPEGs byte
  for byte, re-encodes resized ones at quality 95, and compresses the labels (PNG).
""")
    print(" ".join(f"{k}: {n / wall[k]:.1f} img/s wall, {n / cpu[k]:.1f} img/CPU-s;" for k in names))


if __name__ == "__main__":
    main()
