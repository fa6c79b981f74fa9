"""CLI plumbing shared by every command: user errors become one line and an exit code."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from rankseg_core.errors import UserError

out = Console()  # results (tables) on stdout
err = Console(stderr=True)  # progress, notes and errors on stderr


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command body; a `UserError` prints `error: ...` on one line and exits non-zero."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: finished shards/checkpoints are kept; "
                      "re-run the same command to resume")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # `rankseg inspect --jsonl | head`
            sys.stderr.close()
            raise typer.Exit(0) from None

    return wrapper


def new_app(help: str) -> typer.Typer:
    return typer.Typer(help=help, no_args_is_help=True, rich_markup_mode="rich", add_completion=False,
                       context_settings={"help_option_names": ["-h", "--help"]},
                       pretty_exceptions_enable=False)
