"""CLI plumbing shared by every command: errors become one line and an exit code.

Exit codes (docs/errors.md): 0 success; 1 `verify` found problems; 2 a one-line error (a
mistake in the input or options, or the operating system refusing: full or read-only disk,
permission denied, a path under a regular file, out of memory); 130 interrupted (Ctrl-C).
Anything else that escapes is a bug in rankseg and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from rankseg_core.errors import UserError
from rankseg_core.utils.console import make_console, printable

out = make_console()  # results (tables) on stdout
err = make_console(stderr=True)  # progress, notes and errors on stderr

# What an interrupted command keeps and how to go on: a string, or a function of the command's
# keyword arguments (e.g. to name the run directory).
Interrupted = str | Callable[[dict[str, Any]], str]
RERUN_RESUMES = "finished shards are kept; re-run the same command to resume"

OUT_OF_MEMORY = ("out of memory: lower --workers (or --batch-size / eval.batch_size), convert or "
                 "train on a machine with more memory, or use smaller images")

# Errors that can only come from writing; others (ENOENT, EACCES, EIO...) may be a read too.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
# h5py wraps the C library's errors in OSError(errno, text) with the file only in the text.
_H5_NAME = re.compile(r"\b(?:file)?name = '([^']*)'")


def show(value: object) -> str:
    """`value` (a path, a name) safe to put in a rich markup string: printable, no markup."""
    return escape(printable(os.fsdecode(value) if isinstance(value, bytes) else str(value)))


def fail(message: str, exit_code: int = 2) -> NoReturn:
    """Print `error: message` on one line and exit."""
    err.print(f"[bold red]error:[/] {show(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(exit_code) from None


def os_error_message(exc: OSError) -> str:
    """One line for an OSError that no lower layer turned into a UserError: the path, the
    reason and what to do (the wording of `rankseg_core.utils.fsio.os_error`)."""
    from rankseg_core.utils.fsio import os_error

    path = exc.filename
    if path is None:
        found = _H5_NAME.search(str(exc))
        path = found.group(1) if found else None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if exc.errno == errno.EEXIST and path is not None and os.path.lexists(path) and not os.path.isdir(path):
        # mkdir(parents=True) on a path whose parent is a regular file: say that, not "file exists"
        exc = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    doing = "cannot write" if exc.errno in _WRITE_ERRNOS else "cannot access"
    if path is None:
        # No file named anywhere (a bare write() or fsync() failing): say so rather than guess.
        return str(os_error("(file not named by the system)", exc, doing))
    return str(os_error(path, exc, doing))


def _is_out_of_memory(exc: BaseException) -> bool:
    # torch.OutOfMemoryError (CUDA / MPS) without importing torch here.
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


@contextlib.contextmanager
def _remember_ctrl_c() -> Iterator[list[int]]:
    """Record every SIGINT while a command runs, still raising KeyboardInterrupt as Python's own
    handler does. Python drops an exception raised inside a weakref callback or `__del__`
    ("Exception ignored in ..."), so a Ctrl-C landing there would otherwise be lost and the
    command end as if never interrupted. Left alone where another handler is installed or
    off the main thread."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield seen
        return

    def handler(signum: int, frame: object) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    previous_hook = sys.unraisablehook

    def unraisable(info: Any) -> None:
        # The dropped KeyboardInterrupt is recorded above and ends the command with 130; Python
        # would also print it as "Exception ignored in ... Traceback" on stderr.
        if info.exc_type is not KeyboardInterrupt or not seen:
            previous_hook(info)

    signal.signal(signal.SIGINT, handler)
    sys.unraisablehook = unraisable
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = previous_hook


def user_errors(fn: Callable[..., Any] | None = None, *, interrupted: Interrupted = "") -> Any:
    """Run a command body, turning what is not a bug into one `error: ...` line.

    `UserError` -> its message and exit code; `OSError` -> path, reason and fix (exit 2);
    out of memory -> what to lower (exit 2); a file name that is not UTF-8 where text is
    needed -> which name (exit 2); Ctrl-C -> `interrupted: <interrupted>` (exit 130).
    Use as `@user_errors` or `@user_errors(interrupted=RERUN_RESUMES)`.
    """
    if fn is None:
        return functools.partial(user_errors, interrupted=interrupted)

    def stop(kwargs: dict[str, Any]) -> NoReturn:
        hint = interrupted(kwargs) if callable(interrupted) else interrupted
        err.print("[yellow]interrupted[/]" + (f": {show(hint)}" if hint else ""), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with _remember_ctrl_c() as seen:
                result = fn(*args, **kwargs)
            if seen:  # a Ctrl-C whose KeyboardInterrupt Python swallowed (see _remember_ctrl_c)
                stop(kwargs)
            return result
        except UserError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            stop(kwargs)
        except BrokenPipeError:  # `rankseg inspect --jsonl | head`
            sys.stderr.close()
            raise typer.Exit(0) from None
        except OSError as exc:
            fail(os_error_message(exc))
        except UnicodeEncodeError as exc:
            if "surrogates" not in exc.reason:
                raise
            name = exc.object if isinstance(exc.object, str) else repr(exc.object)
            fail(f'"{name[:300]}" holds bytes that are not UTF-8 (from a file or folder name): '
                 "rename it to valid UTF-8")
        except Exception as exc:  # MemoryError is an Exception too
            if not _is_out_of_memory(exc):
                raise
            fail(OUT_OF_MEMORY)

    return wrapper


def val_split(data: Path, split: str | None) -> str:
    """`split` if given, else the validation split of the shards in `data` (shards/splits.py)."""
    from rankseg_core.shards.read import ShardIndex
    from rankseg_core.shards.splits import default_split

    return split if split else default_split(data, ShardIndex(data).splits, "val", "--split NAME")


def reflow(text: str | None) -> str | None:
    """Help text as Rich's panels should get it. Rich keeps a docstring's hard line breaks, so
    the lines of a paragraph are joined (Rich wraps them to the terminal); an indented line (an
    example command) and the line after one ending in a backslash (a continued command) stay
    lines of their own."""
    if text is None:
        return None
    lines: list[str] = []
    for line in inspect.cleandoc(text).splitlines():
        line = line.rstrip()
        prev = lines[-1] if lines else ""
        if line and not line[0].isspace() and prev and not prev[0].isspace() and not prev.endswith("\\"):
            lines[-1] = f"{prev} {line}"
        else:
            lines.append(line)
    return "\n".join(lines)


_LIST_TYPE = re.compile(r"<list\[(\w+)\]>")


def _tidy_params(params: list[Any], ctx: Any) -> list[Any]:
    """Metavars that read as values: none for a flag (Typer shows <bool>), the element type for
    a repeatable option or argument (Typer shows <list[str]>; the help says it repeats)."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
            continue
        display = getattr(param, "display_type", None)
        found = _LIST_TYPE.fullmatch(display(ctx) or "") if display is not None else None
        if found:
            label = f"<{found.group(1).lower()}>"
            setattr(param, "display_type_rich", lambda ctx, label=label: label)
    return params


class _Tidy:
    """Reflowed help and tidy metavars for a Typer command or group (mixed in before it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        kwargs["short_help"] = reflow(kwargs.get("short_help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx: Any) -> Any:
        return _tidy_params(super().get_params(ctx), ctx)  # type: ignore[misc]  # the Typer class mixed in after


class _Command(_Tidy, TyperCommand):
    pass


class _Group(_Tidy, TyperGroup):
    pass


class _App(typer.Typer):
    """A Typer app whose commands get `reflow`ed help and `_tidy_params` metavars."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


def new_app(help: str, completion: bool = False) -> typer.Typer:
    """A command group; `completion` adds Typer's --install-completion / --show-completion
    (the root app only: Typer offers them on the root command)."""
    return _App(help=help, cls=_Group, no_args_is_help=True, rich_markup_mode="rich", add_completion=completion,
                context_settings={"help_option_names": ["-h", "--help"]},
                pretty_exceptions_enable=False)
