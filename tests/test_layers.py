"""The shape of the code: who imports whom (no cycles; argparse only in the command-line layer,
main.py and commands.py), and every top-level module opens with a docstring and stays short."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import ROOT

MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}
MAX_LINES = 650            # a guard; the target is ~600
CLI_LAYER = {"main", "commands", "batch_commands"}     # argparse stays here; managers never see it


def imports(path: Path) -> set[str]:
    """Top-level names imported anywhere in the file, inside functions too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


GRAPH = {name: imports(path) & set(MODULES) - {name} for name, path in MODULES.items()}


def test_no_import_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        assert name not in trail, "import cycle: " + " -> ".join(trail[trail.index(name):] + [name])
        if name not in done:
            for dep in sorted(GRAPH[name]):
                visit(dep, trail + [name])
            done.add(name)

    for name in MODULES:
        visit(name, [])


def test_only_the_cli_layer_sees_argparse_and_nothing_imports_main() -> None:
    assert {n for n, p in MODULES.items() if "argparse" in imports(p)} <= CLI_LAYER
    assert {n for n, deps in GRAPH.items() if "main" in deps} == set()
    assert {n for n, deps in GRAPH.items() if "commands" in deps} <= {"main", "batch_commands"}


def test_every_module_opens_with_a_docstring() -> None:
    assert [n for n, p in MODULES.items() if not ast.get_docstring(ast.parse(p.read_text()))] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_short(name: str) -> None:
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES
