"""The library's packages depend on each other one way (the layer contract), and its modules
have no import cycles, lazy imports included.

The layers are declared once, in pyproject.toml's [tool.importlinter] (docs/architecture.md
draws them); import-linter checks them here, and a planted upward import shows that the check
can fail. A module cycle (even one hidden in a function-level import) means two modules that
cannot be read, tested or replaced on their own.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rankseg_core", "rankseg_cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level or lazily)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` names a submodule when one exists.
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in files else mod for a in node.names]
            for t in targets:
                while t and t not in files:  # `import a.b.c` of a module: its deepest known prefix
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_train_and_evaluate_depend_one_way() -> None:
    g = import_graph()
    assert "rankseg_core.engine.evaluate" in g["rankseg_core.engine.train"]
    assert "rankseg_core.engine.train" not in g["rankseg_core.engine.evaluate"]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the packages under `root` (a fresh process, so that it analyses
    that tree and not the rankseg already imported here)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)


def test_layer_contract_is_kept() -> None:
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("module, planted, lazy", [
    ("rankseg_core/model/heads.py", "from rankseg_core.engine import train", False),  # model -> engine: upward
    ("rankseg_core/shards/read.py", "import rankseg_core.families", True),  # inside a function, still upward
    ("rankseg_core/data/augment.py", "from rankseg_core.evaluation import metrics", False),  # siblings apart
])
def test_layer_contract_catches_a_planted_import(tmp_path: Path, module: str, planted: str, lazy: bool) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    text = target.read_text()
    if lazy:
        text += f"\n\ndef _planted() -> None:\n    {planted}  # noqa\n"
    else:
        text += f"\n{planted}  # noqa\n"
    target.write_text(text)
    res = _lint_imports(tmp_path)
    assert res.returncode != 0 and "BROKEN" in res.stdout.upper(), res.stdout + res.stderr


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []
