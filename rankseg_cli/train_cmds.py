"""`rankseg train`, `rankseg eval`, `rankseg predict` and `rankseg stats model`.

Thin commands: parse options, call rankseg_core (train.py, evaluate.py, model_stats.py).
Register with: app.command("train")(train); app.command("eval")(evaluate);
app.command("predict")(predict); stats_app.command("model")(stats_model).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankseg_cli.common import err, out, show, user_errors
from rankseg_core.errors import UserError
from rankseg_core.utils.textlog import captured

Device = Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:N or auto (default: cuda if available).")]
Weights = Annotated[str, typer.Option("--weights", help="auto (model.safetensors, else best.pt, else last.pt), final, best, last or a file.")]


def _train_interrupted(kwargs: dict) -> str:
    """How to go on after Ctrl-C: resume from the last checkpoint if one was written."""
    from rankseg_core.engine.runs import run_paths

    run = kwargs.get("out_dir")
    if run is not None and run_paths(run).last.is_file():
        return f"checkpoints are kept; resume with: rankseg train --out {shlex.quote(str(run))} --resume"
    return "no checkpoint was written yet; re-run the same command to start again"


def _fmt(x: float | None, pct: bool = True) -> str:
    return "-" if x is None else (f"{100 * x:.2f}" if pct else f"{x:.4f}")


def _segmented(rep: dict) -> bool:
    """Whether a report has segmentation rows (a multi-label classifier's has none)."""
    return "miou" in rep


@user_errors(interrupted=_train_interrupted)
@captured  # RUN/train.log holds this command's lines too (the first and the last)
def train(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Run directory (config.yaml, metrics.jsonl, checkpoints/, model.safetensors).")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Shard directory from `rankseg prepare`.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="segmenter-vit{t,s,b,l}, classifier-vit{t,s,b,l} (multi-label classifier of the independent scheme), mask2former-* (incl. -vitadapterl), maskformer-*, deeplabv3-r{18,50,101}, upernet-swin{t,b} / -beit{t,l} (docs/architectures.md).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (sections model:, optim:, schedule:, ...) or a preset name, e.g. segmenter-vitb-ade20k-full or m2f-swinl-ade20k-panoptic (docs/training.md, Presets).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a config key, e.g. --set optim.lr=1e-3 (repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue RUN from checkpoints/last.pt exactly (same data order and losses).")] = False,
    device: Device = None,
    head: Annotated[Optional[str], typer.Option("--head", help="segmenter (the architecture's own classifier over all K, the baseline) or rankseg; protoseg (ProtoSeg's prototypes) and rankproto (RankSeg's top-kappa + prototypes; docs/protoseg.md) on Segmenter, DeepLabv3 and UperNet; Segmenter models also encnet / essnet (supplement Table 1).")] = None,
    kappa: Annotated[Optional[int], typer.Option("--kappa", help="Classes selected per image (clamped to K).")] = None,
    no_select: Annotated[bool, typer.Option("--no-select", help="+MT ablation: ml branch and loss, pixels over all K.")] = False,
    tau: Annotated[Optional[str], typer.Option("--tau", help="rank (per-rank 1/tau, the paper) or shared.")] = None,
    ml_head: Annotated[Optional[str], typer.Option("--ml-head", help="tranenc (default), trandec or gap.")] = None,
    ml_loss: Annotated[Optional[str], typer.Option("--ml-loss", help="asl (default) or bce.")] = None,
    ml_weight: Annotated[Optional[float], typer.Option("--ml-weight", help="Weight w of the ml loss (total = seg + w * ml).")] = None,
    seg_loss_norm: Annotated[Optional[str], typer.Option("--seg-loss-norm", help="official (sum / all pixels) or valid (mean over labelled).")] = None,
    oracle: Annotated[Optional[str], typer.Option("--oracle", help="train-eval: select exactly the crop's GT classes (Fig. 3 oracle).")] = None,
    clip_len: Annotated[Optional[int], typer.Option("--clip-len", help="Video: T consecutive frames share one selection.")] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="Training crop in pixels (multiple of 16).")] = None,
    backbone_weights: Annotated[Optional[Path], typer.Option("--backbone-weights", help="Local backbone weights (.pth/.safetensors; ViT .npz; timm, mmseg or detectron2 .pkl layouts, docs/architectures.md); never downloaded.")] = None,
    selector: Annotated[Optional[Path], typer.Option("--selector", help="Independent scheme: a trained classifier run whose top-kappa select this segmenter's classes (frozen; no ml branch of its own).")] = None,
    weak_shot: Annotated[Optional[str], typer.Option("--weak-shot", help="Weak-shot training (docs/weak-shot.md): a split whose novel classes keep only image-level labels (their pixels are ignored), a built-in name (coco-stuff-10k/split1..9, ade20k/split1..4) or a JSON file.")] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Start from a run's or a file's weights (.safetensors, rankseg .pt, state dict; an official detectron2 .pkl for Mask2Former / MaskFormer models): tensors matching by name and shape; not re-applied by --resume.")] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Optimizer steps.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Global batch (images or clips) per step, over all processes.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of weights, data order and augmentation.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate on the val split every N steps (0 = only at the end).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="DataLoader workers per process.")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision on CUDA (default on): bf16 autocast where the GPU supports it, else fp16 with a gradient scaler; no effect on a CPU (key amp).")] = None,
    no_tensorboard: Annotated[bool, typer.Option("--no-tensorboard", help="No TensorBoard events in RUN/tensorboard/ (default: written when the tensorboard package is installed; --set tensorboard=true requires it).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
) -> None:
    """Train a model of any family on shards: Segmenter / RankSeg, Mask2Former or the
    multi-label classifier (iteration-based, the family's official recipe, mmseg augmentation).

    Under torchrun it trains with DDP:
      torchrun --nproc_per_node N -m rankseg_cli train ...

    Examples:
      rankseg train -m segmenter-vitb --data data/ade20k-full --out runs/ade
      rankseg train -m segmenter-vitt --data data/synth --out runs/tiny \\
        --img-size 64 --iters 300 --set optim.lr=0.01
      rankseg train --config m2f-r50-synthetic-tiny --data data/synth \\
        --out runs/m2f-tiny
      rankseg train --out runs/ade --resume
      rankseg train -m classifier-vitb --data data/coco-stuff --out runs/q2l
      rankseg train -m segmenter-vitb --data data/coco-stuff --out runs/indep \\
        --selector runs/q2l
      rankseg train -m segmenter-vitb --data data/coco-stuff --out runs/ft \\
        --init-from runs/q2l
    """
    from rankseg_core.engine.configure import flag_overrides
    from rankseg_core.engine.train import config_for_run, describe
    from rankseg_core.engine.train import train as run_train
    from rankseg_core.utils import distributed as D

    if oracle is not None and oracle != "train-eval":
        raise UserError(f"--oracle {oracle!r}: only train-eval is a training mode (GT eval is `rankseg eval --oracle`)")
    flags = dict(model=model, head=head, kappa=kappa, tau=tau, ml_head=ml_head, clip_len=clip_len, img_size=img_size,
                 backbone_weights=backbone_weights, ml_loss=ml_loss, ml_weight=ml_weight, seg_loss_norm=seg_loss_norm,
                 iters=iters, batch_size=batch_size, seed=seed, device=device, eval_every=eval_every, workers=workers)
    overrides = list(set_ or []) + flag_overrides(flags)
    if no_select:
        overrides.append("model.select=false")
    if oracle:
        overrides.append("model.oracle=true")
    if selector is not None:
        overrides.append(f"model.selector.run={selector}")
    if init_from is not None:
        overrides.append(f"init_from={init_from}")
    if weak_shot is not None:
        overrides.append(f"data.weak_shot={weak_shot}")
    if no_tensorboard:
        overrides.append("tensorboard=false")
    if amp is not None:
        overrides.append(f"amp={str(amp).lower()}")
    cfg = config_for_run(out_dir, config, overrides, data, resume)
    if dry_run:
        from rankseg_core.engine.selector import resolve_selector
        from rankseg_core.engine.warm_start import check_init_from

        resolve_selector(cfg, out_dir)  # as training would record them
        check_init_from(cfg, resume)
        out.print(describe(cfg), highlight=False, markup=False)
        return
    main = D.env_info().is_main
    if main:
        from rankseg_core.families import family_of

        m = cfg.model
        what = family_of(m.model).describe(m)
        err.print(f"{'resuming' if resume else 'training'} {m.model} {what} on {cfg.data.name} (K={m.num_classes}), "
                  f"{cfg.schedule.iters} iters x batch {cfg.schedule.batch_size} -> {show(out_dir)}")
    res = run_train(cfg, out_dir, resume=resume)
    if main and res.already_finished:
        err.print(f"{show(out_dir)} is already finished ({res.iterations} iterations): nothing to resume; "
                  f"evaluate it with: rankseg eval {show(shlex.quote(str(out_dir)))}", highlight=False, soft_wrap=True)
    elif main and res.final_eval is not None:
        r = res.final_eval
        seg = f"val mIoU {_fmt(r['miou'])}, " if r["miou"] is not None and r["miou"] == r["miou"] else "val "
        if r.metrics.get("vis"):  # a video instance run is scored by its tracks' AP
            seg = f"val AP {_fmt(r.metrics['vis']['ap'])}, {seg[4:]}"
        ws = r.metrics.get("weak_shot")
        if ws:  # a weak-shot run: the headline NovelIoU next to mIoU
            seg += f"BaseIoU {_fmt(ws['base_iou'])}, NovelIoU {_fmt(ws['novel_iou'])}, "
        err.print(f"[green]done[/]: {seg}mAP {_fmt(r['map'])}, recall@{r['kappa']} {_fmt(r['recall_at_kappa'])}; "
                  f"weights {show(out_dir / 'model.safetensors')}")


@user_errors
def evaluate(
    run: Annotated[Path, typer.Argument(help="Run directory (from `rankseg train`).")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Shard directory (default: the run's).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: the run's validation split, or with --data the shards' val / validation / valid / test).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Metrics JSON (default: RUN/eval/SPLIT.json; with --data other shards: RUN/eval/DATASET-SPLIT-HASH.json); the per-class CSV goes next to it.")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="whole or slide (default: the run's eval.mode).")] = None,
    scales: Annotated[Optional[str], typer.Option("--scales", help="Multi-scale test, e.g. 0.75,1.0,1.25.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Add horizontally flipped passes.")] = False,
    kappa: Annotated[Optional[int], typer.Option("--kappa", help="Classes selected at test time (default: as trained).")] = None,
    dynamic_kappa: Annotated[Optional[float], typer.Option("--dynamic-kappa", help="Select classes with ml probability > THRESH (e.g. 0.05).")] = None,
    oracle: Annotated[bool, typer.Option("--oracle", help="GT (eval): select exactly each image's GT classes.")] = False,
    oracle_fill: Annotated[Optional[str], typer.Option("--oracle-fill", help="With --oracle: fill each image's GT classes up to kappa with the model's highest-ranked other classes (ranked: recall 100 %, the ranking's own false positives) or with random ones (random, seeded by the image).")] = None,
    save_predictions: Annotated[Optional[Path], typer.Option("--save-predictions", help="Write 16-bit PNG predictions (train ids) here.")] = None,
    save_panoptic: Annotated[Optional[Path], typer.Option("--save-panoptic", help="Panoptic runs on panoptic shards: write the predicted segments here in the COCO panoptic format (PNGs + predictions.json), for panopticapi.")] = None,
    save_results: Annotated[Optional[Path], typer.Option("--save-results", help="Video instance runs: the YouTube-VIS results.json to write (default: next to the metrics JSON, STEM_results.json).")] = None,
    classes_json: Annotated[Optional[Path], typer.Option("--classes-json", help='Class subsets {"base": [...], "novel": [...]} (ids or names) for subset mIoU.')] = None,
    max_images: Annotated[int, typer.Option("--max-images", help="Evaluate only the first N images (0 = all).")] = 0,
    novel_classes: Annotated[Optional[str], typer.Option("--novel-classes", help="Weak-shot split (built-in name or JSON file, docs/weak-shot.md) whose BaseIoU / NovelIoU / base and novel accuracy to add (default: a weak-shot run's own split).")] = None,
    device: Device = None,
    weights: Weights = "auto",
) -> None:
    """Evaluate a run: mIoU / aAcc / per-class IoU (confusion matrix), multi-label mAP and recall@kappa,
    PQ / SQ / RQ (all, things, stuff) for panoptic runs on panoptic shards, VC8 / VC16 on video
    shards, and for video instance runs the YouTube-VIS AP of whole-video tracks (with their
    results.json).

    Examples:
      rankseg eval runs/ade
      rankseg eval runs/ade --mode slide --scales 0.75,1.0,1.25 --flip \\
        --json ade_ms.json
      rankseg eval runs/ade --kappa 50 --oracle
      rankseg eval runs/ade --oracle --oracle-fill ranked --json ade_gt.json
      rankseg eval runs/m2f-pan --save-panoptic preds/pan
      rankseg eval runs/vis --split held_out --save-results held_out.json
    """
    from rankseg_core.engine.evaluate import EvalOptions, run_evaluation
    from rankseg_core.model.selection import SelectionOptions

    try:
        scale_list = [float(s) for s in scales.split(",")] if scales else None
    except ValueError:
        raise UserError(f"--scales {scales!r}: expected numbers separated by commas, e.g. 0.75,1.0,1.25") from None
    opts = EvalOptions(split=split or None,  # None: the run's validation split
                       data_root=str(data) if data else None, mode=mode, scales=scale_list,
                       flip=True if flip else None, selection=SelectionOptions(kappa, dynamic_kappa, oracle, oracle_fill),
                       max_images=max_images, save_predictions=save_predictions, save_panoptic=save_panoptic,
                       save_results=save_results)
    rep, json_path, csv_path = run_evaluation(run, opts, json_out, classes_json, device or "auto", weights,
                                              novel_classes)
    t = Table("metric", "value")
    if _segmented(rep):
        t.add_row("mIoU", _fmt(rep["miou"]))
        t.add_row("aAcc", _fmt(rep["aacc"]))
        if "vc8" in rep:  # video shards
            t.add_row("VC8 / VC16 (video consistency)", f"{_fmt(rep['vc8'])} / {_fmt(rep['vc16'])}")
    t.add_row("mAP (multi-label)", _fmt(rep["map"]))
    t.add_row(f"recall@{rep['config']['kappa']}", _fmt(rep["recall_at_kappa"]))
    if "novel_iou" in rep:  # weak-shot: the official base / novel means
        ws = rep["weak_shot"]
        t.add_row(f"BaseIoU / NovelIoU ({ws['base_averaged']} / {ws['novel_averaged']} classes)",
                  f"{_fmt(rep['base_iou'])} / {_fmt(rep['novel_iou'])}")
        t.add_row("BaseACC / NovelACC", f"{_fmt(rep['base_acc'])} / {_fmt(rep['novel_acc'])}")
    for name, sub in (rep["subsets"] if _segmented(rep) else {}).items():
        t.add_row(f"mIoU {name} ({sub['num_classes']} classes)", _fmt(sub["miou"]))
    for part, values in ((p, rep["pq"][p]) for p in ("all", "things", "stuff") if "pq" in rep):
        what = "" if part == "all" else f" {part}"
        t.add_row(f"PQ / SQ / RQ{what} ({values['n']} classes)",
                  " / ".join(_fmt(values[m]) for m in ("pq", "sq", "rq")))
    if "vis" in rep:  # a video instance run: the benchmark's own metric
        v = rep["vis"]
        t.add_row("AP / AP50 / AP75 (tracks)", " / ".join(_fmt(v[k]) for k in ("ap", "ap50", "ap75")))
        t.add_row("AR1 / AR10", f"{_fmt(v['ar1'])} / {_fmt(v['ar10'])}")
        t.add_row("videos", str(v["num_videos"]))
    t.add_row("images", str(rep["num_images"]))
    out.print(t)
    results = rep["config"].get("results")
    err.print(f"wrote {show(json_path)} and {show(csv_path)}" + (f" and {show(Path(results))}" if results else ""))


@user_errors
def predict(
    run: Annotated[Path, typer.Argument(help="Run directory (from `rankseg train`).")],
    inputs: Annotated[list[Path], typer.Argument(help="Image files or directories of images.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output directory: new, empty or from an earlier predict; never an input directory.")],
    kappa: Annotated[Optional[int], typer.Option("--kappa", help="Classes selected / listed per image, at least 1 (default: as trained).")] = None,
    videos_json: Annotated[Optional[Path], typer.Option("--videos-json", help="Video instance runs: the release JSON whose video ids to write (default: 1..N in input order).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Video instance runs: tracks kept per video (official: 10).")] = 10,
    device: Device = None,
    weights: Weights = "auto",
) -> None:
    """Segment your own images (any size): per image a 16-bit label PNG of train ids, an overlay
    with a legend, and a JSON of the classes found and the top-kappa class probabilities.
    A video instance run takes one directory of frames per video instead and writes
    OUT/results.json (YouTube-VIS submission format) and OUT/videos.json.

    Examples:
      rankseg predict runs/ade photos/ --out preds/
      rankseg predict runs/vis valid/JPEGImages/* --out sub/ \\
        --videos-json data/ytvis_2019/valid.json
    """
    from rankseg_core.engine.predict import Prediction, run_prediction

    results = run_prediction(run, inputs, out_dir, device or "auto", weights, kappa, videos_json=videos_json,
                             top_k=top_k)
    for r in results[:10]:
        if isinstance(r, Prediction):
            names = "; ".join(c["name"] for c in r.classes[:5])  # ADE class names hold commas
            err.print(f"{show(r.image.name)}: {show(names)}{' ...' if len(r.classes) > 5 else ''}")
        else:
            err.print(f"{show(r.folder.name)}: video {r.video_id}, {r.frames} frame(s), {r.tracks} track(s)")
    what = "image" if all(isinstance(r, Prediction) for r in results) else "video"
    err.print(f"[green]done[/]: {len(results)} {what}(s) -> {show(out_dir)}")


@user_errors
def stats_model(
    model: Annotated[str, typer.Option("--model", "-m", help="segmenter-vit{t,s,b,l}, mask2former-r50 / -swin{t,s,b,l} / -vitadapterl / -semaskl, maskformer-*, deeplabv3-r{18,50,101}, upernet-swin{t,b} / -beit{t,l} (docs/architectures.md).")] = "segmenter-vitb",
    num_classes: Annotated[int, typer.Option("--num-classes", "-k", help="Vocabulary size K.")] = 150,
    head: Annotated[str, typer.Option("--head", help="segmenter (baseline) or rankseg; also protoseg / rankproto (Segmenter, DeepLabv3, UperNet) and encnet / essnet (Segmenter).")] = "rankseg",
    kappa: Annotated[int, typer.Option("--kappa", help="Selected classes (rankseg).")] = 100,
    img_size: Annotated[int, typer.Option("--img-size", help="Input side in pixels.")] = 512,
    ml_head: Annotated[str, typer.Option("--ml-head", help="tranenc, trandec or gap.")] = "tranenc",
    task: Annotated[str, typer.Option("--task", help="Mask2Former: semantic, panoptic or instance (official query count: 200 for Swin-L panoptic / instance).")] = "semantic",
    clip_len: Annotated[int, typer.Option("--clip-len", help="Frames per clip T: video models are counted on one clip of T frames.")] = 1,
    no_flops: Annotated[bool, typer.Option("--no-flops", help="Parameters only (fast).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Parameters and FLOPs / MACs of a model (all matmuls counted; see docs/model.md for the
    paper's mmcv counting). params_m is in units of 10^6, params_mi in units of 2^20 (the unit
    of the paper's Mask2Former Table 8).

    Examples:
      rankseg stats model --model segmenter-vitb --num-classes 1284 --kappa 100
      rankseg stats model --model mask2former-swinl --num-classes 150 \\
        --kappa 150 --img-size 640 --task panoptic
      rankseg stats model --model deeplabv3-r101 --num-classes 150 \\
        --kappa 50 --head segmenter --no-flops
      rankseg stats model --model mask2former-swinl --num-classes 40 \\
        --kappa 40 --task instance --clip-len 2 --img-size 480
    """
    from rankseg_core.config.mask2former import Mask2FormerConfig
    from rankseg_core.config.model import ModelConfig
    from rankseg_core.engine.model_stats import model_stats

    cfg = ModelConfig(model=model, num_classes=num_classes, head=head, kappa=kappa, img_size=img_size, ml_head=ml_head,
                      clip_len=clip_len, mask2former=Mask2FormerConfig(task=task))
    stats = model_stats(cfg, flops=not no_flops)
    if as_json:
        print(json.dumps(stats, indent=1))
        return
    t = Table("quantity", "value")
    for key, value in stats.items():
        t.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    out.print(t)
