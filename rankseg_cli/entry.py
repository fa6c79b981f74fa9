"""The `rankseg` console script: import the CLI, then run it, with Ctrl-C as one line anywhere.

Importing the commands (torch, timm, h5py, ...) takes a noticeable fraction of a second; a
Ctrl-C in that window, or while Typer parses the command line, happens outside the
`user_errors` wrapper of each command, so it is handled here (exit 130, no traceback).
"""

from __future__ import annotations

import sys


def _interrupted() -> None:
    print("interrupted", file=sys.stderr, flush=True)
    raise SystemExit(130)


def main() -> None:
    try:
        from rankseg_cli.app import app

        app()
    except KeyboardInterrupt:
        _interrupted()
