"""`rankseg prepare ade20k-full | ade20k | coco-stuff | coco-stuff-10k | pascal-context`: image datasets with PNG or .mat masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from rankseg_cli.common import RERUN_RESUMES, user_errors
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

Root = Annotated[Path, typer.Option("--root", "-r", help="The dataset release folder (see the layout above).")]
PerShard = Annotated[int, typer.Option("--samples-per-shard", help="Samples per HDF5 file.")]


@prepare_app.command("ade20k-full")
@user_errors(interrupted=RERUN_RESUMES)
def ade20k_full(
    root: Root,
    out: Out,
    split: Annotated[str, typer.Option("--split", help="training, validation or all.")] = "all",
    max_short_side: Annotated[int, typer.Option("--max-short-side", help="MaskFormer protocol: resize images whose short side exceeds this (bilinear image, nearest label); 0 = full resolution, original JPEGs.")] = 512,
    top_classes: Annotated[Optional[int], typer.Option("--top-classes", help="ADE20K-X: keep the X classes present in the most training images (remapped 0..X-1, others ignored).")] = None,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """ADE20K-Full, 847 classes (ADE20K_2021_17_01 release; class = R/10*256 + G of *_seg.png).

    Layout: ROOT/images/ADE/{training,validation}/<scene>/.../ADE_*.jpg, each with its ADE_*_seg.png next to it (index_ade20k.pkl is not needed).

    Examples (the second: ADE20K-200 of ProtoSeg):
      rankseg prepare ade20k-full --root data/ADE20K_2021_17_01 \\
        --out shards/ade847
      rankseg prepare ade20k-full --root data/ADE20K_2021_17_01 \\
        --out shards/ade200 --top-classes 200
    """
    from rankseg_core.convert.ade20k_full import prepare_ade20k_full

    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    index = prepare_ade20k_full(root, out, split=split, max_short_side=max_short_side,
                                top_classes=top_classes, opts=opts)
    report(index, out)


@prepare_app.command("ade20k")
@user_errors(interrupted=RERUN_RESUMES)
def ade20k(
    root: Root,
    out: Out,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """ADE20K-150 (SceneParsing, ADEChallengeData2016): mask value 0 ignored, 1..150 -> 0..149.

    Layout: ROOT/images/{training,validation}/*.jpg and ROOT/annotations/{training,validation}/*.png.

    Example:
      rankseg prepare ade20k --root data/ADEChallengeData2016 --out shards/ade150
    """
    from rankseg_core.convert.png_datasets import prepare_ade20k

    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    report(prepare_ade20k(root, out, opts), out)


@prepare_app.command("coco-stuff")
@user_errors(interrupted=RERUN_RESUMES)
def coco_stuff(
    root: Root,
    out: Out,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """COCO-Stuff-164k, 171 classes (mask value = COCO-Stuff id - 1, 255 unlabelled).

    Layout: ROOT/{train2017,val2017}/*.jpg and ROOT/stuffthingmaps_trainval2017/{train2017,val2017}/*.png.

    Example:
      rankseg prepare coco-stuff --root data/coco --out shards/coco_stuff
    """
    from rankseg_core.convert.png_datasets import prepare_coco_stuff

    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    report(prepare_coco_stuff(root, out, opts), out)


@prepare_app.command("coco-stuff-10k")
@user_errors(interrupted=RERUN_RESUMES)
def coco_stuff_10k(
    root: Root,
    out: Out,
    release: Annotated[str, typer.Option("--release", help="1.1 (cocostuff-10k-v1.1.zip: S = COCO-Stuff id, 0 unlabelled; mmsegmentation) or 1.0 (cocostuff-10k-v1.0.zip: S = 2 + train id, 1 unlabelled; MaskFormer, SimFormer). Same 171 classes.")] = "1.1",
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """COCO-Stuff-10K, 171 classes: the 9K / 1K release split (shard splits train / test) from the
    release's annotations/*.mat.

    Layout: ROOT/images/*.jpg, ROOT/annotations/*.mat, ROOT/imageLists/{train,test}.txt.

    Example:
      rankseg prepare coco-stuff-10k --root data/cocostuff-10k \\
        --out shards/coco_stuff_10k
    """
    from rankseg_core.convert.coco_stuff_10k import prepare_coco_stuff_10k

    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    report(prepare_coco_stuff_10k(root, out, release, opts), out)


@prepare_app.command("pascal-context")
@user_errors(interrupted=RERUN_RESUMES)
def pascal_context(
    root: Root,
    out: Out,
    classes: Annotated[int, typer.Option("--classes", help="59 (background ignored), 60 (background = class 0) or, with --from-mat, 459.")] = 59,
    from_mat: Annotated[bool, typer.Option("--from-mat", help="Read the release's trainval/*.mat label maps (459 classes) instead of mmseg's PNG masks.")] = False,
    mat_dir: Annotated[Optional[Path], typer.Option("--mat-dir", help="--from-mat: the extracted trainval/ folder (default ROOT/trainval).")] = None,
    train_list: Annotated[Optional[Path], typer.Option("--train-list", help="--from-mat: train image ids (default ROOT/ImageSets/Main/train.txt, 4,998).")] = None,
    val_list: Annotated[Optional[Path], typer.Option("--val-list", help="--from-mat: val image ids (default ROOT/ImageSets/Main/val.txt, 5,105).")] = None,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """PASCAL-Context 59/60 (VOC2010 images with mmsegmentation's SegmentationClassContext masks), or
    459/59/60 straight from the release's .mat label maps with --from-mat.

    Layout: ROOT = VOCdevkit/VOC2010 with JPEGImages/*.jpg, SegmentationClassContext/*.png and ImageSets/SegmentationContext/{train,val}.txt;
    with --from-mat: JPEGImages/*.jpg, ImageSets/Main/{train,val}.txt and trainval/*.mat (+ labels.txt) from trainval.tar.gz.

    Examples (the last: the 5,104 validation images of the Detail-API pipelines):
      rankseg prepare pascal-context --root data/VOCdevkit/VOC2010 \\
        --out shards/pc59
      rankseg prepare pascal-context --from-mat --classes 459 \\
        --root data/VOCdevkit/VOC2010 --out shards/pc459
      rankseg prepare pascal-context --from-mat --classes 459 \\
        --root data/VOCdevkit/VOC2010 --out shards/pc459_5104 \\
        --val-list data/VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt
    """
    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    if from_mat:
        from rankseg_core.convert.pascal_context import prepare_pascal_context_mat

        lists = {s: p for s, p in (("train", train_list), ("val", val_list)) if p is not None}
        report(prepare_pascal_context_mat(root, out, classes, mat_dir=mat_dir, lists=lists, opts=opts), out)
        return
    if classes == 459 or mat_dir or train_list or val_list:
        raise UserError("--classes 459, --mat-dir, --train-list and --val-list read the release's .mat files: "
                        "add --from-mat")
    from rankseg_core.convert.png_datasets import prepare_pascal_context

    report(prepare_pascal_context(root, out, classes, opts), out)
