"""bench/replicate.py: the protocol's pieces (fast) and the whole pipeline in --smoke mode (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replicate as R  # noqa: E402


def test_variants_and_evals() -> None:
    p = R.Protocol(kappa=20, kappa_sweep=[5, 50, 500], kappa_eval=[10, 20, 40])
    v = R.train_variants(p, 200)
    assert {"baseline", "mt", "mt_ls", "rankseg", "oracle"} <= set(v)
    # The sweep is clamped to K, always includes kappa = K, and never repeats the default kappa.
    assert sorted(k for k in v if k.startswith("rankseg_k")) == ["rankseg_k200", "rankseg_k5", "rankseg_k50"]
    assert v["mt"] == ["model.head=rankseg", "model.select=false"] and "model.tau=shared" in v["mt_ls"]
    specs = R.eval_specs(p, 200)
    names = [(a, b) for a, b, _ in specs]
    assert ("baseline", "gt_eval") in names and ("rankseg", "gt_eval") in names
    assert ("rankseg", "kappa20") not in names and ("rankseg", "kappa40") in names  # 20 is the training kappa
    assert [o for a, b, o in specs if b == "thr0.05"] == [{"dynamic_kappa": 0.05}]
    rec = R.recipe(p, 64, 2)
    assert "seed=2" in rec and "model.img_size=64" in rec and "model.kappa=20" in rec


def test_aggregation_and_tables(tmp_path: Path) -> None:
    a = R.agg([0.5, 0.7, None, 0.6])
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.6) and a["std"] == pytest.approx(0.1)
    assert a["min"] == 0.5 and a["max"] == 0.7
    assert R.pm(a) == "60.0 ± 10.0"
    assert R.agg([None])["mean"] is None and R.pm(R.agg([])) == "–"
    assert R.agg([0.3])["std"] == 0.0
    assert R.md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n| --- | --- |\n| 1 | x |"
    doc = tmp_path / "r.md"
    doc.write_text("# T\n\nreading\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\ntail\n")
    R.write_doc_block("new numbers", doc)
    text = doc.read_text()
    assert "new numbers" in text and "old" not in text and text.endswith("tail\n") and "reading" in text


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path: Path) -> None:
    from rankseg_core.evaluate import EvalOptions, evaluate_model
    from rankseg_core.runs import load_run

    out = R.main(["--smoke", "--work", str(tmp_path / "work")])
    res = out["results"][0]
    p = out["protocol"]
    assert res["dataset"] == "synthetic" and res["num_classes"] == 40
    body = out["report"]
    assert "SMOKE RUN" in body
    for title in ("Table 1", "Fig. 3", "Table 4", "Supplement Table 5", "Fig. 7", "False positives"):
        assert title in body
    figs = tmp_path / "work" / "figures"
    for name in list(res["figures"].values()) + [res["fp"]["figure"]]:
        with Image.open(figs / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert (figs / "replication_report.md").read_text().strip() == body.strip()

    # Table numbers are the runs' own evaluations: re-evaluate seed 1 of RankSeg with GT (eval).
    run = tmp_path / "work" / "synthetic" / "rankseg" / "seed1"
    model, cfg = load_run(run)
    import torch

    again = evaluate_model(model, cfg, EvalOptions(oracle=True, progress=False), torch.device("cpu"))
    stored = json.loads((tmp_path / "work" / "synthetic" / "evals" / "rankseg_seed1_gt_eval.json").read_text())
    assert stored["miou"] == pytest.approx(again["miou"], abs=1e-9)
    seeds = [json.loads((tmp_path / "work" / "synthetic" / v / f"seed{s}" / "replicate.json").read_text())["miou"]
             for v in ("baseline",) for s in range(p.seeds)]
    assert res["runs"]["baseline"]["miou"]["mean"] == pytest.approx(np.mean(seeds))
    # Fig. 7 numbers: the mean over seeds of each run's LayerNorm weight.
    weights = [load_run(tmp_path / "work" / "synthetic" / "rankseg" / f"seed{s}")[0].rank_scale().detach().numpy()
               for s in range(p.seeds)]
    np.testing.assert_allclose(res["tau"]["rankseg"]["inv_tau"], np.mean(weights, 0), atol=1e-6)
    assert res["cost"]["baseline"]["params_m"] < res["cost"]["rankseg"]["params_m"]  # the ml branch adds params

    # A second call reuses the finished runs and stored evaluations.
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    R.main(["--smoke", "--work", str(tmp_path / "work")])
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp
