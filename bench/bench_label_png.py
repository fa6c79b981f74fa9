"""The label PNG's row filter: libpng's per-row choice against one fixed filter.

    python bench/bench_label_png.py [--repeats 20] [--no-write]

Shards store every label (and panoptic segment) map as a 16-bit PNG, compression level 1
(shards/codec.py `encode_label`). Decoding it is a training worker's second cost after the
JPEG; encoding it a converter's. This measures, on the same label maps, in one process
(best of --repeats passes, the variants interleaved):
- bytes, decode ms and encode ms with libpng's adaptive choice among all five filters (what
  OpenCV does by default), with the "up" filter only (what `encode_label` writes), and with
  no filter;
- on the ADE20K-Full `_seg.png` fixtures (../shared/fixtures; real 2-3 MP maps, class =
  R / 10 * 256 + G, as the converter reads them) when present, and on synthetic 256 px maps.
Writes the `bench_label_png` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "ade20k_full"
VARIANTS = {
    "libpng's choice (all filters, OpenCV's default)": [cv2.IMWRITE_PNG_COMPRESSION, 1],
    "up (what `encode_label` writes)": [cv2.IMWRITE_PNG_COMPRESSION, 1,
                                        cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_UP],
    "none": [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE],
}


def ade_labels() -> list[np.ndarray]:
    """The fixtures' `_seg.png` maps as uint16 ADE class indices (R / 10 * 256 + G)."""
    out = []
    for f in sorted(FIXTURES.rglob("*_seg.png")):
        seg = cv2.imread(str(f), cv2.IMREAD_COLOR)  # BGR
        out.append((seg[..., 2].astype(np.int32) // 10 * 256 + seg[..., 1]).astype(np.uint16))
    return out


def synthetic_labels() -> list[np.ndarray]:
    from rankseg_core.convert.common import ConvertOptions
    from rankseg_core.convert.synthetic import prepare_synthetic
    from rankseg_core.shards.codec import decode_label
    from rankseg_core.shards.read import ShardDataset

    with tempfile.TemporaryDirectory() as tmp:
        prepare_synthetic(Path(tmp) / "d", num_classes=150, images=32, val_images=1, size=256, seed=0,
                          opts=ConvertOptions(samples_per_shard=16))
        ds = ShardDataset(Path(tmp) / "d", "train")
        return [decode_label(ds.blobs(i)[1]) for i in range(len(ds))]


def measure(labels: list[np.ndarray], repeats: int) -> dict[str, tuple[float, float, float]]:
    """variant -> (mean bytes, decode ms, encode ms) per map; best of the interleaved passes."""
    encoded = {k: [cv2.imencode(".png", lab, p)[1] for lab in labels] for k, p in VARIANTS.items()}
    for k, enc in encoded.items():  # every variant holds the same values
        assert all(np.array_equal(cv2.imdecode(e, cv2.IMREAD_UNCHANGED), lab) for e, lab in zip(enc, labels)), k
    best: dict[tuple[str, str], float] = {}

    def timed(key: tuple[str, str], fn: Callable[[], object]) -> None:
        t = time.process_time()
        fn()
        best[key] = min(best.get(key, float("inf")), (time.process_time() - t) * 1000 / len(labels))

    for _ in range(repeats):
        for k, p in VARIANTS.items():
            timed((k, "decode"), lambda: [cv2.imdecode(e, cv2.IMREAD_UNCHANGED) for e in encoded[k]])
            timed((k, "encode"), lambda: [cv2.imencode(".png", lab, p) for lab in labels])
    return {k: (float(np.mean([e.size for e in encoded[k]])), best[(k, "decode")], best[(k, "encode")])
            for k in VARIANTS}


def table(name: str, labels: list[np.ndarray], res: dict[str, tuple[float, float, float]]) -> str:
    ref = res[next(iter(VARIANTS))]
    h, w = labels[0].shape
    rows = [f"**{name}** ({len(labels)} maps, first {w} x {h})", "",
            "| filter | bytes / map | decode ms | encode ms | bytes vs default | decode vs default | encode vs default |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, (b, d, e) in res.items():
        rows.append(f"| {k} | {b:,.0f} | {d:.3f} | {e:.3f} | {b / ref[0]:.2f}x | {d / ref[1]:.2f}x | {e / ref[2]:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if not hasattr(cv2, "IMWRITE_PNG_FILTER"):
        sys.exit("OpenCV < 4.10 has no PNG filter option: nothing to compare")
    sets = [("ADE20K-Full `_seg.png` fixtures", ade_labels()), ("synthetic 256 px labels (K = 150)", synthetic_labels())]
    parts = [table(name, labels, measure(labels, args.repeats)) for name, labels in sets if labels]
    body = "\n\n".join([
        "## Label PNG filter (`bench/bench_label_png.py`)",
        f"`python bench/bench_label_png.py --repeats {args.repeats}` ({time.strftime('%Y-%m-%d')}; {machine()}, "
        f"OpenCV {cv2.__version__}). 16-bit PNG, compression level 1; CPU ms per map, best of {args.repeats} "
        "interleaved passes in one process; every variant decodes to the same values (checked).", *parts,
        "Shards write the \"up\" filter (shards/codec.py): on real label maps it is about as small as libpng's "
        "per-row choice and both decodes and encodes faster; \"none\" decodes fastest but its files are larger."])
    print(body)
    if not args.no_write:
        write_section("bench_label_png", body)


if __name__ == "__main__":
    main()
