"""Synthetic prepare throughput against its physical limit, and `stats class-cdf` at 100k samples.

    python bench/bench_prepare.py [--images 600] [--cdf-samples 100000]

Writes the `bench_prepare` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

from rankseg_core.convert.common import ConvertOptions, run_conversion  # noqa: E402
from rankseg_core.convert.synthetic import make_world, prepare_synthetic, render  # noqa: E402
from rankseg_core.shards.codec import encode_jpeg, encode_label  # noqa: E402
from rankseg_core.shards.stats import dataset_class_cdf  # noqa: E402
from rankseg_core.shards.write import DatasetHeader, encode_sample  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def tiny_sample(key: str, num_classes: int = 847):
    """A 16x16 label with 2-40 random classes: cheap to write, realistic class lists."""
    rng = np.random.default_rng(int(key))
    n = int(rng.integers(2, 41))
    label = rng.choice(rng.choice(num_classes, n, replace=False), (16, 16)).astype(np.uint16)
    return encode_sample(key, b"", label, num_classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cdf-samples", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3, help="best of N interleaved runs")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    n, size = args.images, args.size
    world = make_world(1000, 0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        drawn = [render(world, np.random.default_rng([0, 1, i]), size) for i in range(n)]
        # Best of `rounds`, interleaved: the host's speed drifts even when nothing else runs.
        t_render = t_encode = float("inf")
        t_full = {0: float("inf"), 2: float("inf")}
        for r in range(args.rounds):
            t_render = min(t_render, timed(lambda: [render(world, np.random.default_rng([0, 1, i]), size)
                                                    for i in range(n)]))
            t_encode = min(t_encode, timed(lambda: [(encode_jpeg(im), encode_label(lb)) for im, lb in drawn]))
            for workers in t_full:
                out = Path(tmp) / f"w{workers}-{r}"
                t_full[workers] = min(t_full[workers], timed(lambda: prepare_synthetic(
                    out, images=n, val_images=1, size=size,
                    opts=ConvertOptions(workers=workers, samples_per_shard=500))))
        limit = n / (t_render + t_encode)
        rows.append(("render alone (numpy)", n / t_render, "", ""))
        rows.append(("JPEG + 16-bit PNG encode alone", n / t_encode, "", ""))
        rows.append(("render + encode (the limit, 1 core)", limit, "1.00", "1.00"))
        for w, t in t_full.items():
            # (n + 1): prepare also writes the single val image.
            rows.append((f"`prepare synthetic --workers {w}`", (n + 1) / t, f"{(n + 1) / t / limit:.2f}",
                         f"{(n + 1) / t / limit / max(w, 1):.2f}"))

        cdf_dir = Path(tmp) / "cdf"
        header = DatasetHeader(name="cdf-bench", class_names=[str(i) for i in range(847)])
        keys = [f"{i:07d}" for i in range(args.cdf_samples)]
        t_write = timed(lambda: run_conversion(cdf_dir, header, {"train": keys}, tiny_sample,
                                               ConvertOptions(workers=2, samples_per_shard=5000)))
        t_cdf = min(timed(lambda: dataset_class_cdf(cdf_dir)) for _ in range(3))

    table = "\n".join(f"| {name} | {rate:.1f} | {ratio} | {per_core} |" for name, rate, ratio, per_core in rows)
    write_section("bench_prepare", f"""
## Synthetic prepare (`bench/bench_prepare.py`)

{n} images of {size}×{size}, K = 1000; {machine()}; every run is the best of
{args.rounds}, interleaved; load average {os.getloadavg()[0]:.1f} at the end.

| step | images/s | ratio to the 1-core limit | per core used |
| --- | --- | --- | --- |
{table}

The limit for one core is drawing the image (vectorised numpy) plus encoding it and its label.
`prepare` adds the class count, the HDF5 write, sha256 and fsync; with `--workers 2` it uses
both cores (ratio > 1 is the second core) and includes starting the 2 worker processes
(about 1 s); the single writer process stays out of the way.

## `stats class-cdf` on {args.cdf_samples:,} samples

{len(keys):,} samples in {-(-len(keys) // 5000)} shards (written in {t_write:.1f} s as a fixture):
`stats class-cdf` takes **{t_cdf:.3f} s** (best of 3), because it reads only each shard's
`class_offsets` array and never decodes a label.
""")
    print(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md", "updated")


if __name__ == "__main__":
    main()
