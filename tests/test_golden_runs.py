"""Behaviour pinned across refactors: tiny fixed-seed runs of every family, through the CLI.

`tests/data/golden_runs.json` was recorded by this file (`python tests/test_golden_runs.py`)
on the code before the package re-layout (issue 16); the test re-runs the same commands and
compares every logged loss, every evaluation number and the predicted label maps. A change in
what a command computes (not only in how the code is arranged) fails here.

Floats are compared to 1e-5 relative: the recording and the check run the same code on one
intra-op thread, but another CPU may round a reduction differently in the last bits.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rankseg_cli.app import app

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_runs.json"
runner = CliRunner()

SEG = ["--model", "segmenter-vitt", "--img-size", "32", "--kappa", "8", "--batch-size", "2", "--workers", "0",
       "--device", "cpu", "--set", "eval.num_workers=0", "--set", "log_every=1", "--set", "eval.short_side=32",
       "--set", "optim.lr=0.004"]
M2F = ["--model", "mask2former-r50", "--img-size", "64", "--kappa", "10", "--batch-size", "2", "--workers", "0",
       "--device", "cpu", "--set", "eval.num_workers=0", "--set", "log_every=1", "--set", "eval.short_side=64",
       "--set", "optim.lr=1e-3"] + [f"--set=model.mask2former.{k}" for k in (
           "hidden_dim=32", "conv_dim=32", "mask_dim=32", "nheads=4", "num_queries=8", "dec_layers=3",
           "enc_layers=1", "dim_feedforward=64", "enc_dim_feedforward=64", "ml_hidden_dim=32",
           "ml_query_layer=2", "train_num_points=256", "freeze_bn=false")]
PANOPTIC = ["--set=model.mask2former.task=panoptic", "--set=model.mask2former.object_mask_threshold=0.0",
            "--set=model.mask2former.overlap_threshold=0.0"]

# (name, data set, training flags, [(eval name, eval flags)])
RUNS = [
    ("segmenter-rankseg", "sem", SEG + ["--iters", "12"],
     [("plain", []), ("kappa3", ["--kappa", "3"]), ("oracle", ["--oracle"]),
      ("oracle-ranked", ["--oracle", "--oracle-fill", "ranked"]), ("dynamic", ["--dynamic-kappa", "0.4"])]),
    ("segmenter-baseline", "sem", SEG + ["--iters", "12", "--head", "segmenter"], [("plain", []), ("oracle", ["--oracle"])]),
    ("classifier", "sem", SEG[:1] + ["classifier-vitt"] + SEG[2:] + ["--iters", "12"], [("plain", [])]),
    ("mask2former-semantic", "sem", M2F + ["--iters", "6", "--set", "optim.lr=3e-3"],
     [("plain", []), ("oracle-ranked", ["--oracle", "--oracle-fill", "ranked"]), ("dynamic", ["--dynamic-kappa", "0.4"])]),
    ("mask2former-panoptic", "pan", M2F + PANOPTIC + ["--iters", "6"], [("plain", [])]),
]


def _prepare(root: Path) -> dict[str, Path]:
    out = {}
    for name, extra in (("sem", []), ("pan", ["--panoptic"])):
        d = root / name
        res = runner.invoke(app, ["prepare", "synthetic", "--out", str(d), "--num-classes", "40", "--images", "12",
                                  "--val-images", "3", "--size", "48", "--seed", "0", "--samples-per-shard", "8", *extra])
        assert res.exit_code == 0, res.output
        out[name] = d
    return out


def _numbers(obj: object, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON document, by dotted path (the run's own paths and times left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in ("samples_per_s", "data", "weights"):  # speed and paths, not results
                continue
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}{i}."))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip(".")] = float(obj)
    return out


def record(root: Path) -> dict:
    """Run every command of RUNS under `root` and collect what they computed."""
    data = _prepare(root)
    found: dict = {"shards": {n: json.loads((d / "dataset.json").read_text())["splits"] for n, d in data.items()}}
    for name, which, flags, evals in RUNS:
        run = root / name
        res = runner.invoke(app, ["train", "--data", str(data[which]), "--out", str(run), *flags])
        assert res.exit_code == 0, res.output
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        entry: dict = {"metrics": [_numbers(r) for r in rows], "eval": {}}
        for ev, extra in evals:
            out = root / f"{name}-{ev}.json"
            preds = root / f"{name}-{ev}-pred"
            more = ["--save-predictions", str(preds)] if name != "classifier" else []
            res = runner.invoke(app, ["eval", str(run), "--json", str(out), "--device", "cpu", *more, *extra])
            assert res.exit_code == 0, res.output
            numbers = _numbers(json.loads(out.read_text()))
            digest = hashlib.sha256()
            for png in sorted(preds.glob("*.png")) if preds.is_dir() else []:
                digest.update(np.asarray(Image.open(png)).tobytes())
            entry["eval"][ev] = {"numbers": numbers, "predictions": digest.hexdigest()}
        found[name] = entry
    return found


def _without_bytes(shards: dict) -> dict:
    """dataset.json's splits without each shard file's size and SHA-256."""
    return {name: {split: {**rec, "shards": [{k: v for k, v in sh.items() if k not in ("bytes", "sha256")}
                                             for sh in rec["shards"]]}
                   for split, rec in splits.items()}
            for name, splits in shards.items()}


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


@pytest.mark.slow
def test_every_family_computes_what_it_computed_before(tmp_path: Path) -> None:
    want = json.loads(GOLDEN.read_text())
    got = record(tmp_path)
    # Shards: the same files, samples and per-class counts. Their bytes (the SHA-256 in
    # dataset.json) changed once, on 2026-12-06, when label PNGs got one row filter (shards/codec.py),
    # which keeps every decoded value: every loss, number and prediction below is still the
    # recorded one.
    assert _without_bytes(got["shards"]) == _without_bytes(want["shards"])
    for name, *_ in RUNS:
        w, g = want[name], got[name]
        assert len(g["metrics"]) == len(w["metrics"]), name
        for i, (rw, rg) in enumerate(zip(w["metrics"], g["metrics"])):
            assert rg.keys() == rw.keys(), (name, i)
            bad = {k: (rw[k], rg[k]) for k in rw if not _close(rw[k], rg[k])}
            assert not bad, (name, i, bad)
        assert g["eval"].keys() == w["eval"].keys(), name
        for ev in w["eval"]:
            nw, ng = w["eval"][ev]["numbers"], g["eval"][ev]["numbers"]
            assert ng.keys() == nw.keys(), (name, ev, set(ng) ^ set(nw))
            bad = {k: (nw[k], ng[k]) for k in nw if not _close(nw[k], ng[k])}
            assert not bad, (name, ev, bad)
            assert g["eval"][ev]["predictions"] == w["eval"][ev]["predictions"], (name, ev)


if __name__ == "__main__":  # re-record (only where a change of behaviour is intended)
    import tempfile

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = record(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
