"""The `rankseg` command: one Typer app; each command lives in its own module."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

# Importing these registers their `prepare <dataset>` commands on prepare_app.
from rankseg_cli import prepare_images, prepare_panoptic, prepare_video_lvis  # noqa: F401
from rankseg_cli.common import new_app
from rankseg_cli.data_cmds import inspect, stats_app, verify
from rankseg_cli.demo import demo
from rankseg_cli.env_cmds import env
from rankseg_cli.prepare import prepare_app
from rankseg_cli.score_cmds import register as register_scoring
from rankseg_cli.train_cmds import evaluate, predict, stats_model, train
from rankseg_cli.video_cmds import register as register_video
from rankseg_cli.viz_cmds import viz_app
from rankseg_cli.weak_shot_cmds import register as register_weak_shot
from rankseg_core import __version__

app = new_app(
    "rankseg: large-vocabulary image and video segmentation with RankSeg (ECCV 2022).\n\n"
    "Start with [bold]rankseg demo[/], which needs no download.", completion=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rankseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None) -> None:
    pass


app.add_typer(prepare_app, name="prepare")
app.add_typer(stats_app, name="stats")
app.add_typer(viz_app, name="viz")
app.command("inspect")(inspect)
app.command("verify")(verify)
app.command("demo")(demo)
app.command("env")(env)
app.command("train")(train)
app.command("eval")(evaluate)
app.command("predict")(predict)
stats_app.command("model")(stats_model)
register_scoring(app)  # eval-predictions, export, prepare detectron2
register_video(app)  # eval-vis
register_weak_shot(app)  # pseudo-label
