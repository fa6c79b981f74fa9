"""`rankseg pseudo-label`: SimFormer*'s pseudo labels of a weak-shot run as new shards (thin
command over rankseg_core.engine.pseudo_label). Register with `register(app)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankseg_cli.common import RERUN_RESUMES, err, out, show, user_errors
from rankseg_cli.train_cmds import Device, Weights
from rankseg_core.errors import UserError


@user_errors(interrupted=RERUN_RESUMES)
def pseudo_label(
    run: Annotated[Path, typer.Argument(help="A weak-shot run directory (trained with --weak-shot).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="New shard directory to write (new, empty, or one this command began: it resumes).")],
    data: Annotated[Optional[Path], typer.Option("--data", "-d", help="Source shards (default: the run's).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split to pseudo-label (default: the run's training split); every other split is copied unchanged.")] = None,
    run_protocol: Annotated[bool, typer.Option("--run-protocol", help="Predict with the run's eval.mode / scales / flip (as `rankseg eval`) instead of the official whole-image pass at the test size.")] = False,
    mode: Annotated[Optional[str], typer.Option("--mode", help="whole or slide (default: whole, the official pass; with --run-protocol the run's).")] = None,
    scales: Annotated[Optional[str], typer.Option("--scales", help="Multi-scale test, e.g. 0.75,1.0,1.25 (default: 1.0; with --run-protocol the run's).")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="Add horizontally flipped passes.")] = False,
    samples_per_shard: Annotated[int, typer.Option("--samples-per-shard", help="Samples per shard file of the new shards.")] = 1000,
    device: Device = None,
    weights: Weights = "auto",
) -> None:
    """Write SimFormer*'s pseudo labels of a weak-shot run as new shards: each image of the
    split is predicted (the engine's inference, as `rankseg eval`) and labelled with the base
    ground truth where the pixel is base, the predicted class where that is a novel class
    present in the image's original label, and ignore elsewhere. Images are stored byte for
    byte; the other splits are copied. Retrain on them without --weak-shot
    (docs/weak-shot.md, SimFormer*).

    Examples:
      rankseg pseudo-label runs/ws1 --out shards/coco10k_pseudo_s1
      rankseg train -m segmenter-vitb --data shards/coco10k_pseudo_s1 \\
        --out runs/ws1_retrained
      rankseg eval runs/ws1_retrained --data shards/coco_stuff_10k \\
        --novel-classes coco-stuff-10k/split1
    """
    from rankseg_core.engine.pseudo_label import PseudoLabelOptions, make_pseudo_labels

    try:
        scale_list = [float(s) for s in scales.split(",")] if scales else None
    except ValueError:
        raise UserError(f"--scales {scales!r}: expected numbers separated by commas, e.g. 0.75,1.0,1.25") from None
    opts = PseudoLabelOptions(split=split, weights=weights, device=device or "auto", run_protocol=run_protocol,
                              mode=mode, scales=scale_list, flip=True if flip else None,
                              samples_per_shard=samples_per_shard)
    res = make_pseudo_labels(run, out_dir, data, opts)
    t = Table("split", "samples", "written now")
    for name, n in res.samples.items():
        what = f"{name} (pseudo labels)" if name == res.split else f"{name} (copied)"
        t.add_row(what, str(n), str(res.written.get(name, 0)))
    out.print(t)
    p = res.protocol
    err.print(f"protocol: {p.mode}, scales {','.join(f'{s:g}' for s in p.scales)}, flip {'on' if p.flip else 'off'}; "
              f"weights {show(res.weights)}", highlight=False, soft_wrap=True)
    err.print(f"novel pixels in the pseudo labels: {res.novel_pixels} (the original labels have "
              f"{res.novel_gt_pixels}, hidden in training)", highlight=False, soft_wrap=True)
    err.print(f"wrote {show(res.out)}; retrain on it without --weak-shot: rankseg train --data {show(res.out)} ...",
              highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """pseudo-label."""
    app.command("pseudo-label")(pseudo_label)
