"""`rankseg inspect`, `rankseg verify` and `rankseg stats class-cdf`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from rankseg_cli.common import err, new_app, out, show, user_errors

stats_app = new_app("Statistics: class counts per image (Fig. 2) and model size/FLOPs.")


@user_errors
def inspect(
    root: Annotated[Path, typer.Argument(help="Shard directory.")],
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON object per sample on stdout.")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N samples per split.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Only this split.")] = None,
) -> None:
    """Show what a shard directory holds.

    Examples:
      rankseg inspect data/synth
      rankseg inspect data/synth --jsonl --limit 5 | jq .classes
    """
    from rankseg_core.shards.read import ShardIndex

    idx = ShardIndex(root)
    splits = [split] if split else idx.splits
    if jsonl:
        for s in splits:
            a = idx.arrays(s)
            nseg = idx.segment_counts(s)
            for i in range(min(len(a.keys), limit or len(a.keys))):
                rec = {"key": a.keys[i], "split": s, "height": int(a.height[i]), "width": int(a.width[i]),
                       "classes": a.classes_of(i).tolist(), "pixels": a.pixels_of(i).tolist()}
                if nseg is not None:
                    rec["segments"] = int(nseg[i])
                if a.video[i]:
                    rec.update(video=a.video[i], frame=int(a.frame[i]))
                sys.stdout.write(json.dumps(rec) + "\n")
        return
    m = idx.meta
    thing_classes = idx.thing_classes  # None unless panoptic
    things = f"  panoptic: {len(thing_classes)} thing / {idx.num_classes - len(thing_classes)} stuff" \
        if thing_classes is not None else ""
    out.print(f"[bold]{show(idx.name)}[/]  {show(root)}  K={idx.num_classes}  ignore={m.get('ignore', 65535)}  "
              f"format v{m['version']}{things}  classes from: {m.get('class_source') or '-'}")
    t = Table("split", "samples", "shards", "skipped", "classes/img (mean, max)", "videos")
    for s in splits:
        sm = idx.split_meta(s)
        n = idx.class_counts_only(s)
        t.add_row(s, str(sm["num_samples"]), str(len(sm["shards"])), str(sm.get("num_skipped", 0)),
                  f"{n.mean():.2f}, {n.max()}" if n.size else "-", str(len(sm.get("videos", {})) or "-"))
    out.print(t)
    names = idx.class_names
    for s in splits:
        imgs = idx.split_meta(s)["class_images"]
        # Only classes that occur: a split with fewer than ten would otherwise list absent ones.
        top = [c for c in sorted(range(len(imgs)), key=lambda c: -imgs[c])[:10] if imgs[c] > 0]
        listed = "; ".join(f"{show(names[c])} ({imgs[c]})" for c in top)  # ADE class names hold commas
        out.print(f"{s}: most frequent classes: {listed or 'none'}")
        absent = sum(1 for c in imgs if c == 0)
        out.print(f"{s}: {absent} of {idx.num_classes} classes never appear")
    if limit:
        a = idx.arrays(splits[0])
        for i in range(min(limit, len(a.keys))):
            out.print(f"  {show(a.keys[i])} {a.height[i]}x{a.width[i]}: "
                      + "; ".join(show(names[c]) for c in a.classes_of(i)))


@user_errors
def verify(
    root: Annotated[Path, typer.Argument(help="Shard directory.")],
    images: Annotated[bool, typer.Option("--images", help="Also decode every image (slower).")] = False,
) -> None:
    """Check checksums, sample counts, label values and stored class lists of every shard.

    Exit 0 when all is well, 1 naming the shard and sample of each problem.

    Example:
      rankseg verify data/synth
    """
    from rankseg_core.shards.verify import verify_shards

    problems = 0
    for p in verify_shards(root, decode_images=images):
        problems += 1
        err.print(f"[red]problem:[/] {show(p)}", highlight=False, soft_wrap=True)
    if problems:
        err.print(f"[bold red]{problems} problem(s)[/] in {show(root)}")
        raise typer.Exit(1)
    err.print(f"[green]ok[/]: {show(root)} verified")


@stats_app.command("class-cdf")
@user_errors
def class_cdf(
    roots: Annotated[list[Path], typer.Argument(help="One or more shard directories.")],
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write the CDF curves as a figure; the extension picks the format: .png, .pdf or .svg.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the numbers as JSON.")] = None,
    max_classes: Annotated[int, typer.Option("--max-classes", help="Largest n on the x axis.")] = 40,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Only these splits (default: all).")] = None,
) -> None:
    """Share of images containing at most n classes (the paper's Fig. 2).

    Reads only the stored class lists, never decodes images.

    Example:
      rankseg stats class-cdf data/ade847 data/cocolvis --plot cdf.png \\
        --json cdf.json
    """
    from rankseg_core.shards.stats import dataset_class_cdf, plot_class_cdf
    from rankseg_core.utils.fsio import atomic_write_json
    from rankseg_core.utils.plotting import figure_format

    if plot:
        figure_format(plot)  # an unknown extension fails before the work, not after
    results = [dataset_class_cdf(r, max_classes, split) for r in roots]
    t = Table("dataset", "K", "images", "<= 5 classes", "<= 10", "< 25 classes")
    for r in results:
        def at(n):
            return (f"{100 * r.cdf[n - 1]:.2f}%" if n <= len(r.cdf) else "-")
        t.add_row(f"{show(r.name)} ({show(r.path)})", str(r.num_classes), str(r.num_images), at(5), at(10),
                  f"{100 * r.share_below_25:.2f}%")
    out.print(t)
    if json_out:
        atomic_write_json(json_out, {"datasets": [r.as_json() for r in results]})
        err.print(f"numbers: {show(json_out)}")
    if plot:
        plot_class_cdf(results, plot)
        err.print(f"plot: {show(plot)}")
