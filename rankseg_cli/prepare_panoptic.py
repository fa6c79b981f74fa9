"""`rankseg prepare coco-panoptic | ade20k-panoptic`: panoptic datasets -> panoptic (v2) shards."""

from __future__ import annotations

from typing import Annotated

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
from rankseg_cli.prepare_images import PerShard, Root
from rankseg_core.utils.parallel import default_workers


@prepare_app.command("coco-panoptic")
@user_errors(interrupted=RERUN_RESUMES)
def coco_panoptic(
    root: Root,
    out: Out,
    split: Annotated[str, typer.Option("--split", help="train, val or all (both).")] = "all",
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """COCO panoptic 2017: 133 classes (80 things, 53 stuff), segments + semantic labels.

    Layout: ROOT/annotations/panoptic_{train,val}2017.json, ROOT/panoptic_{train,val}2017/*.png (or under annotations/) and ROOT/{train,val}2017/*.jpg.

    Examples (the second: validation only):
      rankseg prepare coco-panoptic --root data/coco --out shards/coco_panoptic
      rankseg prepare coco-panoptic --root data/coco --out shards/coco_pan_val \\
        --split val
    """
    from rankseg_core.convert.coco_panoptic import prepare_coco_panoptic

    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    report(prepare_coco_panoptic(root, out, split=split, opts=opts), out)


@prepare_app.command("ade20k-panoptic")
@user_errors(interrupted=RERUN_RESUMES)
def ade20k_panoptic(
    root: Root,
    out: Out,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
    samples_per_shard: PerShard = 1000,
) -> None:
    """ADE20K panoptic: 150 classes (100 things, 50 stuff), as MaskFormer's prepare_ade20k_pan_seg.py builds it.

    Layout: ROOT = ADEChallengeData2016 with images/{training,validation}/*.jpg, annotations/{training,validation}/*.png and annotations_instance/{training,validation}/*.png (R = instance category, G = instance number).

    Example:
      rankseg prepare ade20k-panoptic --root data/ADEChallengeData2016 \\
        --out shards/ade_panoptic
    """
    from rankseg_core.convert.ade20k_panoptic import prepare_ade20k_panoptic

    opts = convert_options(workers, num_shards, shard_index, limit, on_error, samples_per_shard)
    report(prepare_ade20k_panoptic(root, out, opts), out)
