"""`rankseg demo`: the main job on the built-in synthetic dataset, no download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rankseg_cli.common import err, out, show, user_errors

# Small enough for a 2-core CPU in a few minutes, large enough that context matters: K=200
# classes in 8 scenes, each object look shared by ~6 classes of different scenes. There the
# baseline must tell those apart pixel by pixel while RankSeg's ranking names the scene's
# classes (measured: mIoU 6.8 vs 3.6 after 300 steps; with K=100 the gap is small).
DEMO_SIZE = 64
DEMO_TRAIN = ["model.model=segmenter-vitt", f"model.img_size={DEMO_SIZE}", "model.kappa=25",
              "model.dropout=0", "model.drop_path=0",  # regularisers only slow a few-minute run down
              "optim.lr=0.01", "schedule.batch_size=8", "eval.every=0", "log_every=10", "ckpt_every=100",
              "data.num_workers=1", "eval.num_workers=0", "log_seconds=15"]


@user_errors(interrupted="finished steps are kept; re-run the same command to resume")
def demo(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path("rankseg-demo"),
    num_classes: Annotated[int, typer.Option("--num-classes", "-k", help="Vocabulary size of the synthetic data.")] = 200,
    images: Annotated[int, typer.Option("--images", help="Synthetic training images.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (data and training).")] = 0,
    iters: Annotated[int, typer.Option("--iters", help="Training steps per model (batch 8).")] = 300,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
) -> None:
    """Prepare the synthetic dataset, plot its class statistics, train a Segmenter baseline and
    a RankSeg model (ViT-T, 64 px) on it and compare them. About 5 minutes on 2 CPU cores.

    Re-running resumes: finished steps are kept.

    Example:
      rankseg demo --out rankseg-demo
    """
    import os

    import torch

    from rankseg_core.convert.common import ConvertOptions
    from rankseg_core.convert.synthetic import prepare_synthetic
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.evaluate import EvalOptions, run_evaluation
    from rankseg_core.engine.runs import run_paths
    from rankseg_core.engine.train import train
    from rankseg_core.shards.stats import dataset_class_cdf, plot_class_cdf
    from rankseg_core.utils.fsio import atomic_write_json
    from rankseg_core.utils.parallel import default_workers

    # One core feeds the data, the others compute: on a 2-core machine two compute threads
    # fighting a data worker for the cores are several times slower than one.
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    data = out_dir / "data"
    err.print(f"[bold]1/4[/] synthetic dataset (K={num_classes}, {images} images of {DEMO_SIZE} px) -> {show(data)}")
    prepare_synthetic(data, num_classes=num_classes, images=images, size=DEMO_SIZE, seed=seed,
                      opts=ConvertOptions(workers=min(2, default_workers()), samples_per_shard=500))
    err.print("[bold]2/4[/] class statistics")
    res = dataset_class_cdf(data)
    plot_class_cdf([res], out_dir / "class_cdf.png")
    atomic_write_json(out_dir / "class_cdf.json", {"datasets": [res.as_json()]})
    err.print(f"images with < 25 classes: {100 * res.share_below_25:.2f}%")

    runs = {"Segmenter (all K)": (out_dir / "runs" / "baseline", ["model.head=segmenter"]),
            "RankSeg (top 25)": (out_dir / "runs" / "rankseg", ["model.head=rankseg"])}
    for step, (name, (run, extra)) in enumerate(runs.items(), start=3):
        paths = run_paths(run)
        if paths.weights.exists():
            err.print(f"[bold]{step}/4[/] {name}: already trained ({show(run)})")
            continue
        resume = paths.last.exists()
        err.print(f"[bold]{step}/4[/] {'resuming' if resume else 'training'} {name}, {iters} steps -> {show(run)}")
        cfg = build_train_config(None, DEMO_TRAIN + extra + [f"schedule.iters={iters}", f"seed={seed}",
                                                            f"device={device}"], data)
        train(cfg, run, resume=resume)

    from rankseg_core.engine.runs import read_metrics

    table = Table("model", "val mIoU", "aAcc", "ml mAP", "recall@25", "train img/s", "run")
    table.columns[-1].overflow = "fold"
    results = {}
    def fmt(v):
        return ("-" if v is None else f"{100 * v:.1f}")
    for name, (run, _) in runs.items():
        rep, _, _ = run_evaluation(run, EvalOptions(progress=False), device=device)
        speed = [r["samples_per_s"] for r in read_metrics(run) if r.get("type") == "train" and r.get("samples_per_s")]
        rep["train_images_per_s"] = sum(speed) / len(speed) if speed else None
        results[name] = rep
        table.add_row(name, fmt(rep["miou"]), fmt(rep["aacc"]), fmt(rep["map"]), fmt(rep["recall_at_kappa"]),
                      f"{rep['train_images_per_s']:.1f}" if speed else "-", show(run))
    out.print(table)
    base, rank = (results[n]["miou"] or 0.0 for n in runs)
    atomic_write_json(out_dir / "demo_results.json", results)
    verdict = "[green]RankSeg beats the baseline[/]" if rank > base else "[yellow]RankSeg does not beat the baseline here[/]"
    err.print(f"{verdict}: mIoU {100 * rank:.1f} vs {100 * base:.1f} after {iters} steps each. RankSeg ranks the "
              f"{num_classes} classes per image (recall@25 above) and classifies each pixel among its top 25 only.")
    err.print(f"[green]demo done[/]: shards {show(data)}, plot {show(out_dir / 'class_cdf.png')}, "
              f"results {show(out_dir / 'demo_results.json')}; "
              f"next: rankseg predict {show(runs['RankSeg (top 25)'][0])} IMAGE --out preds/")
