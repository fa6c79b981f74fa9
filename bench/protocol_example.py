"""The worked example of docs/benchmarks/scoring.md: what each mIoU averaging rule makes of one
set of predictions, computed end to end by `rankseg eval-predictions` (shards + label files).

    python bench/protocol_example.py          # prints the markdown used in the docs

Two 24 x 32 "bedroom" images over an 8-class vocabulary. The ground truth holds wall, floor,
bed and lamp (and some unlabelled pixels); the prediction gets most of them right but paints
part of the bed as rug and part of the lamp as painting, two classes that occur nowhere in
the ground truth, and puts toilet only on unlabelled pixels (which no protocol counts).
tests/test_score_docs.py checks that the docs hold exactly this script's output.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rankseg_core.evaluation.metrics import PROTOCOLS
from rankseg_core.evaluation.score_files import report, score_predictions

NAMES = ["wall", "floor", "bed", "lamp", "painting", "rug", "bathtub", "toilet"]
WALL, FLOOR, BED, LAMP, PAINTING, RUG, BATHTUB, TOILET = range(8)
IGNORE = 65535


def scene() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(ground truth, prediction) per image key, H x W."""
    gts, preds = {}, {}
    for i, (bed_w, lamp_h) in enumerate([(12, 4), (8, 6)]):
        gt = np.full((24, 32), WALL, np.int64)
        gt[12:] = FLOOR
        gt[10:20, 4:4 + bed_w] = BED
        gt[4:4 + lamp_h, 24:28] = LAMP
        gt[11:13, :] = IGNORE  # the unlabelled wall/floor boundary
        pred = np.where(gt == IGNORE, WALL, gt)
        pred[10:20, 4:4 + bed_w // 2] = RUG  # half the bed as rug
        pred[4:4 + lamp_h // 2, 24:28] = PAINTING  # the lamp's top as painting
        pred[8:10, 16:24] = FLOOR  # a little floor where the wall is
        pred[11, :8] = TOILET  # only on unlabelled pixels
        gts[f"bedroom_{i}"], preds[f"bedroom_{i}"] = gt, pred
    return gts, preds


def worked_example(workdir: Path) -> dict[str, dict]:
    """Write shards and prediction PNGs under `workdir`, score them under every protocol."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from score_helpers import make_shards

    gts, preds = scene()
    data = make_shards(workdir / "shards", {"val": {k: v.astype(np.uint16) for k, v in gts.items()}}, NAMES,
                       name="bedrooms")
    (workdir / "preds").mkdir(parents=True, exist_ok=True)
    for key, p in preds.items():
        Image.fromarray(p.astype(np.uint8)).save(workdir / "preds" / f"{key}.png")
    return {q: report(score_predictions(workdir / "preds", data, "val", protocol=q, groups="none", progress=False))
            for q in PROTOCOLS}


def _f(x: float | None) -> str:
    return "NaN (left out)" if x is None else f"{100 * x:.2f}"


def markdown(reports: dict[str, dict]) -> str:
    rows = ["| class | GT pixels | predicted pixels | intersection | IoU, mmseg | IoU, d2-old / d2 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    mm, d2 = reports["mmseg"]["per_class"], reports["d2"]["per_class"]
    for a, b in zip(mm, d2):
        rows.append(f"| {a['name']} | {a['gt_pixels']} | {a['pred_pixels']} | {a['intersection']} | "
                    f"{_f(a['iou'])} | {_f(b['iou'])} |")
    rows += ["", "| protocol | classes averaged | mIoU |", "| --- | ---: | ---: |"]
    for q, rep in reports.items():
        rows.append(f"| {q} | {rep['classes_averaged'][q]} | {_f(rep['miou'])} |")
    r = reports["mmseg"]
    rows += ["", f"aAcc {_f(r['aacc'])}, mAcc {_f(r['macc'])}, fwIoU {_f(r['fwiou'])} (the same under every protocol)."]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        sys.stdout.write(markdown(worked_example(Path(tmp))))
