"""`rankseg demo`: the main job on the built-in synthetic dataset, no download needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import err, user_errors


@user_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes everything.")] = Path("rankseg-demo"),
    num_classes: Annotated[int, typer.Option("--num-classes", "-k", help="Vocabulary size of the synthetic data.")] = 1000,
    images: Annotated[int, typer.Option("--images", help="Synthetic training images.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (data and training).")] = 0,
) -> None:
    """Prepare the synthetic dataset and plot its class statistics.

    Re-running resumes: finished steps are kept.

    Example: [bold]rankseg demo --out rankseg-demo[/]
    """
    from rankseg_core.convert.common import ConvertOptions, default_workers
    from rankseg_core.shards import atomic_write_json
    from rankseg_core.stats import dataset_class_cdf, plot_class_cdf
    from rankseg_core.synthetic import prepare_synthetic

    data = out / "data"
    err.print(f"[bold]1/2[/] synthetic dataset (K={num_classes}) -> {data}")
    prepare_synthetic(data, num_classes=num_classes, images=images, seed=seed,
                      opts=ConvertOptions(workers=min(2, default_workers()), samples_per_shard=500))
    err.print("[bold]2/2[/] class statistics")
    res = dataset_class_cdf(data)
    plot_class_cdf([res], out / "class_cdf.png")
    atomic_write_json(out / "class_cdf.json", {"datasets": [res.as_json()]})
    err.print(f"images with < 25 classes: {100 * res.share_below_25:.2f}%")
    err.print(f"[green]demo done[/]: shards {data}, plot {out / 'class_cdf.png'}")
