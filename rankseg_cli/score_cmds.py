"""`rankseg eval-predictions`: score any model's label files (thin command over
rankseg_core.evaluation.score_files). `register(app)` also registers export_cmds' `export` and
`prepare detectron2`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from rankseg_cli.common import err, out, show, user_errors, val_split


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


@user_errors
def eval_predictions(
    pred_dir: Annotated[Path, typer.Argument(help="Directory of prediction label files (PNG/TIFF, 8 or 16 bit, train ids), one per image.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Shard directory holding the ground truth.")],
    split: Annotated[str | None, typer.Option("--split", help="Split the predictions are for (default: the shards' val / validation / valid / test).")] = None,
    protocol: Annotated[str, typer.Option("--protocol", help="mIoU average: mmseg (classes with union > 0), d2-old (detectron2 <= v0.6), d2 (detectron2 >= July 2022: classes in the GT).")] = "mmseg",
    json_out: Annotated[Path | None, typer.Option("--json", help="Report JSON (default PRED_DIR/../<PRED_DIR name>_scores.json); CSVs go next to it.")] = None,
    groups: Annotated[str, typer.Option("--groups", help="Split results by class frequency: auto, lvis, train-frequency or none.")] = "auto",
    train_data: Annotated[Path | None, typer.Option("--train-data", help="Shards holding the training split, for --groups train-frequency (default: --data).")] = None,
    train_split: Annotated[str | None, typer.Option("--train-split", help="Name of the training split (default: training or train).")] = None,
    pred_offset: Annotated[int, typer.Option("--pred-offset", help="Files store class id + N (mmseg's format_results writes id + 1).")] = 0,
    allow_extra: Annotated[bool, typer.Option("--allow-extra", help="Ignore prediction files that match no image of the split.")] = False,
    novel_classes: Annotated[str | None, typer.Option("--novel-classes", help="Weak-shot split (built-in name, e.g. coco-stuff-10k/split1, or JSON file; docs/weak-shot.md): add BaseIoU / NovelIoU and base / novel accuracy.")] = None,
) -> None:
    """Score a directory of predicted label maps against shards: mIoU (three averaging rules),
    aAcc, mAcc, fwIoU, per-class IoU / accuracy, and mIoU by class-frequency group.

    A file matches a sample when its name is the sample key as `rankseg eval --save-predictions`
    writes it ('/' -> '__'), the key as a relative path, or the plain image stem; anything
    ambiguous, missing or extra is refused with one line.

    Examples:
      rankseg eval runs/ade --save-predictions preds/
      rankseg eval-predictions preds/ --data shards/ade847
      rankseg eval-predictions catseg_a847/ --data shards/ade847 --protocol d2
      rankseg eval-predictions rankseg_lvis/ --data shards/coco_lvis \\
        --pred-offset 1 --json lvis.json
    """
    from rankseg_core.evaluation.score_files import check_report_targets, report, score_predictions, write_reports

    path = json_out or pred_dir.resolve().parent / f"{pred_dir.resolve().name}_scores.json"
    check_report_targets(path)  # refused before scoring, not after minutes of it
    if novel_classes:  # imported only here: plain scoring needs none of the weak-shot set-up
        from rankseg_core.data.weak_shot import load_split_for_shards
    ws = load_split_for_shards(novel_classes, data) if novel_classes else None
    res = score_predictions(pred_dir, data, val_split(data, split), protocol=protocol, groups=groups,
                            train_data=train_data, train_split=train_split, pred_offset=pred_offset,
                            allow_extra=allow_extra, novel=list(ws.novel) if ws else None,
                            novel_source={"novel_classes": ws.spec, "novel_classes_sha256": ws.sha256} if ws else None)
    rep = report(res)
    paths = write_reports(path, rep)
    t = Table("metric", "value")
    t.add_row(f"mIoU ({protocol})", _fmt(rep["miou"]))
    for q, v in rep["miou_by_protocol"].items():
        if q != protocol:
            t.add_row(f"  mIoU under {q}", _fmt(v))
    t.add_row("aAcc (pACC)", _fmt(rep["aacc"]))
    t.add_row("mAcc", _fmt(rep["macc"]))
    t.add_row("fwIoU", _fmt(rep["fwiou"]))
    if "novel_iou" in rep:  # --novel-classes: the official weak-shot means
        t.add_row("BaseIoU / NovelIoU", f"{_fmt(rep['base_iou'])} / {_fmt(rep['novel_iou'])}")
        t.add_row("BaseACC / NovelACC", f"{_fmt(rep['base_acc'])} / {_fmt(rep['novel_acc'])}")
    for name, g in rep["groups"].items():
        t.add_row(f"mIoU {name} ({g['classes_averaged']}/{g['num_classes']} classes)", _fmt(g["miou"]))
    t.add_row("images", str(rep["num_images"]))
    out.print(t)
    if rep["groups"]:
        err.print(f"groups: {show(rep['group_rule'])}")
    err.print(f"wrote {show(paths[0])}, {show(paths[1].name)} and {show(paths[2].name)}")


def register(app: typer.Typer) -> None:
    """eval-predictions, export and prepare detectron2 (on the app's `prepare` group)."""
    from rankseg_cli import export_cmds
    from rankseg_cli.prepare import prepare_app

    app.command("eval-predictions")(eval_predictions)
    export_cmds.register(app, prepare_app)
