"""`rankseg prepare <dataset>`: official releases (and the built-in synthetic set) -> shards."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from rankseg_cli.common import RERUN_RESUMES, err, new_app, show, user_errors
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import MAX_CLASSES
from rankseg_core.utils.parallel import default_workers

if TYPE_CHECKING:
    from rankseg_core.convert.common import ConvertOptions

prepare_app = new_app(
    "Convert a dataset into rankseg shards (HDF5 + dataset.json with image-level multi-label targets).\n\n"
    "Re-running the same command resumes: finished shards are kept and skipped.")

# The options every converter shares, declared once.
Out = Annotated[Path, typer.Option("--out", "-o", help="Output shard directory (new or empty, or a previous run of the same command to resume).")]
# Every converter defaults to one worker per core (`default_workers()`).
Workers = Annotated[int, typer.Option("--workers", "-j", help="Worker processes (spawn); 0 = in-process.")]
NumShards = Annotated[int, typer.Option("--num-shards", help="Split the work into N parts (one per machine / SLURM array task).")]
ShardIndex = Annotated[Optional[int], typer.Option("--shard-index", help="Convert only part I of --num-shards; a final run without it assembles dataset.json.")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Convert only the first N samples of each split (sorted keys).")]
OnError = Annotated[str, typer.Option("--on-error", help="fail: stop at the first bad sample; skip: record it in skipped.jsonl and go on.")]


def convert_options(workers: int, num_shards: int, shard_index: int | None, limit: int | None,
                    on_error: str, samples_per_shard: int = 1000) -> ConvertOptions:
    from rankseg_core.convert.common import ConvertOptions  # h5py and the writers: only when converting

    return ConvertOptions(workers=workers, num_shards=num_shards, shard_index=shard_index,
                          limit=limit, on_error=on_error, samples_per_shard=samples_per_shard)


def report(index: dict | None, out: Path) -> None:
    """Closing lines of a conversion: where the shards are, how many samples, what was skipped."""
    if index is None:
        err.print(f"this part of {show(out)} is done; run the command again without --shard-index "
                  "once every part is done to assemble dataset.json")
        return
    for split, s in index["splits"].items():
        skipped = f", [yellow]{s['num_skipped']} skipped[/] (see {show(out / 'skipped.jsonl')})" \
            if s.get("num_skipped") else ""
        err.print(f"{split}: {s['num_samples']} samples in {len(s['shards'])} shard(s){skipped}")
    err.print(f"[green]done[/]: {show(out)} ({show(index['name'])}, K={index['num_classes']})")


@prepare_app.command("synthetic")
@user_errors(interrupted=RERUN_RESUMES)
def synthetic(
    out: Out,
    num_classes: Annotated[int, typer.Option("--num-classes", "-k", help="Vocabulary size K (40..65535).")] = 1000,
    images: Annotated[Optional[int], typer.Option("--images", "-n", help="Training images (default 1000), or videos with --video (default 200); val gets a fifth as many.")] = None,
    val_images: Annotated[Optional[int], typer.Option("--val-images", help="Validation images, or videos with --video (default: a fifth of --images).")] = None,
    size: Annotated[Optional[int], typer.Option("--size", help="Image side in pixels, a multiple of 16 (default 128, 64 with --video).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same dataset (byte for byte).")] = 0,
    panoptic: Annotated[bool, typer.Option("--panoptic", help="Panoptic shards: objects are things (one instance each, a class may repeat), backgrounds stuff.")] = False,
    pretrain_images: Annotated[int, typer.Option("--pretrain-images", help="Also write a 'pretrain' split of N more images of the same classes and looks, disjoint from train / val (to pre-train a backbone on); train / val stay byte-identical.")] = 0,
    video: Annotated[bool, typer.Option("--video", help="Videos of the same world: moving objects that appear and disappear, with per-frame labels and instance tracks (VSPW- and YouTube-VIS-like).")] = False,
    look_alike: Annotated[float, typer.Option("--look-alike", help="Also write weak_shot_look_alike.json: a weak-shot split (docs/weak-shot.md) whose novel classes, this fraction of those the world shows, share their looks with base classes.")] = 0.0,
    frames: Annotated[Optional[int], typer.Option("--frames", help="Frames per video with --video (default 8).")] = None,
    backgrounds: Annotated[Optional[int], typer.Option("--backgrounds", help="B background classes shared by the K // 25 scenes (1..S), so the background no longer names the scene; default one per scene (the standard world, byte for byte).")] = None,
    all_classes: Annotated[bool, typer.Option("--all-classes", help="Put every object class in at least one scene (by default scenes draw their objects with replacement and some classes never appear).")] = False,
    workers: Workers = default_workers(),
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", help="Samples per HDF5 file (>= 1).")] = 500,
) -> None:
    """The built-in synthetic large-vocabulary dataset (no download needed).

    Each image shows one scene with a background and up to 9 objects; an object's look is
    shared by ~K/32 classes of other scenes, so context decides its class. With --video,
    each video shows one scene whose objects move, appear and disappear (docs/video.md).

    Examples (panoptic, with instances; with a pre-training split; videos):
      rankseg prepare synthetic --out data/synth --num-classes 1000 --images 2000
      rankseg prepare synthetic --out data/pan --num-classes 100 --panoptic
      rankseg prepare synthetic --out data/synth --num-classes 200 \\
        --pretrain-images 20000
      rankseg prepare synthetic --out data/vid --video --frames 8
    """
    from rankseg_core.convert.synthetic import prepare_synthetic
    from rankseg_core.convert.synthetic_video import DEFAULT_FRAMES, DEFAULT_SIZE, prepare_synthetic_video

    if num_classes > MAX_CLASSES:  # before generating a world of K classes
        raise UserError(f"--num-classes must be at most {MAX_CLASSES} (train ids are stored as "
                        f"uint16 and 65535 means ignore), not {num_classes}")
    opts = convert_options(workers, 1, None, None, "fail", samples_per_shard)
    if video:
        # Video shards are v1 with per-frame instance tracks, and hold no image pretrain split.
        if panoptic:
            raise UserError("--panoptic is for images: --video shards already hold every frame's "
                            "instance tracks; drop --panoptic")
        if look_alike:
            raise UserError("--look-alike writes a weak-shot split, and weak-shot training takes single images: "
                            "drop --video")
        if pretrain_images:
            raise UserError("--pretrain-images is for images, not --video: write the pretrain "
                            "images into a directory of their own")
        if backgrounds is not None or all_classes:
            raise UserError("--backgrounds / --all-classes change the image world (docs/synthetic.md); "
                            "videos use the default world: drop them or --video")
        index = prepare_synthetic_video(out, num_classes=num_classes, videos=200 if images is None else images,
                                        val_videos=val_images, frames=DEFAULT_FRAMES if frames is None else frames,
                                        size=DEFAULT_SIZE if size is None else size, seed=seed, opts=opts)
    else:
        if frames is not None:
            raise UserError("--frames is the number of frames per video: add --video")
        index = prepare_synthetic(out, num_classes=num_classes, images=1000 if images is None else images,
                                  val_images=val_images, size=128 if size is None else size, seed=seed,
                                  panoptic=panoptic, pretrain_images=pretrain_images, look_alike=look_alike,
                                  backgrounds=backgrounds, all_classes=all_classes, opts=opts)
    report(index, out)
