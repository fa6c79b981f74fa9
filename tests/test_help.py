"""The `--help` of every command reads well in an 80-column terminal.

What goes wrong when nobody looks: a docstring's hard line breaks show up as broken lines
inside Rich's panels, an example command wraps mid-command (a reader copies half of it),
Rich cuts a long unbreakable word with "…", and Typer shows types such as <bool> for a flag or
<list[str]> for a repeatable option.
"""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_cli.common import new_app

WIDTH = 80
BORDERS = "│╭╰"


def _paths(command, path=()):
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _paths(sub, (*path, name))


COMMANDS = [" ".join(p) for p in _paths(typer.main.get_command(app))]


def render(typer_app: typer.Typer, args: list[str]) -> str:
    res = CliRunner().invoke(typer_app, [*args, "--help"], env={"COLUMNS": str(WIDTH), "TERM": "dumb"},
                             terminal_width=WIDTH)
    assert res.exit_code == 0, res.output
    return res.output


def _text(line: str) -> str:
    """A line without its panel borders."""
    return line.strip().strip("│").rstrip() if line.startswith("│") else line.rstrip()


def _indent(line: str) -> int:
    body = line[1:] if line.startswith("│") else line
    return len(body) - len(body.lstrip())


def problems(output: str) -> list[str]:
    found = []
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if len(line) > WIDTH:
            found.append(f"wider than {WIDTH}: {line!r}")
        if "…" in line:
            found.append(f"truncated: {line!r}")
        if re.search(r"<bool>|<list\[", line):
            found.append(f"metavar: {line!r}")
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        text, follow = _text(line), _text(nxt).strip()
        if not text.strip() or not follow or line[:1] != nxt[:1] or line[:1] in "╭╰":
            continue
        panel = line.startswith("│")
        # A continuation: not a new option / command row of a panel, not a new example.
        if (panel and _indent(nxt) <= 3) or re.match(r"(?:[^:]*: )?(?:rankseg|torchrun|\.\.\.) ", follow):
            continue
        word = follow.split()[0]
        room = (WIDTH - 3 if panel else WIDTH - 1) - len(text)
        if follow[0].islower() and not text.endswith((":", "\\")) and len(word) + 1 <= room:
            found.append(f"broken line (the next word fitted): {text.strip()!r} / {follow!r}")
        example = text.strip()
        if not panel and re.match(r"(?:[^:]*: )?rankseg ", example) and not example.endswith("\\"):
            found.append(f"example split mid-command: {example!r} / {follow!r}")
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_help_reads_well_at_80_columns(command):
    output = render(app, command.split())
    assert problems(output) == []


def test_the_check_catches_what_typer_does_to_plain_docstrings():
    """The same help through a plain Typer app (hard breaks kept, Typer's metavars) fails the
    check: so the check can fail, and `new_app` is what fixes it."""
    plain = typer.Typer(rich_markup_mode="rich", add_completion=False)
    tidy = new_app("Tidy.")

    def body(flag: bool = typer.Option(False, "--flag", help="A flag."),
             names: list[str] = typer.Option([], "--name", help="Repeatable."),
             long: str = typer.Option("", "--json", help="Default RUN/eval/<dataset>-<split>-<hash>-of-the-shards-path.json.")) -> None:
        """One line.

        A paragraph written in a docstring with hard line breaks, as
        editors wrap it.

        Example:
          rankseg train --model segmenter-vitb --data data/ade20k-full --out runs/adefull --iters 100
        """

    plain.command("cmd")(body)
    plain.command("other")(body)
    tidy.command("cmd")(body)
    tidy.command("other")(body)
    found = " ".join(problems(render(plain, ["cmd"])))
    for what in ("metavar", "broken line", "example split", "truncated"):
        assert what in found
    tidy_found = " ".join(problems(render(tidy, ["cmd"])))
    assert "metavar" not in tidy_found and "broken line" not in tidy_found
