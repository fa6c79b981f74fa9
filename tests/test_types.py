"""The type check: mypy over rankseg_core and rankseg_cli, configured by pyproject's [tool.mypy],
passes; and a planted type error in a copy of the packages makes it fail (so a green check means
something)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 900  # a cold cache takes ~15 s on two cores; torch's stubs are large


def _mypy(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # No file arguments: the files (and every option) come from cwd's pyproject.toml.
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def test_mypy_passes() -> None:
    res = _mypy(ROOT)  # incremental: the cache is .mypy_cache in the repository
    assert res.returncode == 0, f"mypy failed (exit {res.returncode}):\n{res.stdout}{res.stderr}"
    assert "Success: no issues found" in res.stdout, res.stdout + res.stderr


def test_mypy_reports_a_planted_error(tmp_path: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in ("rankseg_core", "rankseg_cli"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "rankseg_core" / "utils" / "resources.py"
    target.write_text(target.read_text(encoding="utf-8") + '\n\ndef _planted() -> int:\n    return "x"\n',
                      encoding="utf-8")

    res = _mypy(tmp_path, "--cache-dir", str(tmp_path / ".mypy_cache"))
    out = res.stdout + res.stderr
    assert res.returncode == 1, f"mypy exit {res.returncode}, expected 1 (type errors):\n{out}"
    errors = [line for line in res.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, out
    assert "resources.py" in errors[0] and "[return-value]" in errors[0], out
    assert 'Incompatible return value type (got "str", expected "int")' in errors[0], out
