"""`rankseg export` (shards -> the folders detectron2-based projects read), `rankseg prepare
detectron2` (such a folder -> shards) and `rankseg export-model` (a run -> TorchScript / ONNX). Thin commands over rankseg_core.convert.export and
rankseg_core.convert.detectron2; registered by `score_cmds.register`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rankseg_cli.common import RERUN_RESUMES, err, show, user_errors
from rankseg_cli.prepare import Limit, NumShards, OnError, Out, ShardIndex, Workers, convert_options, report
from rankseg_core.utils.parallel import default_workers


@user_errors(interrupted="files already written are complete; re-run the same command to resume")
def export(
    shards: Annotated[Path, typer.Argument(help="Shard directory (from `rankseg prepare`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (new or empty, or an earlier export of the same shards to resume).")],
    layout: Annotated[str, typer.Option("--layout", help="Folder layout to write: detectron2.")] = "detectron2",
    split: Annotated[list[str] | None, typer.Option("--split", help="Only this split (repeatable; default: all).")] = None,
    images: Annotated[str, typer.Option("--images", help="copy: the stored bytes; maskformer: ADE20K-Full shards made with --max-short-side 0, resized and re-encoded exactly as MaskFormer's script does.")] = "copy",
) -> None:
    """Write shards as the folders detectron2-based projects (MaskFormer, Mask2Former, CAT-Seg,
    SAN, FC-CLIP, ODISE) read: the stored images byte for byte, and labels as uint16 TIFF /
    PNG with each project's folder names and ignore value (docs/benchmarks/export.md).

    ADE20K-Full -> ADE20K_2021_17_01/{images,annotations}_detectron2/{training,validation};
    PASCAL-Context-459/59 -> pascal_ctx_d2/images + annotations_ctx459 (TIFF) / annotations_ctx59;
    ADE20K-150 -> ADEChallengeData2016; COCO-Stuff -> coco/stuffthingmaps_detectron2; COCO+LVIS ->
    coco_lvis/annotations_detectron2 and the official RankSeg code's lvis_mask.

    Examples (then DETECTRON2_DATASETS=datasets; --images maskformer writes files
    byte-identical to MaskFormer's):
      rankseg export shards/ade847 --out datasets/
      rankseg export shards/pc459 --out datasets/ --split val
      rankseg export shards/ade847_fullres --out datasets/ --images maskformer
    """
    from rankseg_core.convert.export import export_shards

    res = export_shards(shards, out, layout, split or None, images)
    for s, n in res.samples.items():
        err.print(f"{s}: {n} images -> {show(out / res.layout.images.format(split=res.layout.folder_split(s)))}")
    err.print(f"[green]done[/]: {res.written} files written, {res.skipped} already complete; "
              f"layout of {show(res.layout.follows)}")


@user_errors(interrupted=RERUN_RESUMES)
def prepare_detectron2(
    root: Annotated[Path, typer.Option("--root", "-r", help="The folder holding the layout (what DETECTRON2_DATASETS points to), or a `rankseg export` output.")],
    out: Out,
    dataset: Annotated[str | None, typer.Option("--dataset", help="ade20k-full, ade20k-150, coco-stuff-164k, pascal-context-459, pascal-context-59 or coco_lvis (not needed for a rankseg export).")] = None,
    workers: Workers = default_workers(),
    num_shards: NumShards = 1,
    shard_index: ShardIndex = None,
    limit: Limit = None,
    on_error: OnError = "fail",
) -> None:
    """Shards from a detectron2-style folder: images plus train-id label files (what
    `rankseg export` and MaskFormer's / ODISE's preparation scripts write).

    Examples:
      rankseg prepare detectron2 --root datasets/ --dataset ade20k-full \\
        --out shards/ade847_d2
      rankseg prepare detectron2 --root exported/ --out shards/roundtrip
    """
    from rankseg_core.convert.detectron2 import prepare_detectron2_layout

    opts = convert_options(workers, num_shards, shard_index, limit, on_error)
    report(prepare_detectron2_layout(root, out, dataset, opts), out)


@user_errors(interrupted="nothing was written (the file is written only after the parity check)")
def export_model(
    run: Annotated[Path, typer.Argument(help="Run directory (from `rankseg train`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write (must not exist; not inside the run directory).")],
    fmt: Annotated[str, typer.Option("--format", help="torchscript or onnx (onnx needs onnxruntime for the parity check).")] = "torchscript",
    size: Annotated[str | None, typer.Option("--size", help="Input size N or HxW, multiples of 32 (default: model.img_size); fixed in the file.")] = None,
    kappa: Annotated[int | None, typer.Option("--kappa", help="Classes selected per image, fixed in the file (default: as trained).")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="An image of yours to add to the parity check (resized to --size).")] = None,
    weights: Annotated[str, typer.Option("--weights", help="auto (model.safetensors, else best.pt, else last.pt), final, best, last or a file.")] = "auto",
) -> None:
    """Export a run's inference path (normalisation, forward, top-kappa selection, logits at the
    input size, label map) as one TorchScript or ONNX file for one input size, after checking
    it against the PyTorch model on test images (docs/training.md, "Exporting a trained model").

    Input: uint8 RGB B x 3 x H x W (TorchScript: any B; ONNX: B = 1). Outputs: labels B x H x W,
    classes B x kappa (rank order), logits B x kappa x H x W, ml_probs B x K (ranking models).

    Examples:
      rankseg export-model runs/ade --out ade_rankseg.pt
      rankseg export-model runs/ade --out ade.onnx --format onnx
    """
    from rankseg_core.engine.export_model import export_run

    res = export_run(run, out, fmt, size, kappa, weights, image)
    h, w = res.size
    err.print(f"[green]done[/]: {show(res.out)} ({res.format}, input uint8 B x 3 x {h} x {w}, outputs "
              f"{', '.join(res.outputs)}; kappa={res.kappa}); parity: max |logit| difference "
              f"{res.max_logit_diff:.2g}, labels as `rankseg predict` on {res.label_agreement:.2%} of the test pixels")


def register(app: typer.Typer, prepare_app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("export-model")(export_model)
    if not any(c.name == "detectron2" for c in prepare_app.registered_commands):
        prepare_app.command("detectron2")(prepare_detectron2)
