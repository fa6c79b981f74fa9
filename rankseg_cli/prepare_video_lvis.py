"""`rankseg prepare coco-lvis | vspw | youtube-vis`: thin wrappers over rankseg_core.convert."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rankseg_cli.common import RERUN_RESUMES, err, user_errors
from rankseg_cli.prepare import (
    Limit,
    NumShards,
    OnError,
    Out,
    ShardIndex,
    Workers,
    convert_options,
    prepare_app,
    report,
)
from rankseg_core.errors import UserError
from rankseg_core.utils.parallel import default_workers


def _note(msg: str) -> None:
    err.print(msg, highlight=False, markup=False)


@prepare_app.command("coco-lvis")
@user_errors(interrupted=RERUN_RESUMES)
def coco_lvis(
    lvis_json: Annotated[list[Path], typer.Option("--lvis-json", help="LVIS annotations (repeat: one per split; split from the file name). LVIS v1, or v0.5 (its own 1,230 categories).")],
    stuff_json: Annotated[list[Path], typer.Option("--stuff-json", help="COCO-Stuff stuff_{train,val}2017.json (repeat; LVIS v1 val needs both).")],
    out: Out,
    essnet_compat: Annotated[bool, typer.Option("--essnet-compat", help="Reproduce ESSNet's chained stuff remap (blanket -> 1217, cabinet -> 1283) for bit-parity with its masks.")] = False,
    split: Annotated[Optional[str], typer.Option("--split", help="Split name for a single --lvis-json whose file name does not say train/val.")] = None,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    root: Annotated[Optional[Path], typer.Option("--root", "-r", help="COCO 2017 folder holding train2017/ and val2017/.")] = None,
    coco_root: Annotated[Optional[Path], typer.Option("--coco-root", hidden=True)] = None,  # its old name
) -> None:
    """COCO+LVIS (1,284 classes, ESSNet): LVIS instances + COCO-Stuff stuff on COCO 2017 images.

    LVIS annotations are painted first (first wins), then COCO-Stuff stuff fills the pixels LVIS
    left empty; ten stuff classes merge into same-named LVIS classes. See docs/datasets.md.

    Example:
      rankseg prepare coco-lvis --root coco --out data/coco_lvis \\
        --lvis-json lvis/lvis_v1_train.json --lvis-json lvis/lvis_v1_val.json \\
        --stuff-json coco/annotations/stuff_train2017.json \\
        --stuff-json coco/annotations/stuff_val2017.json
    """
    from rankseg_core.convert.coco_lvis import prepare_coco_lvis

    root = root or coco_root
    if root is None:
        raise UserError("missing option --root: the COCO 2017 folder holding train2017/ and val2017/")
    opts = convert_options(workers, num_shards, shard_index, limit, on_error)
    index = prepare_coco_lvis(root, lvis_json, stuff_json, out, essnet_compat=essnet_compat,
                              split=split, opts=opts, note=_note)
    report(index, out)


@prepare_app.command("vspw")
@user_errors(interrupted=RERUN_RESUMES)
def vspw(
    root: Annotated[Path, typer.Option("--root", help="The VSPW_480p folder (train.txt, val.txt, data/<video>/{origin,mask}).")],
    out: Out,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="train and/or val (repeat). Default: both.")] = None,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
) -> None:
    """VSPW (124 classes): one sample per annotated frame, with per-video targets.

    Frames without a mask and damaged / 0-byte frames (a known state of the release) are always
    skipped and listed in skipped.jsonl, even with --on-error fail.

    Example:
      rankseg prepare vspw --root VSPW_480p --out data/vspw
    """
    from rankseg_core.convert.vspw import prepare_vspw

    opts = convert_options(workers, num_shards, shard_index, limit, on_error)
    index = prepare_vspw(root, out, splits=split or ["train", "val"], opts=opts)
    report(index, out)


@prepare_app.command("youtube-vis")
@user_errors(interrupted=RERUN_RESUMES)
def youtube_vis(
    root: Annotated[Path, typer.Option("--root", help="The ytvis_2019 folder ({train,valid}/JPEGImages/<video>/, {train,valid}.json).")],
    out: Out,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="train, valid or test (repeat). Default: train. valid/test have no annotations: frames are stored with ignore labels.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Annotation JSON to use instead of <root>/<split>.json (single --split).")] = None,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
) -> None:
    """YouTube-VIS 2019 (40 classes): frames with semantic labels, instance RLEs and per-video targets.

    Example:
      rankseg prepare youtube-vis --root ytvis_2019 --split train --out data/ytvis19
    """
    from rankseg_core.convert.youtube_vis import prepare_youtube_vis

    opts = convert_options(workers, num_shards, shard_index, limit, on_error)
    index = prepare_youtube_vis(root, out, splits=split or ["train"], json_path=json_path,
                                opts=opts, note=_note)
    report(index, out)
