"""The console script: a Ctrl-C before any command runs (while the CLI imports torch & co, or
while Typer parses) is one line and exit 130, like a Ctrl-C inside a command."""

from __future__ import annotations

import sys

import pytest

from rankseg_cli import entry


class _InterruptImport:
    """A meta-path finder that raises KeyboardInterrupt when `name` is imported."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname, path, target=None):
        if fullname == self.name:
            raise KeyboardInterrupt
        return None


def test_ctrl_c_while_importing_the_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delitem(sys.modules, "rankseg_cli.app", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_InterruptImport("rankseg_cli.app"), *sys.meta_path])
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted" and "Traceback" not in err


def test_ctrl_c_while_parsing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import rankseg_cli.app as app_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(app_module.app), "__call__", interrupted)
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == 130 and capsys.readouterr().err.strip() == "interrupted"


def test_the_console_script_runs_the_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(sys, "argv", ["rankseg", "--version"])
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("rankseg ")
