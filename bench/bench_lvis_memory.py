"""COCO+LVIS at full scale: peak memory and time of `prepare coco-lvis` on LVIS v1 train-sized JSONs.

    python bench/bench_lvis_memory.py [--images 100000] [--annotations 1270000] [--limit 20]
                                      [--baseline a520dae] [--data DIR]

Generates (into a temporary directory, or --data to keep and reuse them):
- `lvis_v1_train.json` with the structure of the real file (keys info, annotations, images,
  licenses, categories in that order; 1,203 categories with synset / synonyms / def /
  frequency; ~100k images with coco_url, neg_category_ids, not_exhaustive_category_ids; ~1.27 M
  annotations of 1-3 polygons (75 / 17 / 8 %) of 18-54 points, coordinates with 2 decimals,
  annotations in random image order as in the real file): about 1.1 GB like the real one;
- `stuff_train2017.json` (COCO-Stuff format, ~8.5 compressed-RLE stuff annotations per image
  as in the real file, strings drawn from a pool of pycocotools-encoded blob masks);
- JPEGs only for the first `--limit` images (the ones a `--limit` run converts).

Then runs, each in a fresh subprocess, one after the other: `json.load` of the LVIS JSON alone
(the reference figure), `prepare_coco_lvis --workers 0 --limit N` with today's code, the same
with the code of `--baseline` (the commit before the JSONs were streamed, loaded from git),
and today's code with `--workers 2`. Reports the peak resident memory (ru_maxrss) of the main
process and of the largest worker, the wall time, and whether the baseline's shards are
byte-identical to today's. Writes the `bench_lvis_memory` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STUFF_VERSION = 2  # bumped when the generated stuff JSON changes (regenerated on the next run)
SIZES = [(480, 640)] * 6 + [(640, 480)] * 2 + [(427, 640)] * 2 + [(640, 427), (375, 500), (500, 375)]


# --------------------------------------------------------------------------- generation

def _polygon_block(rng: np.random.Generator, n: int, h: np.ndarray, w: np.ndarray) -> list[list[list[float]]]:
    """n annotations' polygons (1-3 star-shaped polygons each) inside their h x w images."""
    out = []
    nparts = rng.choice([1, 2, 3], n, p=[0.75, 0.17, 0.08])
    for i in range(n):
        polys = []
        for _ in range(nparts[i]):
            k = int(rng.integers(18, 55))
            r = rng.uniform(5, min(h[i], w[i]) / 3)
            cx, cy = rng.uniform(0, w[i]), rng.uniform(0, h[i])
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = r * rng.uniform(0.6, 1.0, k)
            x = np.clip(cx + rad * np.cos(ang), 0, w[i])
            y = np.clip(cy + rad * np.sin(ang), 0, h[i])
            polys.append(np.round(np.stack([x, y], 1).ravel(), 2).tolist())
        out.append(polys)
    return out


def generate_lvis(path: Path, n_images: int, n_anns: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Write an lvis_v1_train.json-like file; returns (image id, h, w) in id order."""
    rng = np.random.default_rng(seed)
    table = json.loads((REPO / "datasets" / "coco_lvis" / "classes.json").read_text())["classes"][:1203]
    ids = np.sort(rng.choice(600_000, n_images, replace=False) + 1)
    hw = [SIZES[i] for i in rng.integers(0, len(SIZES), n_images)]
    zipf = 1.0 / np.arange(1, 1204) ** 0.8
    cats = rng.choice(np.arange(1, 1204), n_anns, p=zipf / zipf.sum())
    owner = rng.integers(0, n_images, n_anns)  # annotations in random image order
    with open(path, "w") as f:
        f.write('{"info": {"description": "LVIS v1 (generated for bench_lvis_memory)", "year": 2020, '
                '"version": "1.0", "date_created": "2020-01-01"}, "annotations": [')
        block = 10_000
        for s in range(0, n_anns, block):
            e = min(n_anns, s + block)
            h = np.array([hw[o][0] for o in owner[s:e]])
            w = np.array([hw[o][1] for o in owner[s:e]])
            polys = _polygon_block(rng, e - s, h, w)
            parts = []
            for j in range(e - s):
                xs, ys = polys[j][0][0::2], polys[j][0][1::2]
                box = [round(min(xs), 2), round(min(ys), 2), round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)]
                parts.append(json.dumps({"area": round(box[2] * box[3] * 0.6, 2), "id": s + j + 1,
                                         "segmentation": polys[j], "image_id": int(ids[owner[s + j]]),
                                         "bbox": box, "category_id": int(cats[s + j])}))
            f.write(("," if s else "") + ",".join(parts))
        f.write('], "images": [')
        f.write(",".join(json.dumps({
            "date_captured": "2013-11-14 11:18:45",
            "neg_category_ids": sorted(rng.choice(1203, int(rng.integers(0, 15)), replace=False).tolist()),
            "id": int(iid), "license": int(rng.integers(1, 8)), "height": hw[i][0], "width": hw[i][1],
            "flickr_url": f"http://farm4.staticflickr.com/3153/{iid}_0123456789_z.jpg",
            "coco_url": f"http://images.cocodataset.org/train2017/{iid:012d}.jpg",
            "not_exhaustive_category_ids": sorted(rng.choice(1203, int(rng.integers(0, 4)), replace=False).tolist())})
            for i, iid in enumerate(ids)))
        f.write('], "licenses": [' + ",".join(json.dumps({"url": "http://creativecommons.org/licenses/", "id": i,
                                                          "name": "Attribution License"}) for i in range(1, 9)))
        f.write('], "categories": [' + ",".join(json.dumps({
            "frequency": "fcr"[c["id"] % 3], "id": c["id"], "synset": c["synset"],
            "image_count": int(rng.integers(1, 5000)), "instance_count": int(rng.integers(1, 50000)),
            "synonyms": [c["name"], c["name"].replace("_", " ")],
            "def": f"a generated definition of {c['name'].replace('_', ' ')} used as a stand-in", "name": c["name"]})
            for c in table) + "]}")
    return [(int(iid), *hw[i]) for i, iid in enumerate(ids)]


def _rle_pool(rng: np.random.Generator, h: int, w: int, n: int = 48) -> list[str]:
    """Compressed RLE strings of blob masks of h x w (lengths spread like COCO-Stuff's)."""
    import cv2
    from pycocotools import mask as mask_utils

    pool = []
    for i in range(n):
        cells = int(rng.integers(2, 6))  # smooth blobs: strings of ~1,100 characters on average, as in
        # the real stuff_train2017.json (1,105 in the 17 annotations of the stuff_examples fixture)
        field = cv2.resize(rng.random((cells, cells)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        mask = field > np.quantile(field, rng.uniform(0.5, 0.95))
        pool.append(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode())
    return pool


def generate_stuff(path: Path, images: list[tuple[int, int, int]], seed: int = 1) -> float:
    """Write a stuff_train2017.json-like file for `images`; returns the mean RLE string length."""
    rng = np.random.default_rng(seed)
    pools = {hw: _rle_pool(rng, *hw) for hw in set(SIZES)}
    lengths = []
    with open(path, "w") as f:
        f.write('{"info": {"description": "COCO-Stuff (generated)"}, "images": [')
        f.write(",".join(json.dumps({"license": 1, "file_name": f"{iid:012d}.jpg", "height": h, "width": w,
                                     "coco_url": f"http://images.cocodataset.org/train2017/{iid:012d}.jpg",
                                     "id": iid}) for iid, h, w in images))
        f.write('], "licenses": [], "categories": [' + ",".join(json.dumps(
            {"supercategory": "stuff", "id": k, "name": f"stuff{k}"}) for k in range(92, 184)) + '], "annotations": [')
        ann_id = 0
        for n, (iid, h, w) in enumerate(images):
            parts = []
            for k in sorted(rng.choice(np.arange(92, 183), int(rng.integers(5, 11)), replace=False).tolist()) + [183]:
                counts = pools[(h, w)][int(rng.integers(0, 48))]
                lengths.append(len(counts))
                ann_id += 1
                parts.append(json.dumps({"segmentation": {"counts": counts, "size": [h, w]}, "area": 1000.0,
                                         "iscrowd": 0, "image_id": iid, "bbox": [0.0, 0.0, 10.0, 10.0],
                                         "category_id": k, "id": 10_000_000 + ann_id}))
            f.write(("," if n else "") + ",".join(parts))
        f.write("]}")
    return float(np.mean(lengths))


def generate_jpegs(coco: Path, images: list[tuple[int, int, int]]) -> None:
    import cv2

    for iid, h, w in images:
        ramp = ((np.arange(w) * 3 + iid) % 200).astype(np.uint8)
        img = np.ascontiguousarray(np.broadcast_to(np.stack([ramp, ramp // 2, 200 - ramp], -1), (h, w, 3)))
        (coco / "train2017").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(coco / "train2017" / f"{iid:012d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 80])


# --------------------------------------------------------------------------- measured runs (children)

def _old_module(rev: str, tmp: Path):
    """The converter module of commit `rev`, imported next to today's package."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:rankseg_core/convert/coco_lvis.py"],
                         capture_output=True, check=True).stdout
    path = tmp / "coco_lvis_baseline.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("rankseg_core.convert.coco_lvis_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


class Probe:
    """Wraps the converter's per-sample maker: after each sample, the worker process writes its
    peak RSS (VmHWM) to `folder/<pid>`. (RUSAGE_CHILDREN cannot tell: a spawned child's
    ru_maxrss starts at its parent's RSS at fork time.)"""

    def __init__(self, maker, folder: str) -> None:
        self.maker, self.folder = maker, folder

    def __call__(self, key: str):
        try:
            return self.maker(key)
        finally:
            status = Path("/proc/self/status").read_text()
            hwm = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))
            Path(self.folder, str(os.getpid())).write_text(hwm)


def check_costs(data: Path) -> dict:
    """Seconds spent in the geometry checks vs streaming the LVIS annotations alone, and the
    per-image cost of checking an image's compressed RLE strings (done when painting)."""
    from rankseg_core.convert.geometry import polygon_lists, polygon_problems, rle_string_problems
    from rankseg_core.convert.source_io import stream_items

    t = time.perf_counter()
    structure = values = 0.0
    xy: list[float] = []
    ends, hs, ws = [], [], []
    for ann in stream_items(data / "lvis_v1_train.json", "annotations.item", "LVIS JSON"):
        c = time.perf_counter()
        polys = polygon_lists(ann["segmentation"])
        structure += time.perf_counter() - c
        for poly in polys:  # what the packer does anyway
            xy.extend(poly)
            ends.append(len(xy))
            hs.append(640)
            ws.append(640)
        if len(xy) > 1 << 20:
            flat = np.asarray(xy, np.float64)  # the packer converts and writes these anyway
            c = time.perf_counter()
            polygon_problems(flat, np.array(ends), np.array(hs), np.array(ws))
            values += time.perf_counter() - c
            xy, ends, hs, ws = [], [], [], []
    check = structure + values
    total = time.perf_counter() - t
    per_image, strings = [], []
    for ann in stream_items(data / "stuff_train2017.json", "annotations.item", "stuff JSON"):
        strings.append(ann["segmentation"]["counts"].encode())
        if ann["category_id"] == 183:  # the last annotation of each generated image
            c = time.perf_counter()
            rle_string_problems(np.frombuffer(b"".join(strings), np.uint8), np.cumsum([len(x) for x in strings]),
                                np.full(len(strings), 480), np.full(len(strings), 640))
            per_image.append(time.perf_counter() - c)
            strings = []
            if len(per_image) == 2000:
                break
    return {"stream_s": total - check, "structure_s": structure, "values_s": values,
            "rle_ms_per_image": 1000 * float(np.median(per_image))}


def child(args: argparse.Namespace) -> None:
    data = Path(args.data)
    if args.child == "checks":
        print(json.dumps(check_costs(data)))
        return
    probes = Path(args.out).parent / (Path(args.out).name + ".probes")
    probes.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.child == "json_load":
        with open(data / "lvis_v1_train.json", "rb") as f:
            doc = json.load(f)
        assert len(doc["annotations"]) > 0
    else:
        from rankseg_core.convert.common import ConvertOptions

        if args.child == "baseline":
            prepare = _old_module(args.baseline, Path(args.out).parent).prepare_coco_lvis
        else:
            from rankseg_core.convert import coco_lvis

            prepare, run = coco_lvis.prepare_coco_lvis, coco_lvis.run_conversion
            if args.workers:
                coco_lvis.run_conversion = lambda out, header, splits, maker, opts: run(
                    out, header, splits, Probe(maker, str(probes)), opts)
        prepare(data / "coco", [data / "lvis_v1_train.json"], [data / "stuff_train2017.json"], args.out,
                opts=ConvertOptions(workers=args.workers, limit=args.limit))
    wall = time.perf_counter() - t
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = max((int(p.read_text()) / 1024 for p in probes.iterdir()), default=0.0)
    print(json.dumps({"wall": wall, "main_mb": me, "worker_mb": workers}))


def run_child(name: str, data: Path, out: Path, args: argparse.Namespace, workers: int = 0) -> dict | None:
    cmd = [sys.executable, __file__, "--child", name, "--data", str(data), "--out", str(out),
           "--limit", str(args.limit), "--workers", str(workers), "--baseline", args.baseline]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode != 0:
        print(f"{name} failed ({res.returncode}): {res.stderr[-1500:]}", file=sys.stderr)
        return None
    out_line = res.stdout.strip().splitlines()[-1]
    print(name, out_line)
    return json.loads(out_line)


def shard_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(out.glob("*.h5")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--annotations", type=int, default=1_270_000)
    ap.add_argument("--limit", type=int, default=20, help="images converted by each measured run")
    ap.add_argument("--baseline", default="a520dae", help="commit whose converter is the 'before' run")
    ap.add_argument("--data", help="keep the generated files here (reused when present)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import machine, write_section

    with tempfile.TemporaryDirectory(prefix="bench-lvis-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        data.mkdir(parents=True, exist_ok=True)
        meta_path = data / "meta.json"
        want = {"images": args.images, "annotations": args.annotations}
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        if {k: meta.get(k) for k in want} != want:
            t = time.perf_counter()
            images = generate_lvis(data / "lvis_v1_train.json", args.images, args.annotations)
            meta = dict(want, images_hw=images, gen_s=time.perf_counter() - t)
            meta_path.write_text(json.dumps(meta))
        if meta.get("stuff") != STUFF_VERSION:
            t = time.perf_counter()
            meta["rle_len"] = generate_stuff(data / "stuff_train2017.json", [tuple(x) for x in meta["images_hw"]])
            meta.update(stuff=STUFF_VERSION, gen_s=meta["gen_s"] + time.perf_counter() - t)
            meta_path.write_text(json.dumps(meta))
        generate_jpegs(data / "coco", [tuple(x) for x in meta["images_hw"][:args.limit]])
        sizes = {n: (data / n).stat().st_size / 1e9 for n in ("lvis_v1_train.json", "stuff_train2017.json")}
        print(f"data: {sizes} (generated in {meta['gen_s']:.0f} s)")
        load0 = os.getloadavg()[0]
        r = {"json_load": run_child("json_load", data, Path(tmp) / "o0", args),
             "new": run_child("new", data, Path(tmp) / "o1", args),
             "baseline": run_child("baseline", data, Path(tmp) / "o2", args),
             "new2": run_child("new", data, Path(tmp) / "o3", args, workers=2),
             "checks": run_child("checks", data, Path(tmp) / "o4", args)}
        same = (shard_digest(Path(tmp) / "o1") == shard_digest(Path(tmp) / "o2")) if r["baseline"] else None
        same2 = shard_digest(Path(tmp) / "o1") == shard_digest(Path(tmp) / "o3")
        load1 = os.getloadavg()[0]

    def cell(k: str, f: str) -> str:
        return "n/a" if r[k] is None else f"{r[k][f] / 1024:.2f} GB" if f.endswith("mb") else f"{r[k][f]:.0f} s"

    rows = [("`json.load(lvis_v1_train.json)` alone", "json_load", False),
            (f"`prepare coco-lvis --workers 0 --limit {args.limit}`, before (`{args.baseline}`: `json.load`)",
             "baseline", False),
            (f"`prepare coco-lvis --workers 0 --limit {args.limit}`, now (streamed)", "new", False),
            (f"`prepare coco-lvis --workers 2 --limit {args.limit}`, now", "new2", True)]
    table = "\n".join(f"| {label} | {cell(k, 'main_mb')} | {cell(k, 'worker_mb') if w else '-'} | {cell(k, 'wall')} |"
                      for label, k, w in rows)
    ck = r["checks"]
    checks_line = ("n/a." if ck is None else
                   f"{ck['structure_s']:.1f} s (structure) + {ck['values_s']:.1f} s (values) over all "
                   f"{args.annotations:,} LVIS annotations, against {ck['stream_s']:.1f} s to stream and pack them "
                   f"({(ck['structure_s'] + ck['values_s']) / ck['stream_s']:.0%}; the `json.load` version already "
                   f"type-checked every number, about 3x slower than the structure check); checking one "
                   f"image's compressed RLE strings (done when the image is painted, in the workers) takes "
                   f"{ck['rle_ms_per_image']:.2f} ms, against tens of ms to convert the image.")
    if args.no_write:
        print(table)
        print(checks_line)
        return
    write_section("bench_lvis_memory", f"""
## COCO+LVIS at full scale: memory (`bench/bench_lvis_memory.py`)

Generated `lvis_v1_train.json` with the real file's structure and size: {args.images:,} images,
{args.annotations:,} annotations of 1-3 polygons (18-54 points, 2-decimal coordinates, in random
image order), 1,203 categories: **{sizes['lvis_v1_train.json']:.2f} GB** (the real file: about 1.1 GB).
`stuff_train2017.json` for the same images: 6-11 compressed RLEs per image (mean string
{meta['rle_len']:.0f} characters): **{sizes['stuff_train2017.json']:.2f} GB**. Each run is a fresh
process converting the first {args.limit} images (JPEGs generated for those), so nearly all of its
memory and time is reading and indexing the two JSONs. {machine()}; load average {load0:.1f} at
the start, {load1:.1f} at the end.

| run | peak RSS, main process | peak RSS, largest worker | wall time |
| --- | --- | --- | --- |
{table}

- Before, each JSON was parsed whole with `json.load` (Python objects for every number of
  every polygon). Now the JSONs are streamed with `ijson` (yajl's C parser): images first,
  then annotations one at a time, each checked (`convert/geometry.py`) and appended to flat
  files in a temporary directory; the main process keeps a few arrays per annotation.
  Streaming parses the file three times (categories, images, annotations: the sections can
  come in any order), which is why the wall time is not lower.
- Output: the shards of the "before" and "now" runs are
  {'byte-identical' if same else 'DIFFERENT' if same is not None else 'not compared (no baseline)'};
  `--workers 2` gives {'the same bytes' if same2 else 'DIFFERENT bytes'}.
- The geometry checks (`convert/geometry.py`: structure of every polygon, then finiteness,
  bounds and boundary length vectorised per million coordinates) took {checks_line}
- Workers receive only the per-image table and read coordinates and RLE bytes with `pread`
  from the packed files (the small index arrays are memory-mapped), so a worker's memory does
  not grow as it paints more images.
""")


if __name__ == "__main__":
    main()
