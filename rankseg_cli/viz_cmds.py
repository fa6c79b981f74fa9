"""`rankseg viz`: figures of what a model learned (PNG + the plotted numbers as CSV / JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rankseg_cli.common import err, new_app, show, user_errors, val_split

viz_app = new_app(
    "Figures of what a model learned: learned 1/tau per rank, false positives, predictions, "
    "prototypes, training curves, and a dataset browser. Every PNG is written with its numbers (CSV / JSON) next to it.")

Data = Annotated[Path, typer.Option("--data", "-d", help="Shard directory the run was trained on (`rankseg prepare ... --out DIR`).")]
Split = Annotated[Optional[str], typer.Option("--split", help="Split to draw samples from (default: the shards' val / validation / valid / test).")]
Keys = Annotated[Optional[str], typer.Option("--keys", help="Comma-separated sample keys (see `rankseg inspect DIR --jsonl`); default: the first --num samples.")]
Device = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto (cuda if available).")]
Weights = Annotated[str, typer.Option("--weights", help="auto | final | best | last | a file.")]


def _outputs(paths: list) -> None:
    for p in paths:
        err.print(f"wrote {show(p)}")


@viz_app.command("tau")
@user_errors
def tau(
    runs: Annotated[list[Path], typer.Argument(help="One or more RankSeg run directories.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure to write (.png, .pdf or .svg, by extension); .csv and .json go next to it.")] = Path("tau.png"),
    weights: Weights = "auto",
) -> None:
    """Learned 1/tau (rank LayerNorm weight) and per-rank bias against rank (paper Fig. 7).

    One line per run, labelled with its dataset and kappa. The numbers go to tau.csv (one row per
    run and rank) and tau.json (with a trend summary: Spearman rho of 1/tau vs rank).

    Example:
      rankseg viz tau runs/ade-rankseg runs/lvis-rankseg --out tau.png
    """
    from rankseg_core.utils.plotting import figure_format
    from rankseg_core.viz.common import load_viz_run
    from rankseg_core.viz.tau import tau_curve, write_tau

    figure_format(out)
    curves = [tau_curve(load_viz_run(r, "cpu", weights)) for r in runs]
    paths = write_tau(curves, out)
    for c in curves:
        t = c.trend()
        err.print(f"{show(c.label)}: 1/tau rank 1 = {c.scale[0]:.3f}, rank {c.kappa} = {c.scale[-1]:.3f}, "
                  f"Spearman rho vs rank = {t['spearman']:.2f}")
    _outputs(list(paths.values()))


@viz_app.command("curves")
@user_errors
def curves(
    runs: Annotated[list[Path], typer.Argument(help="One or more run directories (or metrics.jsonl files).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure to write (.png, .pdf or .svg, by extension); the plotted numbers go to a .csv next to it.")] = Path("curves.png"),
    metrics: Annotated[Optional[str], typer.Option("--metrics", "-m", help="Comma-separated metrics, one panel each, e.g. loss,lr,miou (train/NAME or eval/NAME to pick one; default: every logged loss, statistic, lr and eval metric).")] = None,
    smooth: Annotated[float, typer.Option("--smooth", help="TensorBoard's moving-average weight for train curves of over 30 points, in [0, 1) (0 = as logged); the logged values are drawn faintly behind.")] = 0.9,
) -> None:
    """Training curves from metrics.jsonl: losses, lr and eval metrics against iteration.

    A panel per metric, a line per run (legend: the run directories' names, without the prefix
    they share). A resumed run's log reads as one run. The numbers drawn go to curves.csv.

    Examples:
      rankseg viz curves runs/ade-rankseg --out viz/curves.png
      rankseg viz curves runs/ade-rankseg runs/ade-baseline \\
        --metrics loss,lr,miou --out viz/curves.pdf
    """
    from rankseg_core.viz.common import parse_keys
    from rankseg_core.viz.curves import write_curves

    paths = write_curves(runs, out, parse_keys(metrics), smooth)
    _outputs([paths["figure"], paths["csv"]])


@viz_app.command("false-positives")
@user_errors
def false_positives(
    run: Annotated[Path, typer.Argument(help="A RankSeg run directory (with a multi-label branch).")],
    data: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("viz/false_positives"),
    keys: Keys = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Per-image figures for the first N samples (without --keys).")] = 8,
    stats_num: Annotated[int, typer.Option("--stats-num", help="Dataset-level counts over the first N samples (0 = whole split).")] = 100,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A baseline run: show which of its false positives RankSeg removes.")] = None,
    kappa: Annotated[Optional[int], typer.Option("--kappa", help="Top-kappa at evaluation (default: the run's).")] = None,
    min_pixels: Annotated[int, typer.Option("--min-pixels", help="A class counts as predicted on an image from this many labelled pixels.")] = 1,
    split: Split = None,
    device: Device = "auto",
    weights: Weights = "auto",
) -> None:
    """False positives of the top-kappa ranking and of the final prediction.

    Per image: the 20 most probable classes (sigmoid of the multi-label logits) as bars in the
    dataset palette, GT class names black, false positives red. Dataset level: the most frequent
    false-positive classes in the top-kappa and in the prediction (fp_summary.png, fp_table.csv).

    Example:
      rankseg viz false-positives runs/rs --data data/synth \\
        --baseline runs/base --num 4 --out viz/fp
    """
    from rankseg_core.utils.distributed import resolve_device
    from rankseg_core.viz.common import load_viz_run, parse_keys
    from rankseg_core.viz.false_positives import run_false_positives

    dev = resolve_device(device)
    r = load_viz_run(run, dev, weights)
    b = load_viz_run(baseline, dev, weights) if baseline is not None else None
    summary = run_false_positives(r, data, out, split=val_split(data, split), keys=parse_keys(keys), num=num, stats_num=stats_num,
                                  baseline=b, kappa=kappa, min_pixels=min_pixels)
    line = (f"{summary['images']} images: {summary['topk_fp_per_image']:.2f} false positives per image in the "
            f"top-{summary['kappa']}, {summary['pred_fp_per_image']:.2f} in the prediction")
    if b is not None:
        line += (f" (baseline {summary['baseline_pred_fp_per_image']:.2f}; removed {summary['removed_per_image']:.2f}, "
                 f"added {summary['added_per_image']:.2f} per image)")
    err.print(line)
    err.print(f"wrote {show(out)}/fp_summary.png, fp_table.csv, fp_summary.json and per-image fp_*.png")


@viz_app.command("predictions")
@user_errors
def predictions(
    run: Annotated[Path, typer.Argument(help="Run directory.")],
    data: Data,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("viz/predictions"),
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="A second run shown before RUN (e.g. the baseline).")] = None,
    keys: Keys = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Show the first N samples (without --keys).")] = 6,
    per_figure: Annotated[int, typer.Option("--per-figure", help="Rows per PNG.")] = 6,
    split: Split = None,
    device: Device = "auto",
    weights: Weights = "auto",
) -> None:
    """Image, ground truth and each model's errors, one row per image.

    Error maps: correct pixels white, wrong pixels in the colour of the predicted class, ignore
    black; each row's legend lists only the classes present in it. Per-image accuracy / mIoU go
    to predictions.csv.

    Example:
      rankseg viz predictions runs/rs --baseline runs/base --data data/synth \\
        --num 4 --out viz/pred
    """
    from rankseg_core.utils.distributed import resolve_device
    from rankseg_core.viz.common import load_viz_run, parse_keys
    from rankseg_core.viz.predictions import run_predictions

    dev = resolve_device(device)
    runs = ([load_viz_run(baseline, dev, weights)] if baseline is not None else []) + [load_viz_run(run, dev, weights)]
    res = run_predictions(runs, data, out, split=val_split(data, split), keys=parse_keys(keys), num=num, per_figure=per_figure)
    _outputs([out / f for f in res["figures"]] + [out / "predictions.csv", out / "predictions.json"])


@viz_app.command("prototypes")
@user_errors
def prototypes(
    run: Annotated[Path, typer.Argument(help="A run trained with --head protoseg or rankproto.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or directories of images (one row each, at most 16).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Figure to write (.png, .pdf or .svg, by extension); .csv and .json go next to it.")] = Path("prototypes.png"),
    device: Device = "auto",
    weights: Weights = "auto",
) -> None:
    """Which of its class's M prototypes each pixel took (ProtoSeg heads).

    Per image: the image, the predicted classes and the prototype index m of each pixel's
    predicted class (one hue per m, class outlines in black), from one whole-image pass at the
    run's test size; the assignment is on the patch grid, upsampled by nearest neighbour.
    The patch counts per class and prototype are written to the .csv and .json.

    Example:
      rankseg viz prototypes runs/protoseg photo1.jpg photo2.jpg \\
        --out viz/prototypes.png
    """
    from rankseg_core.utils.distributed import resolve_device
    from rankseg_core.viz.common import load_viz_run
    from rankseg_core.viz.prototypes import check_inputs, run_prototypes

    files = check_inputs(images, out)  # the format, the images and --out before loading a model
    res = run_prototypes(load_viz_run(run, resolve_device(device), weights), files, out)
    err.print(f"{res['images']} images: {res['mean_used']:.1f} of M={res['prototypes']} prototypes used per "
              f"predicted class on average ({res['classes']} image classes)")
    _outputs([res["figure"], res["csv"], res["json"]])


@viz_app.command("samples")
@user_errors
def samples(
    data: Annotated[Path, typer.Argument(help="Shard directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("viz/samples"),
    keys: Keys = None,
    num: Annotated[int, typer.Option("--num", "-n", help="Show the first N samples (without --keys).")] = 8,
    per_figure: Annotated[int, typer.Option("--per-figure", help="Rows per PNG.")] = 8,
    split: Annotated[Optional[str], typer.Option("--split", help="Split (default: the shards' val / validation / valid / test, else their first).")] = None,
) -> None:
    """Browse a shard directory: images, label overlays and the classes present.

    Checks a conversion by eye; samples.csv also flags samples whose stored class list does not
    match their label (index_ok = 0).

    Example:
      rankseg viz samples data/ade20k-full --keys ADE_val_00000001 \\
        --out viz/samples
    """
    from rankseg_core.shards.read import ShardIndex
    from rankseg_core.shards.splits import find_split
    from rankseg_core.viz.common import parse_keys
    from rankseg_core.viz.samples import run_samples

    if split is None:
        split = find_split(ShardIndex(data).splits, "val")
    res = run_samples(data, out, split=split, keys=parse_keys(keys), num=num, per_figure=per_figure)
    if res["index_mismatches"]:
        err.print(f"[yellow]warning[/]: stored class lists differ from the labels for "
                  f"{', '.join(res['index_mismatches'][:5])}; run `rankseg verify {show(data)}`")
    _outputs([out / f for f in res["figures"]] + [out / "samples.csv", out / "samples.json"])
