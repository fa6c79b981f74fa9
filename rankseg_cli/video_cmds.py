"""`rankseg eval-vis`: score a YouTube-VIS submission (`results.json`) against converted
shards (thin command over rankseg_core.evaluation.video_instances); `rankseg predict-vis`:
write one from a trained video Mask2Former (rankseg_core.engine.video_results).
`register(app)` adds both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rankseg_cli.common import err, out, show, user_errors, val_split

REPORT_MARKER = "youtube-vis"  # the report's "metric": what may be overwritten by a re-run


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.2f}"


def _check_report_target(path: Path, inputs: list[Path]) -> None:
    """Refuse a report path that is an input or a file this command did not write."""
    from rankseg_core.errors import UserError
    from rankseg_core.utils import jsonio
    from rankseg_core.utils.fsio import check_writable_target, read_regular

    check_writable_target(path)
    if not os.path.lexists(path):
        return
    if any(p.exists() and os.path.samefile(path, p) for p in inputs):
        raise UserError(f"{path} is an input of this command: choose another --json")
    try:
        doc = jsonio.loads(read_regular(path, "report", 1 << 26))
        ours = isinstance(doc, dict) and doc.get("metric") == REPORT_MARKER
    except (OSError, ValueError, UserError):
        ours = False
    if not ours:
        raise UserError(f"{path} exists and is not an `eval-vis` report: it would be overwritten; "
                        "choose another --json")


@user_errors
def eval_vis(
    results: Annotated[Path, typer.Argument(help="The submission: a JSON list of {video_id, category_id, score, segmentations}.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Shard directory holding the ground truth (rankseg prepare youtube-vis).")],
    split: Annotated[str | None, typer.Option("--split", help="Split the results are for, with annotated tracks (default: the shards' val / validation / valid / test).")] = None,
    videos_json: Annotated[Path | None, typer.Option("--videos-json", help="The release JSON whose video ids the results use (default: ids 1..N in video-name order).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Report JSON (default: <RESULTS stem>_vis_scores.json next to RESULTS).")] = None,
) -> None:
    """Score YouTube-VIS 2019 results as the official API does: AP, AP50, AP75,
    AP small / medium / large, AR1, AR10, AR100, per-class AP, with the
    spatio-temporal mask IoU (docs/video.md).

    The official validation labels are only on the evaluation server: score a
    split converted with annotations (e.g. part of train held out).

    Examples:
      rankseg eval-vis results.json --data shards/ytvis19 --split train
      rankseg eval-vis results.json --data shards/ytvis19 --split train \\
        --videos-json data/ytvis_2019/train.json --json scores.json
    """
    from rankseg_core.evaluation.video_instances import report, score_results
    from rankseg_core.utils.fsio import atomic_write_json

    path = json_out or results.resolve().parent / f"{results.stem}_vis_scores.json"
    inputs = [results, data / "dataset.json"] + ([videos_json] if videos_json else [])
    _check_report_target(path, inputs)  # refused before scoring, not after it
    split = val_split(data, split)
    scores, names = score_results(results, data, split, videos_json)
    rep = report(scores, names, results, data, split)
    atomic_write_json(path, rep)
    t = Table("metric", "value")
    for label, key in (("AP", "ap"), ("AP50", "ap50"), ("AP75", "ap75"), ("AP small", "aps"),
                       ("AP medium", "apm"), ("AP large", "apl"), ("AR1", "ar1"), ("AR10", "ar10"),
                       ("AR100", "ar100")):
        t.add_row(label, _fmt(rep[key]))
    t.add_row("videos", str(scores.num_videos))
    out.print(t)
    err.print(f"wrote {show(path)}")


@user_errors
def predict_vis(
    run: Annotated[Path, typer.Argument(help="Run directory of a video Mask2Former (rankseg train with model.clip_len > 1).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Shard directory of the videos (rankseg prepare youtube-vis).")],
    out_json: Annotated[Path, typer.Option("--out", "-o", help="The results.json to write (never an input; an earlier results file may be replaced).")],
    split: Annotated[str | None, typer.Option("--split", help="Split to predict (default: the shards' val / validation / valid / test).")] = None,
    videos_json: Annotated[Path | None, typer.Option("--videos-json", help="The release JSON whose video ids to write (default: ids 1..N in video-name order).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Tracks kept per video: the top (query, class) pairs (official: 10).")] = 10,
    device: Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or auto (default: cuda if available).")] = None,
    weights: Annotated[str, typer.Option("--weights", help="auto (model.safetensors, else best.pt, else last.pt), final, best, last or a file.")] = "auto",
) -> None:
    """Predict YouTube-VIS tracks of every video of a split and write them in
    the challenge's submission format: one entry per track with video_id,
    category_id, score and one RLE or null per frame (docs/video.md).

    Each video is fed whole as one clip, as the official Mask2Former-VIS
    inference does; the top-k (query, class) pairs are kept.

    Examples:
      rankseg predict-vis runs/vis --data shards/ytvis19 --out results.json
      rankseg predict-vis runs/vis --data shards/ytvis19 --split valid \\
        --videos-json data/ytvis_2019/valid.json --out results.json
    """
    from rankseg_core.engine.video_results import write_run_results

    split = val_split(data, split)
    n = write_run_results(run, data, split, out_json, videos_json, device or "auto", weights, top_k)
    err.print(f"wrote {show(out_json)}: {n} track(s)")


def register(app: typer.Typer) -> None:
    """eval-vis, predict-vis."""
    app.command("eval-vis")(eval_vis)
    app.command("predict-vis")(predict_vis)
